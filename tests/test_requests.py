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
