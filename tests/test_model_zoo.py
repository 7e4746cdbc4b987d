"""Conformance over torchvision and timm models (random init): every applicable rule is
exact layer by layer and end to end, keeps the class and the keys; a subset exports to
ONNX and verifies. Skipped, with the reason, where torchvision / timm are not installed."""

from __future__ import annotations

import warnings

import pytest
import torch
from conformance import ZOO, ZOO_INPUT, applicable_rules, build_zoo_model, roundtrip_record
from torch import nn

import expandfx as efx

pytest.importorskip("torchvision", reason="torchvision not installed: model-zoo tests skipped")
pytest.importorskip("timm", reason="timm not installed: model-zoo tests skipped")

EXPORTED = {"resnet18": "CL", "mobilenet_v3_small": "CK", "shufflenet_v2_x0_5": "CL",
            "timm/efficientnet_b0": "CK", "timm/vit_tiny": "FC"}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_roundtrip_is_exact(name, tmp_path):
    torch.manual_seed(0)
    model = build_zoo_model(name).eval()
    rules = applicable_rules(model)
    assert "CL" in rules  # every zoo model has convolutions
    x = torch.randn(ZOO_INPUT)
    for rule in rules:
        rec = roundtrip_record(model, rule, 2, x)
        assert rec["expanded"] > 0
        assert rec["layer_error"] <= 1e-5, (rule, rec["layer_error"])
        assert rec["output_error"] <= 1e-5, (rule, rec["output_error"])
        assert rec["keys_equal"] and rec["class_equal"] and rec["blocks_left"] == 0
        assert rec["params_test"] == sum(p.numel() for p in model.parameters())
        if EXPORTED.get(name) == rule:
            report = efx.export_onnx(rec["expanded_model"], (x,), tmp_path / "m.onnx")
            assert report.passed and report.structure_matches


def test_timm_conv_subclasses_are_reported_and_left_alone():
    from timm.layers import Conv2dSame, StdConv2d

    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), StdConv2d(4, 4, 3),
                          nn.Conv2d(4, 4, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        big = efx.expand(model, "CL", r=2)
    text = " ".join(str(w.message) for w in caught)
    assert "'0': Conv2dSame subclasses Conv2d and overrides forward" in text
    assert "'2': StdConv2d subclasses Conv2d and overrides forward" in text
    assert type(big[0]) is Conv2dSame and type(big[2]) is StdConv2d
    assert isinstance(big[3], efx.ExpandedBlock)
    x = torch.randn(1, 3, 17, 17)
    with torch.no_grad():
        assert torch.allclose(efx.contract(big)(x), big(x), atol=1e-5)


def test_timm_linear_head_is_a_linear_left_alone_as_the_output_layer():
    model = build_zoo_model("timm/mobilenetv3_small_100").eval()
    row = next(r for r in efx.plan(model, "FC", 2).rows if r.path == "classifier")
    assert row.rule is None and "the model's output layer" in row.reason
    big = efx.expand(model, "FC", 2, include=["classifier"])  # named exactly: expanded
    assert isinstance(big.classifier, efx.ExpandedBlock)
    small = efx.contract(big)
    assert type(small.classifier) is type(model.classifier)  # timm's Linear again
