"""Per-branch normalization (``norm=None | "scale" | "bn"``) of the branch rules.

The acceptance of issue 19: every rule × norm round-trips exactly after real SGD steps in
training mode (same class and keys); collapsed and sequential gradients agree in float64
where collapsed applies; ``norm="bn"`` refuses collapsed training and contracts, in eval
mode, to the compact layer with its running statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import randomize, rel_err, sgd_steps
from torch import nn

import expandfx as efx
from expandfx.rules import RULES, dbb, mobileone, repvgg

BRANCH_RULES = ["RepVGG", "ACNet", "DBB", "MobileOne"]
NORMS = [None, "scale", "bn"]


def net() -> nn.Module:
    """Biased convs (plain, grouped, strided) between a BN and ReLUs, and a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rule", BRANCH_RULES)
def test_trained_in_training_mode_contracts_exactly(rule: str, norm: str | None) -> None:
    model = net().eval()
    big = efx.expand(model, RULES[rule](norm=norm)).train()
    x = torch.randn(16, 3, 8, 8)
    sgd_steps(big, x, steps=3)
    if norm == "bn":  # the steps moved the BNs' running statistics and affine parameters
        bns = [m for n, m in big.named_modules() if ".branches." in n
               and isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.num_batches_tracked.item() >= 3 for m in bns)
        assert any((m.running_mean.abs() > 1e-3).any() for m in bns)
    big.eval()
    small = efx.contract(big)
    assert type(small) is type(model)
    assert list(small.state_dict()) == list(model.state_dict())
    assert all(type(a) is type(b) for a, b in zip(small.modules(), model.modules(), strict=True))
    with torch.no_grad():
        err = rel_err(big(x), small(x))
    assert err <= 1e-5


@pytest.mark.parametrize("norm", [None, "scale"])
@pytest.mark.parametrize("rule", BRANCH_RULES)
def test_collapsed_and_sequential_gradients_agree_in_float64(rule: str, norm) -> None:
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3).double()
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    blocks = []
    for mode in ("sequential", "collapsed"):
        block = RULES[rule].build(conv, 1, norm=norm).double()
        if blocks:
            block.load_state_dict(blocks[0].state_dict())
        else:
            randomize(block, seed=2)
        block.mode = mode
        block(x).square().sum().backward()
        blocks.append(block)
    pairs = [(a, b) for a, b in zip(blocks[0].parameters(), blocks[1].parameters(), strict=True)
             if a.requires_grad]
    assert len(pairs) >= 3
    for a, b in pairs:
        assert (a.grad - b.grad).abs().max().item() <= 1e-10 * max(1.0, a.grad.abs().max())


@pytest.mark.parametrize("rule", BRANCH_RULES)
def test_bn_refuses_collapsed_training_and_auto_runs_the_branches(rule: str) -> None:
    with pytest.raises(efx.ConfigError, match=r"collapsed.*refused.*training mode.*not a "
                                              r"linear map"):
        efx.expand(net(), RULES[rule](norm="bn"), mode="collapsed")
    big = efx.expand(net(), RULES[rule](norm="bn")).train()
    block = big[0]
    x = torch.randn(4, 3, 8, 8)
    assert block.batch_statistics() and block.resolve_mode(x) == "sequential"
    with pytest.raises(efx.ConfigError, match="mode='collapsed' is refused"):
        efx.set_mode(big, "collapsed")
    big.eval()  # running statistics: linear, so collapsed is allowed and exact
    efx.set_mode(big, "collapsed")
    with torch.no_grad():
        collapsed = big(x)
        efx.set_mode(big, "sequential")
        assert rel_err(big(x), collapsed) < 1e-5
    efx.set_mode(big, "collapsed")
    big.train()  # collapsed set in eval mode, then training: the forward refuses
    with pytest.raises(efx.ConfigError, match="training mode"):
        big(x)


def test_bn_contract_uses_running_statistics_in_training_mode_too() -> None:
    big = efx.expand(net(), efx.RepVGG(norm="bn")).train()
    sgd_steps(big, torch.randn(16, 3, 8, 8), steps=2)
    block = big[0]
    small = block.contract()  # block still in training mode
    assert small.training
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(block.eval()(x), small(x)) <= 1e-5


def test_bn_branches_run_each_norm_on_its_branch() -> None:
    """In training mode every branch output is batch-normalized on its own (the published
    block), so the block is not the sum of the raw branches."""
    block = repvgg.build(nn.Conv2d(4, 4, 3, padding=1), norm="bn").train()
    x = torch.randn(32, 4, 6, 6) * 3 + 1
    with torch.no_grad():
        y = block(x)
        expect = sum(nn.functional.batch_norm(
            branch[0](x) if len(branch) > 1 else x, None, None, branch[-1].weight,
            branch[-1].bias, training=True) for branch in block.branches.values())
    assert rel_err(expect, y) < 1e-5
    assert all(block.get_submodule(p).bias is None for p in block.factor_paths
               if isinstance(block.get_submodule(p), nn.Conv2d))


@pytest.mark.parametrize("rule", BRANCH_RULES)
def test_scale_init_and_preserve(rule: str) -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    block = RULES[rule].build(conv, 1, norm="scale")
    n_branches = len(block.branches)
    for branch in block.branches.values():
        scale = branch[-1]
        assert scale.groups == 4 and scale.bias is None
        assert torch.allclose(scale.weight, torch.full_like(scale.weight,
                                                            1 / math.sqrt(n_branches)))
    model = net()
    randomize(model, seed=1)
    model.eval()
    big = efx.expand(model, RULES[rule](norm="scale", init="preserve")).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(model(x), big(x)) < 1e-5


def test_refusals_name_the_layer_and_the_way_out() -> None:
    bias_free = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    with pytest.raises(efx.ConfigError, match=r"bias-free layer '0'.*norm='scale'"):
        efx.expand(bias_free, efx.RepVGG(norm="bn"))
    with pytest.raises(efx.ConfigError, match=r"ACNet\(init='preserve', norm='bn'\): "
                                              r"init='preserve' with norm='bn' cannot hold.*"
                                              r"Use init='default'"):
        efx.ACNet(norm="bn", init="preserve")
    with pytest.raises(efx.ConfigError, match=r"RepVGG\(norm='batch'\): norm must be one of"):
        efx.RepVGG(norm="batch")
    with pytest.raises(efx.ConfigError, match=r"expands no layer with a branch rule"):
        efx.expand(net(), "CL", norm="scale")  # the deprecated keyword, refused as before
    with pytest.raises(efx.ConfigError, match=r"CL\(norm='scale'\): CL takes no option"):
        efx.CL(norm="scale")


def test_norm_applies_to_the_branch_rule_of_a_combination() -> None:
    big = efx.expand(net(), efx.RepVGG(norm="bn") + efx.FC(), include=["0", "3", "5", "8"])
    assert isinstance(big[0].branches["kxk"][1], nn.BatchNorm2d)
    assert big[8].is_chain  # FC ignores norm


def test_configured_rule_fixes_options() -> None:
    rule = RULES["RepVGG"].configured("RepVGG-bn", norm="bn")
    efx.register_rule(rule)
    try:
        big = efx.expand(net(), "RepVGG-bn")
        assert isinstance(big[0].branches["1x1"][1], nn.BatchNorm2d)
        assert big[0].rule == "RepVGG"
        scaled = efx.expand(net(), RULES["RepVGG-bn"](norm="scale"))  # the config overrides
        assert isinstance(scaled[0].branches["1x1"][1], nn.Conv2d)
    finally:
        efx.unregister_rule("RepVGG-bn")
    with pytest.raises(efx.ConfigError, match="takes no option"):
        RULES["CL"].configured(norm="bn")


@pytest.mark.parametrize("norm", ["scale", "bn"])
def test_checkpoint_loads_into_a_fresh_expansion(norm: str) -> None:
    big = efx.expand(net(), efx.RepVGG(norm=norm))
    sgd_steps(big, torch.randn(16, 3, 8, 8), steps=2)
    fresh = efx.expand(net(), efx.RepVGG(norm=norm))
    fresh.load_state_dict(big.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(big.eval()(x), fresh.eval()(x))
    assert "0.branches.kxk.1.running_var" in big.state_dict() or norm == "scale"


GEOMETRIES = [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
              nn.Conv1d(4, 4, 5, padding=2, stride=2), nn.Conv2d(8, 8, 3, padding=1, groups=8),
              nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
              nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1))]


@pytest.mark.parametrize("conv", GEOMETRIES, ids=lambda c: repr(c).replace(" ", ""))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rule", [dbb, mobileone])
def test_new_rules_fold_exactly_over_geometries(rule, norm, conv) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, conv.in_channels, *(7,) * len(conv.kernel_size))
    for init in ("default", "preserve") if norm != "bn" else ("default",):
        block = rule.build(conv, init=init, norm=norm).train()
        with torch.no_grad():
            block(x)  # a training forward: BN running statistics move
            if init == "preserve":
                assert rel_err(conv(x), block(x)) < 1e-5
            block.eval()
            assert rel_err(block(x), block.contract()(x)) < 1e-5


def test_dbb_avg_branch_is_average_pooling() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    block = dbb.build(conv)
    squeeze, pool = block.branches["avg"]
    assert not pool.weight.requires_grad
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expect = nn.functional.avg_pool2d(squeeze(x), 3, stride=2, padding=1,
                                          count_include_pad=True)
        assert rel_err(expect, pool(squeeze(x))) < 1e-6
    inner = block.branches["1x1_kxk"][0].weight  # DBB's identity-based 1x1
    assert torch.equal(inner[:, :, 0, 0], torch.eye(4))


def test_mobileone_k_is_a_rule_option() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert list(mobileone.build(conv, k=2).branches) == ["kxk_0", "kxk_1", "1x1", "identity"]
    assert list(mobileone.build(nn.Conv2d(8, 8, 1), k=3).branches) == [
        "kxk_0", "kxk_1", "kxk_2", "identity"]  # the pointwise block
    rule = RULES["MobileOne"].configured("MobileOne-k1", k=1)
    efx.register_rule(rule)
    try:
        big = efx.expand(net(), RULES["MobileOne-k1"](norm="bn"))
        assert list(big[3].branches) == ["kxk_0", "1x1", "identity"]
    finally:
        efx.unregister_rule("MobileOne-k1")
    with pytest.raises(efx.ConfigError, match="integer ≥ 1"):
        mobileone.build(conv, k=0)


@pytest.mark.parametrize("rule", ["DBB", "MobileOne"])
def test_fold_deploys_a_bn_trained_model(rule: str) -> None:
    """``efx.fold`` folds every branch's BN (running statistics) and the model's own BN."""
    model = net()
    big = efx.expand(model, RULES[rule](norm="bn")).train()
    x = torch.randn(16, 3, 8, 8)
    sgd_steps(big, x, steps=3)
    big.eval()
    folded = efx.fold(big, (x,))
    assert not any(isinstance(m, (nn.BatchNorm2d, efx.ExpandedBlock)) for m in folded.modules())
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert rel_err(big(x), folded(x)) <= 1e-5
