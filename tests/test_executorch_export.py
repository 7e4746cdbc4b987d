"""export_executorch: programs that run in ExecuTorch's own runtime (XNNPACK), fp32 and int8,
verified in sequence on one loaded Method; the demo net, an expanded net, timm, torchvision
and Hugging Face models; a fresh process; the same bytes twice; the batch range it promises."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="executorch not installed: pip install "
                                         "'expandfx[executorch]'")

import expandfx as efx  # noqa: E402
from expandfx import executorch_export as ete  # noqa: E402
from expandfx.executorch_export import export_executorch  # noqa: E402
from expandfx.models import smallnet_7x7, smallnet_digits  # noqa: E402


def pixels(n: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def digits() -> nn.Module:
    torch.manual_seed(0)
    return smallnet_digits().eval()


def load(path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo net's fp32 program at the default max_batch (64), exported once."""
    path = tmp_path_factory.mktemp("demo") / "m.pte"
    return digits(), export_executorch(digits(), (pixels(4),), path), path


def test_demo_net_fp32_verified_on_one_method_up_to_max_batch(demo):
    model, report, path = demo
    assert report.passed and report.verified and path.exists()
    assert report.path == str(path)
    trials = list(report.errors)
    assert trials[0] == "random, batch 1" and "(max_batch)" in trials[-2]
    assert trials[-1].startswith("example_inputs again")
    for outputs in report.errors.values():
        for e in outputs.values():
            assert e["passed"] and e["max_rel"] <= 1e-4
    # the trap: memory planned for the declared maximum, not for max(example batch, 15)
    assert report.inputs == [("input[0]", [64, 1, 8, 8])]
    assert report.outputs == [("output[0]", [64, 10])]
    assert isinstance(report.arena_bytes, int) and report.arena_bytes >= 64 * 64 * 4
    assert report.layers == (4, 4) and not report.layers_outside  # every conv/linear delegated
    assert report.delegated_ops["aten.convolution"] == 2
    assert report.delegated_ops["aten.linear"] == 2
    assert "aten.convolution" not in report.outside_ops
    assert report.size_bytes["fp32"] == path.stat().st_size
    assert report.latency_ms["fp32"] > report.latency_ms["call overhead"] > 0
    assert report.threads == 1
    assert "folded" in " ".join(report.transformed)
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["arena_bytes"] == report.arena_bytes


def test_batch_max_runs_and_max_plus_one_is_refused(demo):
    model, report, path = demo
    method = load(path)
    for b in (1, 15, 16, 64):  # small before large, on one Method
        x = pixels(b, seed=b)
        with torch.no_grad():
            want = model(x)
        got = method.execute([x])[0]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(RuntimeError):  # documented: the program takes batches 1..max_batch
        method.execute([pixels(65)])


def test_program_loads_and_runs_in_a_fresh_process(demo, tmp_path):
    model, report, path = demo
    x = pixels(9, seed=5)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from executorch.runtime import Runtime
        data = torch.load({str(tmp_path / "expected.pt")!r})
        method = Runtime.get().load_program({str(path)!r}).load_method("forward")
        for x in (data["x"][:1], data["x"]):  # a smaller batch first, on the same Method
            out = method.execute([x])[0]
        err = float((out - data["y"]).abs().max() / data["y"].abs().max())
        print("max_rel", err)
        assert err < 1e-4, err
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max_rel" in done.stdout


def test_same_model_gives_the_same_bytes_and_prints_nothing(tmp_path, capfd):
    a, b = tmp_path / "a.pte", tmp_path / "b.pte"
    capfd.readouterr()
    first = export_executorch(digits(), (pixels(2),), a, max_batch=8)
    export_executorch(digits(), (pixels(2),), b, max_batch=8, verify=False)
    assert a.read_bytes() == b.read_bytes()
    out, err = capfd.readouterr()  # warnings, log lines, the runtime's C++ lines: captured
    assert not out.strip() and not err.strip(), (out + err)[-2000:]
    assert isinstance(first.export_log, str)


def test_demo_net_int8_through_pt2e_xnnpack(tmp_path):
    x = pixels(256)
    y = torch.randint(0, 10, (256,))
    report = export_executorch(digits(), (x[:4],), tmp_path / "m.pte", quantize="int8",
                               calibration=x.split(32), labels=y.split(32), max_batch=32)
    q = report.int8
    assert report.passed and q.passed
    assert (tmp_path / "m.pte").exists() and (tmp_path / "m.int8.pte").exists()
    assert q.path == str(tmp_path / "m.int8.pte")
    assert q.verified_on == ["example_inputs", "held-out", "other batch sizes"]
    assert all(q.sqnr_db[w] >= 20 for w in q.verified_on)
    assert q.heldout_samples == 64 and set(q.accuracy) == {"fp32", "int8"}
    # proof: every conv/linear inside the delegate reads int8 weights, bytes counted
    model = smallnet_digits()
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, nn.Conv2d | nn.Linear))
    assert q.quantized_layers == (4, 4) and q.int8_weight_elements == weights
    assert q.delegated_ops["quantized_decomposed.quantize_per_tensor"] > 0
    assert not q.layers_outside
    assert q.size_bytes["int8"] < q.size_bytes["fp32"]
    assert q.arena_bytes > 0
    assert set(q.latency_ms) == {"fp32", "int8"} and q.latency_batch == 32
    assert q.latency_ms["fp32"] == report.latency_ms["fp32"]
    assert "int8 ExecuTorch program" in str(report)
    data = json.loads(report.to_json())
    assert data["int8"]["passed"] is True


def test_failed_int8_leaves_no_final_file_and_keeps_failed_pte(tmp_path):
    (tmp_path / "m.int8.pte").write_text("an earlier run's file")
    x = pixels(256)
    with pytest.raises(efx.VerificationError) as caught:  # sign-flipped calibration
        export_executorch(digits(), (x[:4],), tmp_path / "m.pte", quantize="int8",
                          calibration=(-x).split(32), max_batch=32)
    assert "example_inputs SQNR" in str(caught.value)
    assert "m.int8.failed.pte" in str(caught.value)
    assert caught.value.code == "sqnr" and caught.value.report.int8.failures
    assert not (tmp_path / "m.int8.pte").exists()
    assert (tmp_path / "m.int8.failed.pte").exists()
    assert (tmp_path / "m.pte").exists()  # the fp32 program passed and is in place


def test_int8_runs_in_sequence_on_one_method_so_stale_state_fails(tmp_path, monkeypatch):
    """The issue's bug (one int8 Method at batch 4, then 9: 12.6 dB; a fresh one: 45.7 dB),
    simulated: a Method whose results go wrong once the batch grows fails the gate."""
    real = ete._load

    class Stale:
        def __init__(self, method):
            self.method, self.last = method, None

        def execute(self, args):
            out = self.method.execute(args)
            grew = self.last is not None and args[0].shape[0] > self.last
            self.last = args[0].shape[0]
            return [o + 0.5 * o.abs().max() for o in out] if grew else out

    monkeypatch.setattr(ete, "_load", lambda path: Stale(real(path)) if
                        str(path).endswith(".int8.pte") else real(path))
    x = pixels(256)
    with pytest.raises(efx.VerificationError) as caught:
        export_executorch(digits(), (x[:4],), tmp_path / "m.pte", quantize="int8",
                          calibration=x.split(32), max_batch=32)
    q = caught.value.report.int8
    assert q.sqnr_db["example_inputs"] >= 20  # the first, small batch is right ...
    assert q.sqnr_db["held-out"] < 20 and q.sqnr_db["other batch sizes"] < 20  # ... then not
    assert {f["where"] for f in q.failures} >= {"held-out", "other batch sizes"}
    assert not (tmp_path / "m.int8.pte").exists() and (tmp_path / "m.int8.failed.pte").exists()


def test_verifier_catches_the_planned_size_trap(tmp_path, monkeypatch):
    """Exported at the example's batch (as a naive exporter would), the program refuses
    batch 16+; the verification runs max_batch and fails, keeping <stem>.failed.pte."""
    monkeypatch.setattr(ete, "_rebatched", lambda inputs, n: inputs)
    (tmp_path / "m.pte").write_text("an earlier run's file")
    with pytest.raises(efx.VerificationError) as caught:
        export_executorch(digits(), (pixels(4),), tmp_path / "m.pte", max_batch=32)
    assert caught.value.code == "runtime_error"
    assert "refused" in str(caught.value) and "m.failed.pte" in str(caught.value)
    assert not (tmp_path / "m.pte").exists() and (tmp_path / "m.failed.pte").exists()
    report = caught.value.report
    assert report.inputs[0][1][0] == 15  # max(example batch, 15): the trap itself
    bad = [f for f in report.failures if f["code"] == "runtime_error"]
    assert bad and all(f["numbers"]["batch"] >= 16 for f in bad)


def test_a_passing_report_means_every_batch_runs(tmp_path):
    """ExecuTorch 1.5.1 makes smallnet_digits at max_batch=16 a program that runs batch 16
    only: the export must refuse it (or, with a fixed ExecuTorch, pass with every batch
    running) — never a passing report for a program that a phone's loop would break."""
    path = tmp_path / "m.pte"
    try:
        export_executorch(digits(), (pixels(4),), path, max_batch=16)
    except efx.VerificationError as exc:
        assert exc.code == "runtime_error" and "try another max_batch" in str(exc)
        assert not path.exists() and (tmp_path / "m.failed.pte").exists()
        return
    method = load(path)
    for b in (1, 4, 16, 3):
        method.execute([pixels(b)])


def test_ck_fc_expanded_net_is_contracted_folded_and_verified(tmp_path):
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CK+FC", r=2).eval()
    report = export_executorch(big, (torch.randn(2, 3, 32, 32),), tmp_path / "m.pte",
                               max_batch=8)
    assert report.passed
    assert any("contracted" in t for t in report.transformed)
    assert report.fold_error is not None and report.fold_error <= 1e-5
    inside, total = report.layers
    assert inside == total == sum(isinstance(m, nn.Conv2d | nn.Linear)
                                  for m in smallnet_7x7().modules())


def test_timm_mobileone_s0(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", pretrained=False, num_classes=10).eval()
    report = export_executorch(model, (torch.randn(1, 3, 64, 64),), tmp_path / "m.pte",
                               max_batch=2)
    assert report.passed
    inside, total = report.layers
    assert inside == total > 0
    assert "folded" in " ".join(report.transformed)  # the branches merged before export


def test_torchvision_mobilenet_v3_small(tmp_path):
    torchvision = pytest.importorskip("torchvision")  # conftest defines its schemas
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    report = export_executorch(model, (torch.randn(1, 3, 64, 64),), tmp_path / "m.pte",
                               max_batch=2)
    assert report.passed and report.layers[0] == report.layers[1]


def test_hugging_face_vit_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    report = export_executorch(model, (torch.randn(2, 3, 32, 32),), tmp_path / "m.pte",
                               max_batch=4)
    assert report.passed
    assert report.outputs == [("output[0]", [4, 10])]  # the logits of ImageClassifierOutput
    assert report.delegated_ops.get("aten.linear", 0) >= 2 * 6  # q, k, v, o, two MLP each
    assert report.outside_ops  # what XNNPACK does not take is listed, not hidden


def test_refusals_before_anything_is_written(tmp_path, monkeypatch):
    x = pixels(4)
    with pytest.raises(efx.ConfigError, match="batch 4 > max_batch=2"):
        export_executorch(digits(), (x,), tmp_path / "m.pte", max_batch=2)
    with pytest.raises(efx.ConfigError, match="method='minmax'"):
        export_executorch(digits(), (x,), tmp_path / "m.pte",
                          quantize=efx.Int8Config(method="percentile"),
                          calibration=pixels(128).split(16))
    with pytest.raises(efx.ConfigError, match="^export_executorch: the calibration batches"):
        export_executorch(digits(), (x,), tmp_path / "m.pte", quantize="int8",
                          calibration=[torch.zeros(16, 1, 8, 8)] * 8)
    assert not list(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # as if not installed
    with pytest.raises(efx.ConfigError, match=r"pip install 'expandfx\[executorch\]'"):
        export_executorch(digits(), (x,), tmp_path / "m.pte")


def test_cli_exports_an_executorch_program(tmp_path):
    from expandfx.cli import main
    from expandfx.models import smallnet_7x7

    torch.save(smallnet_7x7().state_dict(), tmp_path / "s.pt")
    code = main(["export", "smallnet_7x7", "--weights", str(tmp_path / "s.pt"), "--out",
                 str(tmp_path / "s.pte"), "--target", "executorch", "--max-batch", "4",
                 "--report", str(tmp_path / "r.json")])
    assert code == 0 and (tmp_path / "s.pte").stat().st_size > 1000
    assert '"passed": true' in (tmp_path / "r.json").read_text()
