"""The README's promise: its API screen runs as written (on an in-repo model, real ONNX)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import expandfx as efx
from expandfx.linear.costs import param_count
from expandfx.models import smallnet_7x7

README = Path(__file__).parents[1] / "README.md"


def api_screen() -> str:
    """The python block under "The API in one screen", with the loop's ``...`` dropped."""
    section = README.read_text().split("## The API in one screen", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "...  loss = " in code  # the one placeholder line; anything else must run as is
    return code.replace("...  loss = ", "loss = ")


def test_the_readme_api_screen_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # the screen writes small.onnx and small.int8.onnx
    gen = torch.Generator().manual_seed(0)
    # 8 batches of 32: the last 2 (64 samples, Int8Config.min_samples) are held out to verify
    batches = [(torch.randn(32, 3, 32, 32, generator=gen),) for _ in range(8)]
    scope = {"torch": torch, "MyCompactNet": smallnet_7x7, "x": batches[0][0][:8],
             "y": torch.randint(0, 10, (8,), generator=gen), "criterion": F.cross_entropy,
             "batches": batches}
    exec(compile(api_screen(), str(README), "exec"), scope)  # noqa: S102 (our own README)

    model, big, small, deployed = (scope[k] for k in ("model", "big", "small", "deployed"))
    assert "CK(r=4)" in capsys.readouterr().out  # the printed plan
    assert type(small) is type(model) and list(small.state_dict()) == list(model.state_dict())
    assert any(isinstance(m, efx.ExpandedBlock) for m in big.modules())
    assert param_count(big) > param_count(model) == param_count(small)
    assert param_count(deployed) <= param_count(small)
    assert torch.isfinite(scope["loss"]) and scope["loss"].requires_grad
    assert (tmp_path / "small.onnx").stat().st_size > 0
    assert (tmp_path / "small.int8.onnx").stat().st_size > 0


def test_the_prepared_accelerator_run_names_what_exists(capsys):
    """``benchmarks/gpu_run.sh`` (the one command a session with a GPU runs; it cannot run
    here) is valid bash, names test files and a benchmark that exist, and passes flags the
    benchmark's parser lists — so it does not rot while no device is lent."""
    import re
    import subprocess
    import sys

    root = README.parent
    script = root / "benchmarks" / "gpu_run.sh"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    named = set(re.findall(r"(?:tests|benchmarks)/[\w/]+\.py", text))
    assert {"tests/test_execution.py", "benchmarks/training_speed.py"} <= named
    assert all((root / p).is_file() for p in named)
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import training_speed
    finally:
        sys.path.remove(str(root / "benchmarks"))
    with pytest.raises(SystemExit) as done:
        training_speed.main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    command = next(line for line in text.splitlines()
                   if "benchmarks/training_speed.py" in line and not line.startswith("#"))
    passed = re.findall(r"--[a-z]+", command)
    assert passed and all(flag in listed for flag in passed)
