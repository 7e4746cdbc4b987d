"""Verified means verified (issue 28, the int8 and export parts): the int8 verdict gates on
every set it is given, wrong calibration sets are refused with their numbers, a verdict needs
enough held-out samples and is the same on every run, files are renamed onto their final
names only when verified, reports are machine-readable, NaN/inf are errors."""

from __future__ import annotations

import json
import math
import os

import onnx
import pytest
import torch
from torch import nn

import expandfx as efx
from expandfx.demo import digits, fit, reproducible
from expandfx.errors import NonFiniteError
from expandfx.models import smallnet_digits
from expandfx.quantize import Int8Config

FAST = {"latency_runs": 2}


@pytest.fixture(scope="module")
def trained():
    """SmallNet trained on 8×8 digits; 512 training images to calibrate on (8 batches: 6 +
    2 held out, 128 samples), 16 test images as example_inputs."""
    with reproducible(threads=1):
        xtr, ytr, xte, yte = digits()
        torch.manual_seed(0)
        model = smallnet_digits()
        fit(model, (xtr, ytr, xte, yte), 10, 0, "test")
    return model.eval(), list(xtr[:512].split(64)), xte[:16]


def export(model, x, path, calibration, **config):
    return efx.export_onnx(model, (x,), path, quantize=Int8Config(**FAST, **config),
                           calibration=calibration)


def files(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


# ---- the verdict gates on example_inputs and on the held-out batches ----------------------

def test_zero_calibration_is_refused_before_anything_is_written(trained, tmp_path):
    model, real, x = trained
    with pytest.raises(efx.ConfigError) as caught:
        export(model, x, tmp_path / "m.onnx", [torch.zeros_like(b) for b in real])
    err = caught.value
    assert err.code == "calibration_unlike_inputs" and err.where == "calibration channel 0"
    assert err.numbers["std"] == 0.0 and err.numbers["mean"] == 0.0
    assert err.numbers["example_std"] == pytest.approx(float(x.std(correction=0)), rel=1e-6)
    assert "(nearly) constant" in str(err) and "check_calibration=False" in str(err)
    assert files(tmp_path) == set()  # refused up front: no file, no staging folder


def test_zero_calibration_fails_on_example_inputs_while_held_out_passes(trained, tmp_path):
    """The issue's case with the heuristic off: the held-out batches are zeros like the
    calibration ones and agree (the old verdict: PASS); the real example_inputs do not."""
    model, real, x = trained
    with pytest.raises(efx.VerificationError) as caught:
        export(model, x, tmp_path / "m.onnx", [torch.zeros_like(b) for b in real],
               check_calibration=False)
    q = caught.value.report.int8
    assert q.sqnr_db["held-out"] > 20 > 10 > q.sqnr_db["example_inputs"]
    assert [(f["code"], f["where"]) for f in q.failures] == [("sqnr", "example_inputs")]
    assert "held-out set passes" in q.failures[0]["message"]


def test_a_sign_flipped_calibration_passes_the_heuristic_but_not_the_gate(trained, tmp_path):
    """Same spread as the real inputs (the heuristic cannot see it), wrong distribution: the
    SQNR on example_inputs gates; with verify_on="held-out" the same call passes and says
    that example_inputs did not gate."""
    model, real, x = trained
    flipped = [-b for b in real]
    with pytest.raises(efx.VerificationError, match="example_inputs SQNR") as caught:
        export(model, x, tmp_path / "m.onnx", flipped)
    q = caught.value.report.int8
    assert q.verified_on == ["example_inputs", "held-out"]
    assert q.sqnr_db["held-out"] > 20 > q.sqnr_db["example_inputs"]
    assert q.failures[0]["numbers"] == {"sqnr_db": q.sqnr_db["example_inputs"],
                                        "min_sqnr_db": 20.0}
    hint = export(model, x, tmp_path / "m.onnx", flipped, verify_on="held-out").int8
    assert hint.passed and hint.verified_on == ["held-out"]
    assert hint.sqnr_db["example_inputs"] == pytest.approx(q.sqnr_db["example_inputs"])
    assert "(reported, not gating: verify_on='held-out')" in str(hint)
    assert "on held-out, ≥ 64 held-out samples" in str(hint)


def test_unnormalized_pixels_are_refused_by_the_std_ratio(trained, tmp_path):
    model, real, x = trained
    with pytest.raises(efx.ConfigError, match=r"unlike example_inputs in channel 0") as caught:
        export(model, x, tmp_path / "m.onnx", [b * 255 for b in real])
    n = caught.value.numbers
    calib_std = float(torch.cat(real[:6]).std(correction=0)) * 255
    assert n["std"] == pytest.approx(calib_std, rel=1e-6)
    assert n["ratio"] == pytest.approx(calib_std / float(x.std(correction=0)), rel=1e-6)
    assert 100 < n["ratio"] and "outside [1/4, 4]×" in str(caught.value)
    assert "verify_on='held-out'" in str(caught.value)  # for a shape-hint example input


def test_tiny_noise_is_refused(trained, tmp_path):
    model, real, x = trained
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randn(b.shape, generator=gen) * 1e-3 for b in real]
    with pytest.raises(efx.ConfigError, match="unlike example_inputs") as caught:
        export(model, x, tmp_path / "m.onnx", noise)
    assert caught.value.numbers["ratio"] < 0.01


def test_a_shape_hint_example_input_is_not_compared_with_the_calibration(trained, tmp_path):
    """verify_on='held-out': the ratio test is off (only the near-constant test applies)."""
    model, real, x = trained
    hint = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 100
    report = export(model, hint, tmp_path / "m.onnx", real, verify_on="held-out")
    assert report.int8.passed and report.int8.sqnr_db["held-out"] > 20


# ---- enough samples, the same verdict every time ---------------------------------------------

def test_too_few_held_out_samples_fail_unless_min_samples_is_lowered(trained, tmp_path):
    model, real, x = trained
    small = [b[:16] for b in real]  # 8 batches of 16: 2 held out, 32 samples
    with pytest.raises(efx.VerificationError, match="min_samples") as caught:
        export(model, x, tmp_path / "m.onnx", small)
    q = caught.value.report.int8
    assert q.heldout_samples == 32 and q.sqnr_db["held-out"] > 20  # only the count fails
    assert [f["code"] for f in q.failures] == ["min_samples"]
    assert q.failures[0]["numbers"] == {"samples": 32, "min_samples": 64}
    assert "lower Int8Config(min_samples=...)" in q.failures[0]["message"]
    assert export(model, x, tmp_path / "m.onnx", small, min_samples=32).int8.passed


def test_the_same_call_gives_the_same_verdict(trained, tmp_path):
    model, real, x = trained
    first = export(model, x, tmp_path / "a.onnx", real).int8
    second = export(model, x, tmp_path / "b.onnx", real).int8
    assert first.passed and second.passed
    assert first.sqnr_db == second.sqnr_db and first.agreement == second.agreement
    flipped = [-b for b in real]
    verdicts = []
    for name in ("c.onnx", "d.onnx"):
        with pytest.raises(efx.VerificationError) as caught:
            export(model, x, tmp_path / name, flipped)
        verdicts.append(caught.value.report.int8.sqnr_db)
    assert verdicts[0] == verdicts[1]


# ---- files: renamed onto their final names only when verified ---------------------------

def test_a_failed_int8_file_is_kept_aside_and_a_stale_one_removed(trained, tmp_path):
    model, real, x = trained
    path = tmp_path / "m.onnx"
    assert export(model, x, path, real).int8.passed  # an earlier, successful run
    assert files(tmp_path) == {"m.onnx", "m.int8.onnx"}
    with pytest.raises(efx.VerificationError) as caught:
        export(model, x, path, [-b for b in real])
    failed = tmp_path / "m.int8.failed.onnx"
    assert files(tmp_path) == {"m.onnx", "m.int8.failed.onnx"}  # fp32 passed, stays
    assert str(failed) in str(caught.value) and caught.value.report.int8.path == str(failed)
    onnx.checker.check_model(str(failed))  # kept for inspection: a whole file
    report = caught.value.report
    text = str(report)
    assert "fp32 verdict: PASS" in text and "int8 verdict: FAIL" in text
    assert report.fp32_passed and not report.passed and report.failures == []
    assert export(model, x, path, real).int8.passed  # and again: the failed one goes
    assert files(tmp_path) == {"m.onnx", "m.int8.onnx"}


class Stateful(nn.Module):
    """Eager output depends on a Python counter that export freezes: fails verification."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


def test_a_failed_fp32_file_is_kept_aside_and_a_stale_one_removed(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("an earlier run's file")
    (tmp_path / "m.int8.onnx").write_text("an earlier run's int8 file")
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(8)]
    with pytest.raises(efx.VerificationError, match="onnxruntime disagrees") as caught:
        efx.export_onnx(Stateful(), (torch.randn(2, 3, 8, 8),), path, fold=False,
                        quantize="int8", calibration=calibration)
    assert files(tmp_path) == {"m.failed.onnx"}  # neither earlier file is left
    assert str(tmp_path / "m.failed.onnx") in str(caught.value)
    report = caught.value.report
    assert "fp32 verdict: FAIL" in str(report)
    data = json.loads(report.to_json())
    assert data["failures"] and data["failures"] == report.failures
    first = data["failures"][0]
    assert first["code"] == "numerics" and first["where"].endswith("[disabled]")
    assert first["numbers"]["max_abs"] > 0 and first["numbers"]["rtol"] == report.rtol
    ok = efx.export_onnx(nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),), path)
    assert ok.passed and files(tmp_path) == {"m.onnx"}  # the failed file goes on a pass


# ---- reports -------------------------------------------------------------------------------

def test_report_json_failures_have_code_where_numbers(trained, tmp_path):
    model, real, x = trained
    with pytest.raises(efx.VerificationError) as caught:
        export(model, x, tmp_path / "m.onnx", [b[:16] for b in real],
               check_calibration=False)
    data = json.loads(caught.value.report.to_json())
    assert data["passed"] is False and data["fp32_passed"] is True and data["failures"] == []
    int8 = data["int8"]
    assert int8["passed"] is False and int8["verified_on"] == ["example_inputs", "held-out"]
    for f in int8["failures"]:
        assert set(f) == {"code", "where", "numbers", "message"} and f["numbers"]
    assert int8["failures"][0]["code"] == "min_samples"


def test_hints_never_suggest_what_is_already_on(trained, tmp_path):
    model, real, x = trained
    zeros = [torch.zeros_like(b) for b in real[:6]] + [torch.rand(b.shape) for b in real[6:]]
    for config, want, never in (({}, "method='percentile'", "per_channel=True"),
                                ({"per_channel": False, "method": "percentile"},
                                 "per_channel=True", "method='percentile'")):
        with pytest.raises(efx.VerificationError) as caught:
            export(model, x, tmp_path / "m.onnx", zeros, check_calibration=False, **config)
        held = next(f for f in caught.value.report.int8.failures if f["where"] == "held-out")
        assert want in held["message"] and never not in held["message"]


# ---- non-finite --------------------------------------------------------------------------

def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def x2() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def refuses(where: str, model, x, tmp_path, **kwargs) -> NonFiniteError:
    with pytest.raises(NonFiniteError) as caught:
        efx.export_onnx(model, (x,), tmp_path / "m.onnx", **kwargs)
    assert caught.value.where == where and f"'{where}'" in str(caught.value)
    assert "non-finite" in str(caught.value) and "0.00e+00" not in str(caught.value)
    assert files(tmp_path) == set()
    return caught.value


def test_an_inf_weight_is_named(tmp_path):
    model = cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = math.inf
    assert refuses("0.weight", model, x2(), tmp_path).numbers == {"nan": 0, "inf": 1}


def test_a_nan_running_var_is_named(tmp_path):
    model = cnn()
    model[1].running_var[2] = math.nan
    assert refuses("1.running_var", model, x2(), tmp_path).numbers == {"nan": 1, "inf": 0}


def test_a_nan_input_is_named(tmp_path):
    x = x2()
    x[1, 0, 0, 0] = math.nan
    refuses("example_inputs[0]", cnn(), x, tmp_path)


class Masked(nn.Module):
    """Scores with -inf at masked positions (finite everywhere else)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mask", torch.arange(4 * 36).reshape(1, -1) % 3 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1).masked_fill(self.mask, -math.inf)


def test_non_finite_outputs_fail_unless_allowed_and_matched(tmp_path):
    err = refuses("output[0]", Masked(), x2(), tmp_path)
    assert "allow_nonfinite_outputs=True" in str(err)
    report = efx.export_onnx(Masked(), (x2(),), tmp_path / "m.onnx",
                             allow_nonfinite_outputs=True)
    assert report.passed and files(tmp_path) == {"m.onnx"}
    for level in report.errors.values():
        for e in level.values():
            assert e["passed"] and 0 < e["max_rel"] < 1e-4 and math.isfinite(e["max_abs"])


def test_nan_in_onnxruntime_where_torch_is_finite_fails(tmp_path):
    model, path = cnn(), tmp_path / "m.onnx"
    efx.export_onnx(model, (x2(),), path)
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).ndim == 1)
    arr = onnx.numpy_helper.to_array(bias).copy()
    arr[0] = math.nan
    bias.CopyFrom(onnx.numpy_helper.from_array(arr, bias.name))
    onnx.save(proto, str(path))
    with pytest.raises(efx.VerificationError, match="onnxruntime disagrees") as caught:
        efx.verify_onnx(model, (x2(),), path, n_random=1)
    failures = caught.value.report.failures
    assert failures and {f["code"] for f in failures} == {"non_finite"}
    assert failures[0]["numbers"]["nan"] > 0 and "non-finite" in str(caught.value)


# ---- raw third-party errors become one sentence ---------------------------------------------

def test_a_wrong_shape_calibration_batch_is_named(trained, tmp_path):
    model, real, x = trained
    bad = list(real)
    bad[2] = bad[2][..., :7]
    with pytest.raises(efx.ConfigError) as caught:
        export(model, x, tmp_path / "m.onnx", bad)
    text = str(caught.value)
    assert "calibration batch 2 has shape (64, 1, 8, 7)" in text and "(16, 1, 8, 8)" in text
    assert caught.value.numbers["batch"] == 2 and files(tmp_path) == set()


def test_a_nan_calibration_batch_is_named(trained, tmp_path):
    model, real, x = trained
    bad = [b.clone() for b in real]
    bad[3][0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"'calibration\[3\]\[0\]'"):
        export(model, x, tmp_path / "m.onnx", bad)


def test_int8_of_a_half_model_says_float(trained, tmp_path):
    model, real, x = trained
    with pytest.raises(efx.ConfigError, match=r"needs a float32 model.*float16.*model\.float\(\)"):
        export(model.half(), x.half(), tmp_path / "m.onnx", [b.half() for b in real])
    model.float()
    assert files(tmp_path) == set()


# ---- the command line --------------------------------------------------------------------

def test_cli_takes_the_example_input_from_data(tmp_path, capsys):
    from expandfx.cli import main

    xtr, ytr, _, _ = digits()
    torch.manual_seed(0)
    torch.save(smallnet_digits().state_dict(), tmp_path / "w.pt")
    torch.save({"x": xtr[:320], "y": ytr[:320]}, tmp_path / "x.pt")
    base = ["export", "smallnet_digits", "--weights", str(tmp_path / "w.pt"), "--int8",
            "--out", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json")]
    assert main([*base, "--data", str(tmp_path / "x.pt")]) == 0
    int8 = json.loads((tmp_path / "r.json").read_text())["int8"]
    assert int8["verified_on"] == ["example_inputs", "held-out"]
    assert main(base) == 0  # random inputs: a shape hint, said so
    assert "verdict rests on random inputs" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["int8"]["verified_on"] == ["held-out"]
    assert not any(".failed" in n or n.startswith(".") for n in os.listdir(tmp_path))
