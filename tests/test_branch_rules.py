"""The branch rules (ACNet, RepVGG) through the whole product: expand, train, contract, export.

Each rule is one file in ``expandfx/rules``; these tests are what adding a rule asks for
(``docs/design.md §8``).
"""

from __future__ import annotations

import re

import pytest
import torch
from support import randomize, rel_err, sgd_steps
from torch import nn

import expandfx as efx
from expandfx.models import MobileNetV1, smallnet_7x7
from expandfx.rules import RULES, Rule, acnet, register_rule, repvgg, unregister_rule
from expandfx.rules.factors import conv_factor


def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return MobileNetV1(num_classes=10, width_mult=0.25).eval()


@pytest.mark.parametrize("rule", ["ACNet", "RepVGG", "repvgg+FC", "ACNet+fc", "OREPA"])
def test_trained_branch_model_contracts_exactly(rule: str) -> None:
    model = mobilenet()
    big = efx.expand(model, rule, include="features.*").train()
    x = torch.randn(4, 3, 32, 32)
    sgd_steps(big, x, steps=3)
    big.eval()
    small = efx.contract(big)
    assert type(small) is type(model)
    assert list(small.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert rel_err(big(x), small(x)) < 1e-5


def test_state_dict_keys_name_the_branches() -> None:
    big = efx.expand(mobilenet(), "RepVGG")
    keys = [k for k in big.state_dict() if k.startswith("features.1.depthwise.0.")]
    assert keys == ["features.1.depthwise.0.branches.kxk.weight",
                    "features.1.depthwise.0.branches.1x1.weight"]
    stride2 = big.get_submodule("features.2.depthwise.0")
    assert list(stride2.branches) == ["kxk", "1x1"]  # stride 2: no identity branch
    assert list(big.get_submodule("features.1.depthwise.0").branches) == ["kxk", "1x1",
                                                                          "identity"]


def test_checkpoint_round_trip_between_fresh_expansions() -> None:
    big = efx.expand(mobilenet(), "ACNet")
    randomize(big, seed=3)
    fresh = efx.expand(mobilenet(), "ACNet")
    fresh.load_state_dict(big.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(big.eval()(x), fresh.eval()(x))


@pytest.mark.parametrize("rule", ["ACNet", "RepVGG", "OREPA"])
def test_preserve_init_keeps_the_function(rule: str) -> None:
    model = mobilenet()
    randomize(model, seed=1)
    big = efx.expand(model, RULES[rule](init="preserve")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), big(x)) < 1e-5


@pytest.mark.parametrize("mode", ["sequential", "collapsed"])
def test_both_modes_give_the_same_gradients(mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    ref = acnet.build(conv, 1, "preserve").double()
    randomize(ref, seed=2)
    block = acnet.build(conv, 1).double()
    block.load_state_dict(ref.state_dict())
    ref.mode, block.mode = "sequential", mode
    grads = []
    for b in (ref, block):
        b(x).square().sum().backward()
        grads.append([p.grad for p in b.parameters()])
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-12


def test_learning_rates_divide_by_the_factors_a_step_moves() -> None:
    big = efx.expand(mobilenet(), "RepVGG+FC", include=["features.*", "classifier"])
    groups = efx.param_groups(big, lr=0.1)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    block = big.get_submodule("features.1.depthwise.0")  # kxk + 1x1 + identity
    assert by_param[id(block.branches.kxk.weight)] == pytest.approx(0.05)
    fc = big.get_submodule("classifier")
    assert by_param[id(fc.layers[0].weight)] == pytest.approx(0.1 / 3)


@pytest.mark.parametrize("conv, rule, reason", [
    (nn.Conv2d(4, 4, 3), acnet, "padding \\(0, 0\\) is smaller than half"),
    (nn.Conv2d(4, 4, (3, 5), padding=2), acnet, "not square"),
    (nn.Conv1d(4, 4, 3, padding=1), acnet, "2-D convolutions, not 1-D"),
    (nn.Conv2d(4, 4, 4, padding=2), repvgg, "even size"),
    (nn.Conv2d(4, 4, 1), repvgg, "already 1×…×1"),
    (nn.Conv2d(4, 4, 3, padding="same"), None, None),
])
def test_skip_reasons(conv: nn.Module, rule, reason: str | None) -> None:
    if rule is None:
        assert acnet.skip_reason(conv) is None and repvgg.skip_reason(conv) is None
    else:
        assert rule.skip_reason(conv) is not None
        assert re.search(reason, rule.skip_reason(conv))


def test_plan_shows_branch_params_and_reasons() -> None:
    p = efx.plan(smallnet_7x7(), "RepVGG", example_inputs=(torch.randn(1, 3, 32, 32),))
    conv = next(row for row in p.rows if row.path == "features.0")
    assert conv.rule == "RepVGG"
    assert conv.params_after == conv.params_before + 3 * 8  # + a bias-free 1x1 (3 → 8)
    assert all(row.reason == "rule RepVGG does not apply to Linear" for row in p.skipped)


def test_two_rules_for_one_kind_are_refused() -> None:
    with pytest.raises(efx.ConfigError, match=r"conv layers \['ACNet', 'CL'\]"):
        efx.expand(mobilenet(), "CL+ACNet")


def test_plus_init_refuses_branch_blocks_by_path() -> None:
    big = efx.expand(mobilenet(), "RepVGG")
    with pytest.raises(efx.ConfigError, match=r"\['features.0.0'.*parallel branches"):
        efx.nonlinear_counterpart(big, "relu")


def test_contracted_branch_model_exports_and_verifies(tmp_path) -> None:
    big = efx.expand(mobilenet(), "ACNet").eval()
    randomize(big, seed=4)
    report = efx.export_onnx(big, (torch.randn(2, 3, 32, 32),), tmp_path / "acnet.onnx")
    assert report.verified and report.structure_matches
    assert report.fold_error is not None and report.fold_error <= 1e-5


def test_a_user_rule_is_one_registration() -> None:
    """A rule from user code: a conv becomes two parallel copies of itself, halved."""
    def build(conv, r, init="default", *, path="", device=None):
        a, b = (conv_factor(conv, conv.in_channels, conv.out_channels, conv.kernel_size,
                                  stride=conv.stride, padding=conv.padding,
                                  dilation=conv.dilation, device=device) for _ in range(2))
        return efx.ExpandedBlock(conv, {"a": a, "b": b}, rule="Twin", r=r)

    efx.register_rule(efx.Rule("Twin", "conv", lambda conv: None, build, "two copies, summed"))
    try:
        model = smallnet_7x7().eval()
        big = efx.expand(model, "twin")
        assert efx.plan(model, "Twin").expanded
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert rel_err(big(x), efx.contract(big)(x)) < 1e-5
        with pytest.raises(efx.ConfigError, match="already registered"):
            register_rule(Rule("TWIN", "conv", lambda conv: None, build))
    finally:
        unregister_rule("Twin")
    assert "Twin" not in RULES
