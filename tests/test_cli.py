"""The command line, run as a user runs it: a subprocess, exit codes, key output lines."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import expandfx as efx
from expandfx.models import smallnet_7x7


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expandfx", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def test_help_explains_the_commands():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("demo", "plan", "check", "export", "MODEL", "package.module:factory"):
        assert word in out.stdout


def test_rules_lists_every_registered_rule_with_its_kind():
    from expandfx.rules import RULES

    out = cli("rules")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(RULES)
    assert {line.split()[1] for line in lines} == {"conv", "linear"}
    assert "options: k, norm" in next(line for line in lines if line.startswith("MobileOne"))


def test_plan_prints_the_table():
    out = cli("plan", "smallnet_7x7", "--rule", "CK+FC", "--r", "4", "--input", "1,3,32,32")
    assert out.returncode == 0, out.stderr
    assert "features.0" in out.stdout and "CK" in out.stdout and "total" in out.stdout


def test_plan_of_a_factory_by_import_path():
    out = cli("plan", "expandfx.models:TinyResNet", "--rule", "CL", "--r", "2",
              "--input", "1,3,32,32")
    assert out.returncode == 0, out.stderr
    assert "layer1.conv1" in out.stdout


def test_check_passes_with_figures(tmp_path):
    out = cli("check", "cnn1d", "--rule", "CK+FC", "--r", "2", "--out", str(tmp_path / "c.onnx"))
    assert out.returncode == 0, out.stderr
    assert "contract(big) vs big" in out.stdout and "PASS" in out.stdout
    assert "onnxruntime [disabled]" in out.stdout and (tmp_path / "c.onnx").is_file()


def test_export_of_an_expanded_checkpoint(tmp_path):
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CL", r=2)
    ckpt = tmp_path / "big.pt"
    torch.save(big.state_dict(), ckpt)
    args = ["export", "smallnet_7x7", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"),
            "--report", str(tmp_path / "r.json")]
    missing_rule = cli(*args)
    assert missing_rule.returncode == 2 and "--rule" in missing_rule.stderr
    out = cli(*args, "--rule", "CL", "--r", "2")
    assert out.returncode == 0, out.stderr
    assert "contracted 3 expanded block(s)" in out.stdout and "verdict: PASS" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["structure_matches"]


def test_export_of_an_expanded_and_companded_checkpoint(tmp_path):
    big = efx.compand(efx.expand(smallnet_7x7(), "CL", r=2), learnable="layer")
    ckpt = tmp_path / "bigc.pt"
    torch.save(big.state_dict(), ckpt)
    out = cli("export", "smallnet_7x7", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"),
              "--rule", "CL", "--r", "2")
    assert out.returncode == 0, out.stderr
    assert "contracted 3 expanded block(s)" in out.stdout and "baked" in out.stdout


def test_export_of_a_companded_checkpoint_checks_psi(tmp_path):
    model = efx.compand(smallnet_7x7(), psi="erf")
    ckpt = tmp_path / "c.pt"
    torch.save(model.state_dict(), ckpt)
    base = ["export", "smallnet_7x7", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx")]
    wrong = cli(*base)  # psi defaults to arctan: refused, never silently wrong
    assert wrong.returncode == 2 and "psi='erf'" in wrong.stderr
    assert cli(*base, "--psi", "erf").returncode == 0


def test_demo_quick_writes_its_outputs(tmp_path):
    out = cli("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PASS" in out.stdout and "onnxruntime (all optimizations)" in out.stdout
    for name in ("smallnet_digits.onnx", "report.json", "curves.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["contract_rel_error"] <= 1e-5 and report["onnx"]["passed"]
    assert report["params_test"] < report["params_train"]
    int8 = report["int8"]  # the deployed model in int8 beside fp32: accuracy, size, latency
    assert int8["passed"] and (tmp_path / "demo" / "smallnet_digits_folded.int8.onnx").is_file()
    assert int8["size_bytes"]["int8"] < int8["size_bytes"]["fp32"] and int8["latency_ratio"] > 0
    assert abs(int8["accuracy"]["int8"] - int8["accuracy"]["fp32"]) <= 0.02  # 3 epochs only
    assert "int8 (QDQ, per-channel)" in out.stdout and "SQNR" in out.stdout


def test_export_of_a_companded_compact_model_with_a_layers_submodule(tmp_path):
    factory = tmp_path / "nets_with_layers.py"
    factory.write_text(
        "import torch.nn as nn\n"
        "class Enc(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())\n"
        "    def forward(self, x):\n"
        "        return self.layers(x)\n"
        "def make():\n"
        "    m = nn.Sequential()\n"
        "    m.enc = Enc()\n"
        "    return m\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_with_layers", factory)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = tmp_path / "comp.pt"
    torch.save(efx.compand(mod.make()).state_dict(), ckpt)
    out = subprocess.run([sys.executable, "-m", "expandfx", "export", "nets_with_layers:make",
                          "--weights", str(ckpt), "--input", "1,3,8,8", "--out",
                          str(tmp_path / "c.onnx")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**__import__("os").environ,
                                                         "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "baked 1 companded weight(s)" in out.stdout


def test_check_strict_fails_when_the_rule_expands_nothing(tmp_path):
    out = cli("check", "cnn1d", "--rule", "ACNet", "--strict", "--out", str(tmp_path / "x.onnx"))
    assert out.returncode == 2
    assert "expanded no layer of CNN1D" in out.stderr and "2-D convolutions" in out.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_export_int8_with_data_and_labels(tmp_path):
    from expandfx.demo import digits
    from expandfx.models import smallnet_digits

    torch.manual_seed(0)
    ckpt, data = tmp_path / "m.pt", tmp_path / "x.pt"
    torch.save(smallnet_digits().state_dict(), ckpt)
    xtr, ytr, _, _ = digits()
    torch.save({"x": xtr[:320], "y": ytr[:320]}, data)
    args = ["export", "smallnet_digits", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"),
            "--int8", "--report", str(tmp_path / "r.json")]
    out = cli(*args, "--data", str(data), "--calibrate", "256")
    assert out.returncode == 0, out.stderr
    assert "int8 export" in out.stdout and "held-out accuracy" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())["int8"]
    assert report["passed"] and report["heldout_samples"] == 64
    assert report["calibration_batches"] == 8 and report["sqnr_db"]["held-out"] > 20
    assert (tmp_path / "m.int8.onnx").stat().st_size < (tmp_path / "m.onnx").stat().st_size
    too_few = cli(*args, "--data", str(data), "--calibrate", "320")
    assert too_few.returncode == 2 and "at least one held out" in too_few.stderr
    random = cli(*args)  # no --data: random inputs, said so
    assert random.returncode == 0 and "smoke test" in random.stdout


def test_a_branch_rule_needs_no_r_on_the_command_line():
    out = cli("plan", "smallnet_7x7", "--rule", "RepVGG")
    assert out.returncode == 0, out.stderr
    assert "RepVGG()" in out.stdout and "r=" not in out.stdout.split("RepVGG()")[1][:20]
    refused = cli("plan", "smallnet_7x7", "--rule", "RepVGG", "--r", "4")
    assert refused.returncode == 2 and "--r 4.0 would be ignored" in refused.stderr
    assert "Drop --r," in refused.stderr and " r=" not in refused.stderr
