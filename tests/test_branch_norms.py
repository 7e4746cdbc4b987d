"""Per-branch normalization (``norm=None | "scale" | "bn"``) of the branch rules.

The acceptance of issue 19: every rule × norm round-trips exactly after real SGD steps in
training mode (same class and keys); collapsed and sequential gradients agree in float64
where collapsed applies; ``norm="bn"`` refuses collapsed training and contracts, in eval
mode, to the compact layer with its running statistics.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from support import randomize, rel_err, sgd_steps
from torch import nn

import expandfx as efx
from expandfx.rules import RULES, dbb, mobileone, orepa, repvgg

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


def assert_contracts_exactly(big: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """``contract(big)`` has ``model``'s class, keys and module types and computes ``big``."""
    small = efx.contract(big)
    assert type(small) is type(model)
    assert list(small.state_dict()) == list(model.state_dict())
    assert all(type(a) is type(b) for a, b in zip(small.modules(), model.modules(), strict=True))
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5


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
    assert_contracts_exactly(big.eval(), model, x)


@pytest.mark.parametrize("norm", [None, "scale"])
@pytest.mark.parametrize("rule", BRANCH_RULES)
def test_collapsed_and_sequential_gradients_agree_in_float64(rule: str, norm) -> None:
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3).double()
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    assert_modes_agree(lambda: RULES[rule].build(conv, 1, norm=norm).double(), x, least=3)


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
    bias_free = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU())
    with pytest.raises(efx.ConfigError, match=r"'0' was requested exactly.*bias-free layer: "
                                              r"its result does not go only to a "
                                              r"BatchNorm.*norm='scale'.*exclude"):
        efx.expand(bias_free, {"0": efx.RepVGG(norm="bn")})
    with pytest.raises(efx.ConfigError, match=r"ACNet\(init='preserve', norm='bn'\): "
                                              r"init='preserve' with norm='bn' cannot hold.*"
                                              r"Use init='default'"):
        efx.ACNet(norm="bn", init="preserve")
    with pytest.raises(efx.ConfigError, match=r"RepVGG\(norm='batch'\): norm must be one of"):
        efx.RepVGG(norm="batch")
    with pytest.raises(efx.ConfigError, match=r"expands no layer with a branch rule"):
        efx.expand(net(), "CL", norm="scale")  # the deprecated keyword, refused as before
    with pytest.raises(efx.ConfigError, match=r"CL\(norm='scale'\): CL takes no setting"):
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


# OREPA: per-branch scales are its block (norm="scale" only), so it trains collapsed.
OREPA_GEOMETRIES = [*GEOMETRIES, nn.Conv2d(16, 16, 3, padding=1, groups=8),  # t = 2m
                    nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1, stride=2, bias=False),  # OREPA_1x1
                    nn.Conv1d(6, 6, 1, groups=3), nn.Conv3d(4, 4, 3, padding=2, dilation=2)]


def orepa_net() -> nn.Module:
    """conv → BN nets (OREPA's ConvBN): bias-free 3×3 and 1×1 convs, grouped and strided."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(16),
        nn.ReLU(), nn.Conv2d(16, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("mode", ["sequential", "collapsed"])
def test_orepa_trained_in_training_mode_contracts_exactly(mode: str) -> None:
    model = orepa_net().eval()
    big = efx.expand(model, "OREPA", mode=mode).train()
    assert [n for n, m in big.named_modules() if isinstance(m, efx.ExpandedBlock)] == [
        "0", "3", "6", "9"]
    before = big[0].branches["prior"][0].weight.clone()
    x = torch.randn(16, 3, 8, 8)
    sgd_steps(big, x, steps=3)
    assert not torch.equal(before, big[0].branches["prior"][0].weight)  # scale 0 moved first
    assert_contracts_exactly(big.eval(), model, x)


@pytest.mark.parametrize("conv", OREPA_GEOMETRIES, ids=lambda c: repr(c).replace(" ", ""))
def test_orepa_collapsed_and_sequential_gradients_agree_in_float64(conv: nn.Module) -> None:
    conv = copy.deepcopy(conv).double()
    x = torch.randn(4, conv.in_channels, *(7,) * len(conv.kernel_size), dtype=torch.float64)
    blocks = assert_modes_agree(lambda: orepa.build(conv).double(), x, least=5)
    with torch.no_grad():
        assert rel_err(blocks[0](x), blocks[0].contract()(x)) <= 1e-12


@pytest.mark.parametrize("conv", OREPA_GEOMETRIES, ids=lambda c: repr(c).replace(" ", ""))
def test_orepa_preserve_is_exact(conv: nn.Module) -> None:
    """OREPA's ``single_init`` with the layer's weights: origin scale 1, the others 0."""
    torch.manual_seed(0)
    block = orepa.build(conv, init="preserve")
    weight, bias = block.weight_bias()
    assert torch.equal(weight, conv.weight)
    assert (bias is None) == (conv.bias is None) and (bias is None or torch.equal(bias, conv.bias))
    x = torch.randn(2, conv.in_channels, *(7,) * len(conv.kernel_size))
    block.mode = "sequential"
    with torch.no_grad():
        assert rel_err(conv(x), block(x)) <= 1e-6


def test_orepa_block_is_the_published_one() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    block = orepa.build(conv)
    assert list(block.branches) == ["origin", "avg", "prior", "1x1_kxk", "1x1", "dws"]
    scales = {name: branch[-1].weight.flatten().unique().tolist()
              for name, branch in block.branches.items()}
    assert scales == {"origin": [0.25], "avg": [0.25], "prior": [0.0], "1x1_kxk": [0.5],
                      "1x1": [1.0], "dws": [0.5]}
    pool, basis = block.branches["avg"][1], block.branches["prior"][1]
    assert not pool.weight.requires_grad and not basis.weight.requires_grad
    assert torch.allclose(pool.weight, torch.full_like(pool.weight, 1 / 9))
    # OREPA's fre_init for 3×3: the first n/2 channels vary along h, the others along w
    h = torch.arange(3.0)
    assert torch.allclose(basis.weight[1, 0], torch.cos(torch.pi * (h + 0.5) * 2 / 3)[:, None]
                          .expand(3, 3), atol=1e-6)
    assert torch.allclose(basis.weight[3, 0], torch.cos(torch.pi * (h + 0.5) * 1 / 3)[None, :]
                          .expand(3, 3), atol=1e-6)
    assert torch.equal(block.branches["1x1_kxk"][0].weight[:, :, 0, 0], torch.eye(4))
    dw, pw = block.branches["dws"][:2]
    assert (dw.in_channels, dw.out_channels, dw.groups, pw.in_channels) == (4, 32, 4, 32)
    origin = block.branches["origin"][0].weight  # Kaiming-uniform a=0: bound √(6/fan_in)
    assert origin.abs().max() <= math.sqrt(6 / 36) and origin.abs().max() > 1 / math.sqrt(36)
    wide = orepa.build(nn.Conv2d(16, 16, 3, padding=1, groups=8))
    assert wide.branches["1x1_kxk"][0].out_channels == 32  # more than 4 groups: 2m
    pointwise = orepa.build(nn.Conv2d(4, 8, 1))
    assert list(pointwise.branches) == ["origin", "l2i"]
    assert [b[-1].weight[0].item() for b in pointwise.branches.values()] == [1.0, 0.5]
    assert torch.equal(pointwise.branches["l2i"][0].weight[:, :, 0, 0], torch.eye(4))  # n > m


def test_orepa_refuses_other_norms_and_says_why() -> None:
    with pytest.raises(efx.ConfigError, match=r"norm='bn'.*per-branch channel scale.*'DBB'"):
        efx.expand(orepa_net(), "OREPA", norm="bn")
    with pytest.raises(efx.ConfigError, match=r"norm=None"):
        orepa.build(nn.Conv2d(4, 4, 3, padding=1), norm=None)
    big = efx.expand(orepa_net(), "OREPA", norm="scale")
    assert list(big[0].branches) == list(orepa.SCALES)


@pytest.mark.parametrize("conv, reason", [
    (nn.ConvTranspose2d(4, 4, 3, padding=1), "transposed"),
    (nn.Conv2d(4, 4, 4, padding=2), "OREPA: kernel \\(4, 4\\) has an even size"),
    (nn.Conv2d(4, 4, 3), "OREPA: padding \\(0, 0\\) is smaller"),
    (nn.Conv2d(4, 4, 1, padding=1), None), (nn.Conv2d(4, 4, 5, padding=2), None),
])
def test_orepa_skip_reasons(conv: nn.Module, reason: str | None) -> None:
    got = orepa.skip_reason(conv)
    assert got is None if reason is None else re.search(reason, got)


@pytest.mark.parametrize("rule, norm, n_factors", [
    ("DBB", None, 5), ("DBB", "scale", 5), ("DBB", "bn", 5),  # the fixed pooling: no factor
    ("MobileOne", "scale", 5), ("MobileOne", "bn", 5), ("RepVGG", "scale", 2),
    ("OREPA", "scale", 8),  # origin, avg, prior, 1x1 one each; 1x1_kxk, dws two each
])
def test_param_groups_count_factors_not_branch_norms(rule: str, norm, n_factors: int) -> None:
    """A branch k×k → scale (or → BN) has one factor: the norm rescales its branch per
    channel, it is not a factor of the product (before: DBB lr/10, MobileOne lr/11)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    big = efx.expand(model, rule, **({"norm": norm} if norm else {}))
    by_param = {id(p): g["lr"] for g in efx.param_groups(big, lr=0.1) for p in g["params"]}
    block = big[0]
    lrs = [by_param[id(p)] for p in block.parameters() if p.requires_grad]
    assert lrs == [pytest.approx(0.1 / n_factors)] * len(lrs)


class Residual(nn.Module):
    """conv → BN, and the conv's result also added after the BN: not the BN's alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_bn_on_a_bias_free_layer_moves_its_shift_into_the_next_bn() -> None:
    """conv (no bias) → BN: contract moves the branch BNs' summed shift b into the BN's
    running mean (μ − b), exact; the block alone, or a conv used elsewhere too, refuses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU()).eval()
    big = efx.expand(model, "DBB", norm="bn").train()
    x = torch.randn(16, 3, 8, 8)
    sgd_steps(big, x, steps=3)
    big.eval()
    shift = big[0].weight_bias(torch.float64)[1]
    assert shift.abs().max() > 1e-3  # the branch BNs' β and running means moved
    before = big[1].running_mean.clone()
    small = efx.contract(big)
    assert torch.equal(big[1].running_mean, before)  # big is left as it was
    assert small[0].bias is None and list(small.state_dict()) == list(model.state_dict())
    assert torch.allclose(small[1].running_mean.double(), big[1].running_mean.double() - shift,
                          atol=1e-6)
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5
        # training mode: the batch mean cancels the shift, the updated running means keep μ − b
        big[1].train(), small.train()
        out_big, out_small = big[1](big[0](x)), small[1](small[0](x))
    assert rel_err(out_big, out_small) <= 1e-5
    assert torch.allclose(small[1].running_mean.double(), big[1].running_mean.double() - shift,
                          atol=1e-6)
    with pytest.raises(efx.ContractionError, match=r"no bias to hold it.*expandfx.contract"):
        big[0].contract("0")
    with pytest.raises(efx.ConfigError, match=r"'conv'.*does not go only to a BatchNorm"):
        efx.expand(Residual(), {"conv": efx.RepVGG(norm="bn")})
    row = next(r for r in efx.plan(Residual(), efx.RepVGG(norm="bn")).rows if r.path == "conv")
    assert row.rule is None and "does not go only to a BatchNorm" in row.reason


@pytest.mark.parametrize("rule", ["RepVGG", "DBB"])
def test_bn_trains_torchvision_resnet18_and_contracts_exactly(rule: str) -> None:
    """Every torchvision ResNet conv is bias-free and followed by a BN: the published
    per-branch-BN training (RepVGG, DBB) on a real CNN."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    big = efx.expand(model, rule, norm="bn").train()
    blocks = [m for m in big.modules() if isinstance(m, efx.ExpandedBlock)]
    assert len(blocks) == 17 and all(b.shift_to_next_norm for b in blocks)  # conv1 + 16 3×3
    x = torch.randn(4, 3, 32, 32)
    sgd_steps(big, x, steps=2, lr=0.01)
    big.eval()
    small = efx.contract(big)
    assert type(small) is type(model)
    assert list(small.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5


def assert_modes_agree(make_block, x: torch.Tensor, least: int) -> list:
    """Sequential and collapsed copies of one randomized block: every trainable parameter's
    gradient agrees to 1e-10 (float64); at least ``least`` of them. Returns both blocks."""
    blocks = []
    for mode in ("sequential", "collapsed"):
        block = make_block()
        if blocks:
            block.load_state_dict(blocks[0].state_dict())
        else:
            randomize(block, seed=2)
        block.mode = mode
        block(x).square().sum().backward()
        blocks.append(block)
    pairs = [(a, b) for a, b in zip(blocks[0].parameters(), blocks[1].parameters(), strict=True)
             if a.requires_grad]
    assert len(pairs) >= least
    for a, b in pairs:
        assert (a.grad - b.grad).abs().max().item() <= 1e-10 * max(1.0, a.grad.abs().max())
    return blocks
