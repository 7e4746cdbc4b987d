"""The guards around blocks: what a rule builds, what a user edits, what a checkpoint holds.

Each test is a way to get a silently wrong model that expandfx must refuse (or handle)."""

from __future__ import annotations

import pytest
import torch
from support import rel_err
from torch import nn

import expandfx as efx
from expandfx.models import MobileNetV1
from expandfx.rules import cl, repvgg


def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return MobileNetV1(num_classes=10, width_mult=0.25)


def test_padding_edited_after_construction_is_read_live() -> None:
    """Dilated backbones set ``conv.padding`` / ``conv.dilation`` after construction; the
    cached ``_reversed_padding_repeated_twice`` then lies for zero padding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    conv.padding, conv.dilation = (2, 2), (2, 2)
    x = torch.randn(1, 4, 9, 9)
    for build in (cl.build, repvgg.build):
        block = build(conv, 2, init="preserve")
        block.mode = "sequential"
        with torch.no_grad():
            y = block(x)
            assert y.shape == conv(x).shape and rel_err(conv(x), y) < 1e-5
            assert rel_err(y, block.contract()(x)) < 1e-5


@pytest.mark.parametrize("original, layers, match", [
    (nn.Conv2d(4, 8, 5, padding=2), [nn.Conv2d(4, 8, 3, padding=2)],
     r"\(8, 4, 3, 3\).*\(8, 4, 5, 5\)"),
    (nn.Conv2d(4, 8, 3, padding=1, bias=False), [nn.Conv2d(4, 8, 3, padding=1)], r"True.*False"),
    (nn.Conv2d(4, 8, 3, padding=1), [nn.Conv2d(4, 8, 3, padding=2)], "geometry"),
    (nn.Conv2d(4, 8, 3), [nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, padding=1)], "do not fold"),
])
def test_a_block_that_is_not_a_map_of_its_layer_is_refused(original, layers, match) -> None:
    with pytest.raises(efx.ContractionError, match=match):
        efx.ExpandedBlock(original, layers, rule="X", r=1)


def test_a_wrong_user_rule_is_refused_naming_the_layer() -> None:
    def build(conv, r, init="default", *, path="", device=None):
        return efx.ExpandedBlock(conv, [nn.Conv2d(conv.in_channels, conv.out_channels, 1)],
                                 rule="Pointwise", r=r)

    efx.register_rule(efx.Rule("Pointwise", "conv", lambda conv: None, build))
    try:
        with pytest.raises(efx.ConfigError, match=r"rule 'Pointwise' could not build a block "
                                                  r"for 'features.0.0'.*Fix the rule"):
            efx.expand(mobilenet(), "Pointwise")
    finally:
        efx.unregister_rule("Pointwise")


def test_a_failed_inplace_expand_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 8, 1))
    with pytest.raises(efx.ConfigError, match="cannot keep '2' exact"):
        efx.expand(model, efx.CL(r=0.5, init="preserve"), inplace=True)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d


def test_edited_topologies_do_not_contract() -> None:
    big = efx.expand(mobilenet(), "RepVGG")
    block = big.get_submodule("features.1.depthwise.0")
    block.branches["identity"] = nn.Conv2d(8, 8, 1, groups=8)  # would never run
    with pytest.raises(efx.ContractionError, match="was edited after expansion"):
        efx.contract(big)
    chain = efx.expand(mobilenet(), "CL", r=2)
    chain.features[0][0].layers.append(nn.Conv2d(8, 8, 1))
    with pytest.raises(efx.ContractionError, match="was edited after expansion"):
        efx.contract(chain)


@pytest.mark.parametrize("saved, loaded, theirs, ours", [
    ("RepVGG", "ACNet", r"branches \['1x1', 'kxk'\]", r"branches \['1xk', 'kx1', 'kxk'\]"),
    ("CL", "RepVGG", "a chain of layers", r"branches \['1x1', 'kxk'\]"),
    ("ACNet", "CL", r"branches \['1xk', 'kx1', 'kxk'\]", "a chain of layers"),
])
def test_a_checkpoint_of_another_rule_says_so(saved, loaded, theirs, ours) -> None:
    src = efx.expand(mobilenet(), saved, r=2 if saved == "CL" else None)
    dst = efx.expand(mobilenet(), loaded, r=2 if loaded == "CL" else None, include=["features.0.0"])
    label = f"{loaded}, r=2" if loaded == "CL" else loaded  # a branch rule has no rate
    with pytest.raises(RuntimeError, match=f"'features.0.0': the checkpoint holds {theirs} but "
                                           f"this block \\({label}\\) has {ours}"):
        dst.load_state_dict(src.state_dict())
