"""int8 export (expandfx/quantize.py): real onnxruntime sessions on a model trained on the
demo's task, the quantized graph's contents, its accuracy against fp32, a broken calibration
caught, the options and their errors."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import expandfx as efx
from expandfx.demo import digits, fit, reproducible
from expandfx.models import smallnet_digits
from expandfx.quantize import Int8Config, sqnr_db


@pytest.fixture(scope="module")
def trained():
    """SmallNet trained 15 epochs on 8×8 digits as CK+FC r=2 (test accuracy ≈ 0.97)."""
    with reproducible(threads=1):
        xtr, ytr, xte, yte = digits()
        torch.manual_seed(0)
        big = efx.expand(smallnet_digits(), "CK+FC", 2)
        fit(big, (xtr, ytr, xte, yte), 15, 0, "test")
    return big.eval(), (xtr, ytr, xte, yte)


def batches(data):
    """256 training images to calibrate on, the 450 test images held out (8 batches)."""
    xtr, ytr, xte, yte = data
    return (list(xtr[:256].split(64)) + list(xte.split(64)),
            list(ytr[:256].split(64)) + list(yte.split(64)), len(xte.split(64)))


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_export_is_quantized_smaller_and_as_accurate(trained, tmp_path):
    big, data = trained
    calib, labels, held = batches(data)
    x = data[2][:4]
    report = efx.export_onnx(big, (x,), tmp_path / "m.onnx", quantize=Int8Config(holdout=held),
                             calibration=calib, labels=labels)
    q = report.int8
    assert report.passed and q.passed
    assert q.path == str(tmp_path / "m.int8.onnx") and (tmp_path / "m.onnx").is_file()
    assert q.calibration_batches == 4 and q.heldout_batches == held and q.heldout_samples == 450
    # the int8 graph: checked, every Conv/Gemm reads an int8 weight through DequantizeLinear
    onnx.checker.check_model(q.path, full_check=True)
    proto = onnx.load(q.path)
    assert q.quantized_layers == (4, 4)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    int8 = [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.data_type == onnx.TensorProto.INT8]  # weights, and the zero points
    assert sum(a.size for a in int8 if a.ndim > 1) == q.int8_weight_elements >= 8000
    assert not any(t.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(t).ndim > 1
                   for t in proto.graph.initializer)  # no float weight matrix/kernel left
    assert q.size_bytes["int8"] < 0.6 * q.size_bytes["fp32"]
    assert q.size_bytes["int8"] == (tmp_path / "m.int8.onnx").stat().st_size
    # accuracy on the held-out test split, recomputed here from both files
    xte, yte = data[2], data[3].numpy()
    fp32 = session(tmp_path / "m.onnx").run(None, {"x": xte.numpy()})[0]
    got = session(q.path).run(None, {"x": xte.numpy()})[0]
    acc_fp32, acc_int8 = (fp32.argmax(1) == yte).mean(), (got.argmax(1) == yte).mean()
    assert acc_fp32 > 0.9
    assert abs(acc_int8 - acc_fp32) <= 0.01  # within 1 point
    assert q.accuracy == pytest.approx({"fp32": acc_fp32, "int8": acc_int8})
    assert q.sqnr_db["held-out"] == pytest.approx(sqnr_db([fp32], [got]), abs=1e-6)
    assert q.sqnr_db["held-out"] > 25 and q.sqnr_db["example_inputs"] > 25
    assert q.agreement["held-out"] >= 0.98
    assert q.latency_ms["fp32"] > 0 and q.latency_ms["int8"] > 0 and 0 < q.latency_ratio < 10
    text = str(report)
    assert "int8 export" in text and "SQNR" in text and "latency" in text and "file size" in text
    assert '"int8": {' in report.to_json()


def test_constant_calibration_is_caught(trained, tmp_path):
    """All-zero calibration batches, real held-out ones: refused up front by the spread
    heuristic; with the heuristic off, the SQNR check catches it on its own."""
    big, data = trained
    calib, labels, held = batches(data)
    broken = [torch.zeros_like(b) for b in calib[:-held]] + calib[-held:]
    with pytest.raises(efx.ConfigError, match="calibration batches are .nearly. constant"):
        efx.export_onnx(big, (data[2][:4],), tmp_path / "m.onnx",
                        quantize=Int8Config(holdout=held), calibration=broken)
    off = Int8Config(holdout=held, check_calibration=False)
    with pytest.raises(efx.VerificationError, match="int8 model fails its check") as err:
        efx.export_onnx(big, (data[2][:4],), tmp_path / "m.onnx",
                        quantize=off, calibration=broken, labels=labels)
    q = err.value.report.int8
    assert not q.passed and not err.value.report.passed and err.value.report.fp32_passed
    assert q.sqnr_db["held-out"] < 10 and "SQNR" in q.failures[0]["message"]
    assert {f["code"] for f in q.failures} == {"sqnr"}
    assert {f["where"] for f in q.failures} == {"example_inputs", "held-out"}
    assert q.accuracy["int8"] < q.accuracy["fp32"] - 0.05  # it does cost accuracy
    assert "int8 verdict: FAIL" in str(err.value)
    # the threshold is the user's: off, the same file is written and reported
    report = efx.export_onnx(big, (data[2][:4],), tmp_path / "m.onnx",
                             quantize=Int8Config(holdout=held, min_sqnr_db=None,
                                                 check_calibration=False),
                             calibration=broken)
    assert report.int8.passed and report.int8.sqnr_db["held-out"] < 10


def test_min_agreement_threshold(trained, tmp_path):
    big, data = trained
    calib, _, held = batches(data)
    broken = [torch.full_like(b, 0.5) for b in calib[:-held]] + calib[-held:]
    with pytest.raises(efx.VerificationError) as err:
        efx.export_onnx(big, (data[2][:4],), tmp_path / "m.onnx", calibration=broken,
                        quantize=Int8Config(holdout=held, min_sqnr_db=None, min_agreement=0.99,
                                            check_calibration=False))
    q = err.value.report.int8
    assert q.agreement["held-out"] < 0.99
    held_out = next(f for f in q.failures if f["where"] == "held-out")
    assert held_out["code"] == "agreement" and "agreement" in held_out["message"]
    assert held_out["numbers"]["agreement"] == q.agreement["held-out"]


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_granularity(trained, tmp_path, per_channel):
    big, data = trained
    calib, _, held = batches(data)
    report = efx.export_onnx(big, (data[2][:4],), tmp_path / "m.onnx", calibration=calib,
                             quantize=Int8Config(holdout=held, per_channel=per_channel,
                                                 method="percentile"))
    proto = onnx.load(report.int8.path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    int8 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    scales = [inits[n.input[1]] for n in proto.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in int8 and
              inits[n.input[0]].ndim > 1]
    assert len(scales) == 4
    sizes = sorted(s.size for s in scales)
    assert sizes == ([8, 10, 16, 64] if per_channel else [1, 1, 1, 1])
    assert report.int8.config["method"] == "percentile"
    assert report.int8.sqnr_db["held-out"] > 20


def test_tuple_batches_of_a_two_input_model(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(3, 5)

        def forward(self, u, v):
            return torch.relu(self.a(u)) + self.b(v)

    torch.manual_seed(0)
    model = Two().eval()
    calib = [(torch.randn(32, 6), torch.randn(32, 3)) for _ in range(6)]
    report = efx.export_onnx(model, calib[0], tmp_path / "two.onnx", quantize="int8",
                             calibration=calib)
    q = report.int8
    assert q.calibration_batches == 4 and q.heldout_batches == 2  # holdout 0.25 of 6, rounded
    assert q.heldout_samples == 64  # min_samples' default: 2 batches of 16 would fail
    assert q.quantized_layers == (2, 2) and q.sqnr_db["held-out"] > 15


def test_bad_int8_arguments_name_the_fix(trained, tmp_path):
    big, data = trained
    x = (data[2][:4],)
    path = tmp_path / "m.onnx"
    with pytest.raises(efx.ConfigError, match="needs calibration=batches"):
        efx.export_onnx(big, x, path, quantize="int8")
    with pytest.raises(efx.ConfigError, match="quantize= is not"):
        efx.export_onnx(big, x, path, calibration=[x[0]])
    with pytest.raises(efx.ConfigError, match="'int8' or an expandfx.Int8Config"):
        efx.export_onnx(big, x, path, quantize="int4", calibration=[x[0]])
    with pytest.raises(efx.ConfigError, match="unknown calibration method 'kl'"):
        Int8Config(method="kl")
    with pytest.raises(efx.ConfigError, match="holdout"):
        Int8Config(holdout=1.5)
    with pytest.raises(efx.ConfigError, match="min_agreement"):
        Int8Config(min_agreement=2)
    with pytest.raises(efx.ConfigError, match="at least one batch to calibrate"):
        efx.export_onnx(big, x, path, quantize="int8", calibration=[x[0]])
    with pytest.raises(efx.ConfigError, match="one label tensor per batch"):
        efx.export_onnx(big, x, path, quantize="int8", calibration=[x[0]] * 4,
                        labels=[torch.zeros(4)])
    with pytest.raises(efx.ConfigError, match="calibration batch 1 is not a tensor"):
        efx.export_onnx(big, x, path, quantize="int8", calibration=[x[0], "x", x[0]])

