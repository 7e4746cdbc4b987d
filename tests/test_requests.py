"""Every request honoured or refused (issue 30): checkpoints diagnosed without a raw wall
after the diagnosis, hub saving of an expanded model warned, nothing claimed not done."""

from __future__ import annotations

import warnings

import pytest
import torch

import expandfx as efx
from expandfx.errors import ExpandFXWarning
from expandfx.models import smallnet_7x7


def test_checkpoint_of_another_r_gives_the_diagnosis_and_nothing_raw():
    ckpt = efx.expand(smallnet_7x7(), "CL", r=2).state_dict()
    keys = list(ckpt)
    with pytest.raises(RuntimeError) as err:
        efx.expand(smallnet_7x7(), "CL", r=4).load_state_dict(ckpt)
    lines = str(err.value).splitlines()
    assert len(lines) == 4  # torch's header and one diagnosis per block
    assert all("saved from another expansion" in line for line in lines[1:])
    assert "size mismatch" not in str(err.value)
    assert list(ckpt) == keys  # the caller's checkpoint is not changed


def test_hub_saving_of_an_expanded_model_warns_and_contract_removes_it(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = efx.expand(model, "FC", r=2, example_inputs=(ids,))
    with pytest.warns(ExpandFXWarning, match=r"save_pretrained: BertModel holds expanded blocks"
                                             r".*contract first: efx.contract\(model\)"):
        big.save_pretrained(tmp_path / "big")
    assert (tmp_path / "big" / "config.json").exists()  # still saved: the Trainer resumes it
    small = efx.contract(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExpandFXWarning)  # the compact model saves silently
        small.save_pretrained(tmp_path / "small")
    again = BertModel.from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, big(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


def test_console_script_loads_a_factory_from_the_current_directory(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("expandfx")
    script = str(script) if script.exists() else shutil.which("expandfx")
    if script is None:
        pytest.skip("the expandfx console script is not installed")
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))\n")
    done = subprocess.run([script, "plan", "mymodels:make", "--input", "1,3,16,16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Conv2d(3→8, k3, p1)" in done.stdout and "CL(r=4)" in done.stdout


def test_cli_export_takes_the_key_of_a_training_checkpoint(tmp_path):
    from expandfx.cli import main

    big = efx.expand(smallnet_7x7(), "CL", r=2)
    torch.save({"model": big.state_dict(), "epoch": 3}, tmp_path / "c.pt")
    code = main(["export", "smallnet_7x7", "--weights", str(tmp_path / "c.pt"), "--key",
                 "model", "--rule", "CL", "--r", "2", "--out", str(tmp_path / "m.onnx")])
    assert code == 0 and (tmp_path / "m.onnx").exists()
