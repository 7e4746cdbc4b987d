"""Conformance over the models users bring beyond classification (issue 11): Hugging Face
transformers from tiny configs (BERT, GPT-2, ViT, the Whisper encoder, Wav2Vec2 with its
weight-normed conv), torchvision detection (compared on backbone and head outputs) and a
Conv3d video model. Per layer and end to end exact, class and keys kept; BERT, ViT and
the Whisper encoder export to ONNX and verify."""

from __future__ import annotations

import warnings

import pytest
import torch
from conformance import FAMILIES, roundtrip_record

import expandfx as efx

pytest.importorskip("transformers", reason="transformers not installed: skipped")
pytest.importorskip("torchvision", reason="torchvision not installed: skipped")

# The rules run here (the benchmark runs every rule of each family); kept cheap for CI.
TESTED = {"hf/bert": ("FC",), "hf/gpt2": ("FC",), "hf/vit": ("CL", "FC"),
          "hf/whisper_encoder": ("CL", "FC"), "hf/wav2vec2": ("CL", "FC"),
          "tv/fasterrcnn_mobilenet_v3_large_fpn": ("CK",), "tv/retinanet_resnet50_fpn": ("CK",),
          "tv/ssdlite320_mobilenet_v3_large": ("CK",), "tv/mc3_18 (video, Conv3d)": ("CK",)}
EXPORTED = {"hf/bert": "FC", "hf/vit": "FC", "hf/whisper_encoder": "CL"}


@pytest.mark.parametrize("name", list(TESTED))
def test_family_roundtrip_is_exact(name, tmp_path):
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build().eval()
    x = family.inputs()
    for rule in TESTED[name]:
        rec = roundtrip_record(model, rule, 2, x, probe=family.probe)
        assert rec["expanded"] > 0 and rec["layers_checked"] == rec["expanded"], rule
        assert rec["layer_error"] <= 1e-5, (rule, rec["layer_error"])
        assert rec["output_error"] <= 1e-5, (rule, rec["output_error"])
        assert rec["keys_equal"] and rec["class_equal"] and rec["blocks_left"] == 0
        if EXPORTED.get(name) == rule:
            report = efx.export_onnx(rec["expanded_model"], x, tmp_path / "m.onnx")
            assert report.passed and report.structure_matches


def test_gpt2_contracts_to_conv1d_and_loads_strictly():
    from transformers import GPT2LMHeadModel

    family = FAMILIES["hf/gpt2"]
    model = family.build().eval()
    ids = family.inputs()
    p = efx.plan(model, "FC", 2, example_inputs=ids)
    rows = {r.path: r for r in p.rows}
    assert p.recorded and rows["transformer.h.0.attn.c_attn"].layer == "Conv1D(32→96)"
    assert rows["transformer.h.0.attn.c_attn"].call_sites == 1
    assert "tied to transformer.wte.weight" in rows["lm_head"].reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = efx.expand(model, "FC", r=2, example_inputs=ids)
    small = efx.contract(big)
    conv = small.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)
    GPT2LMHeadModel(model.config).load_state_dict(small.state_dict(), strict=True)


def test_wav2vec2_positional_conv_is_skipped_with_its_reason():
    model = FAMILIES["hf/wav2vec2"].build()
    row = next(r for r in efx.plan(model, "CL", 2).rows if r.path.endswith("pos_conv_embed.conv"))
    assert row.rule is None and "parametrizations on weight (_WeightNorm)" in row.reason
