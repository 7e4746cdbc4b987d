"""efx.param_groups: per-factor learning rates (lr/N), the compander's decay rules, and timm's
conventions (no_weight_decay(), frozen parameters left out, a copy of the groups per optimizer)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expandfx as efx
from expandfx.models import TinyResNet, smallnet_7x7


def fc_model() -> nn.Module:
    torch.manual_seed(0)
    return efx.expand(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "FC", r=2,
                      include="0")


def lr_of(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


def test_hand_computed_learning_rates():
    model = fc_model()
    block = model[0]
    assert isinstance(block, efx.ExpandedBlock) and len(block.layers) == 3
    opt = torch.optim.SGD(efx.param_groups(model, lr=0.3))
    lrs = lr_of(opt)
    for p in block.parameters():  # 3 factors: 0.3 / 3
        assert lrs[id(p)] == pytest.approx(0.1)
    for p in model[2].parameters():  # the compact output layer
        assert lrs[id(p)] == 0.3
    assert len(lrs) == len(list(model.parameters()))  # every parameter exactly once
    assert len(opt.param_groups) == 4  # same lr and decay share a group (biases: no decay)
    # other rules
    no_rule = lr_of(torch.optim.SGD(efx.param_groups(model, lr=0.3, chain_lr=None)))
    assert set(no_rule.values()) == {0.3}
    const = lr_of(torch.optim.SGD(efx.param_groups(model, lr=0.3, chain_lr=0.5)))
    assert const[id(block.layers[1].weight)] == pytest.approx(0.15)
    custom = efx.param_groups(model, lr=0.3, chain_lr=lambda b: 1 / len(b.layers) ** 2)
    assert lr_of(torch.optim.SGD(custom))[id(block.layers[0].bias)] == pytest.approx(0.3 / 9)


def test_one_hand_computed_sgd_step_for_a_three_factor_block():
    model = fc_model()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    lr, wd = 0.3, 0.01
    groups = efx.param_groups(model, lr=lr, weight_decay=wd)
    opt = torch.optim.SGD(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y) + groups.penalty()
    grads = dict(zip(before, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    loss = F.cross_entropy(model(x), y) + groups.penalty()
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        step = lr / 3 if name.startswith("0.layers.") else lr
        decay = 0.0 if name.endswith("bias") else wd  # biases are exempt by default
        expected = before[name] - step * (grads[name] + decay * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    assert float(groups.penalty()) == 0.0  # no companded weights


def test_norm_rule_is_one_over_n_at_init_and_shrinks_as_factors_grow():
    torch.manual_seed(0)
    block = efx.expand(nn.Sequential(nn.Linear(256, 256), nn.ReLU()), "FC", r=2)[0]
    at_init = efx.chain_scale(block, "norm")
    assert at_init == pytest.approx(1 / 3, rel=0.05)  # g_j ≈ 1 at PyTorch's default init
    with torch.no_grad():
        block.layers[0].weight.mul_(2.0)  # factor 0 grows 2x: the other two terms x4
        block.layers[2].weight.mul_(3.0)
    g = [2.0, 1.0, 3.0]  # expected Σ_i Π_{j≠i} g_j², with the measured g at init folded in
    expected = 1 / sum(math.prod(x**2 for j, x in enumerate(g) if j != i) for i in range(3))
    assert efx.chain_scale(block, "norm") == pytest.approx(expected, rel=0.1)


def test_companded_expanded_model_gets_both_rules():
    torch.manual_seed(0)
    big = efx.compand(efx.expand(smallnet_7x7(), "CL", r=2), a=1.0, b=0.7)
    groups = efx.param_groups(big, lr=0.3, weight_decay=0.01)
    opt = torch.optim.SGD(groups)
    block = big.features[0]
    v = block.layers[1].parametrizations.weight.original
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(v)]["lr"] == pytest.approx(0.1)  # lr/3 for a CL factor
    assert by_param[id(v)]["weight_decay"] == 0.0  # fixed a, b: decay through the penalty
    assert by_param[id(block.layers[1].bias)]["weight_decay"] == 0.0  # biases: exempt
    assert by_param[id(block.layers[1].bias)]["lr"] == pytest.approx(0.1)
    expected = 0.5 * 0.01 * sum(layer.weight.pow(2).sum() for _, layer, _ in efx.companded(big))
    torch.testing.assert_close(groups.penalty(), expected)


def test_learnable_compander_a_b_are_not_factors_and_never_decay():
    big = efx.compand(efx.expand(smallnet_7x7(), "CL", r=2), a=1.0, b=0.7, learnable="global")
    comp = efx.companded(big)[0][2]
    by_param = {id(p): g for g in efx.param_groups(big, lr=0.3, weight_decay=0.01)
                for p in g["params"]}
    assert by_param[id(comp.a)]["lr"] == 0.3 and by_param[id(comp.a)]["weight_decay"] == 0.0
    v = big.features[0].layers[0].parametrizations.weight.original
    assert by_param[id(v)]["weight_decay"] == 0.01  # learnable a, b: decay on v


def test_nonlinear_blocks_keep_the_full_lr_and_lr_is_rebuilt_after_linearize():
    big = efx.nonlinear_counterpart(efx.expand(smallnet_7x7(), "CL", r=2))
    assert {g["lr"] for g in efx.param_groups(big, lr=0.3)} == {0.3}
    big = efx.linearize(big)
    assert {round(g["lr"], 6) for g in efx.param_groups(big, lr=0.3)} == {0.3, 0.1}


def test_a_copy_of_the_model_gets_its_own_groups():
    model = fc_model()
    other = copy.deepcopy(model)
    ids = {id(p) for g in efx.param_groups(other, lr=0.1) for p in g["params"]}
    assert ids == {id(p) for p in other.parameters()}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0}, r"lr must be a positive number, got lr=0"),
    ({"lr": 0.1, "weight_decay": -1}, r"weight_decay must be a non-negative number"),
    ({"lr": 0.1, "chain_lr": "1/M"}, r"chain_lr must be '1/N', 'norm', None, a positive"),
    ({"lr": 0.1, "chain_lr": lambda b: -1.0}, r"chain_lr gave -1.0 for a FC block"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(efx.ConfigError, match=match):
        efx.param_groups(fc_model(), **kwargs)


def test_step_gain_is_one_for_a_one_factor_block_and_matches_the_chain_formula():
    """For a linear chain W = C B A the gain is E_G Σ‖∂⟨W,G⟩/∂W_i‖² / E‖G‖², which equals
    (‖C B‖²‖I‖² … ) in closed form: Σ_i ‖P_i‖_F² ‖Q_i‖_F² / (n·m) for Gaussian G."""
    from expandfx.optim import step_gain
    from expandfx.rules import fc

    torch.manual_seed(0)
    block = fc.build(nn.Linear(6, 5), r=2).double()
    a, b, c = (layer.weight.detach() for layer in block.layers)
    eye = lambda k: torch.eye(k, dtype=torch.float64)  # noqa: E731
    terms = [(c @ b, eye(6)), (c, a), (eye(5), b @ a)]
    exact = sum(float(p.square().sum() * q.square().sum()) for p, q in terms) / (5 * 6)
    assert step_gain(block, probes=400) == pytest.approx(exact, rel=0.1)
    one = efx.ExpandedBlock(nn.Linear(6, 5), [nn.Linear(6, 5)], rule="test", r=1)
    assert step_gain(one, probes=50) == pytest.approx(1.0, rel=0.15)


def test_rescale_follows_a_weight_dependent_rule_and_keeps_scheduler_changes():
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CL", r=2)
    groups = efx.param_groups(big, lr=0.1, chain_lr="norm")
    opt = torch.optim.SGD(groups, momentum=0.9)
    block = big.features[0]
    group = next(g for g in opt.param_groups if block.layers[0].weight in g["params"])
    start = group["lr"]
    assert start == pytest.approx(0.1 / 3, rel=0.3)  # "norm" is about 1/N at init
    for g in opt.param_groups:
        g["lr"] *= 0.5  # a scheduler's change
    with torch.no_grad():
        for layer in block.layers:
            layer.weight.mul_(2.0)  # every factor grows 2x: each Π_{j≠i} g_j² grows 2⁴
    groups.rescale(opt)
    assert group["lr"] == pytest.approx(start * 0.5 / 16)
    static = efx.param_groups(big, lr=0.1)
    static_opt = torch.optim.SGD(static)
    before = [g["lr"] for g in static_opt.param_groups]
    static.rescale(static_opt)  # "1/N" does not depend on the weights: nothing changes
    assert [g["lr"] for g in static_opt.param_groups] == before


def test_weight_decay_is_left_to_the_optimizer_unless_given():
    """Issue #22: param_groups used to write weight_decay=0.0 into every group, so
    AdamW(groups, weight_decay=0.5) was ignored and AdamW(groups) got 0 instead of 0.01."""
    model = efx.expand(smallnet_7x7(), "CL", r=2)
    groups = efx.param_groups(model, lr=0.1)
    adamw = torch.optim.AdamW(groups)
    decays = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    conv = model.features[0].layers[1]
    assert decays[id(conv.weight)] == 0.01  # AdamW's default
    assert decays[id(conv.bias)] == 0.0  # biases exempt, as in timm
    adamw = torch.optim.AdamW(efx.param_groups(model, lr=0.1), weight_decay=0.5)
    decays = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert decays[id(conv.weight)] == 0.5 and decays[id(conv.bias)] == 0.0
    sgd = torch.optim.SGD(efx.param_groups(model, lr=0.1, weight_decay=1e-3))
    decays = {id(p): g["weight_decay"] for g in sgd.param_groups for p in g["params"]}
    assert decays[id(conv.weight)] == 1e-3 and decays[id(conv.bias)] == 0.0


def test_batchnorm_parameters_are_exempt_from_decay_unless_asked():
    model = TinyResNet()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    by_param = {id(p): g for g in efx.param_groups(model, lr=0.1, weight_decay=5e-4)
                for p in g["params"]}
    assert by_param[id(bn.weight)]["weight_decay"] == 0.0
    assert by_param[id(bn.bias)]["weight_decay"] == 0.0
    assert by_param[id(conv.weight)]["weight_decay"] == 5e-4
    every = {id(p): g for g in efx.param_groups(model, lr=0.1, weight_decay=5e-4,
                                                 decay_bias_and_norm=True) for p in g["params"]}
    assert every[id(bn.weight)]["weight_decay"] == 5e-4


def test_companded_weights_without_weight_decay_are_warned_about():
    big = efx.compand(smallnet_7x7(), a=1.0, b=0.7)
    with pytest.warns(UserWarning, match=r"companded weights with fixed a, b.*weight_decay="):
        groups = efx.param_groups(big, lr=0.1)
    assert float(groups.penalty()) == 0.0
    v = big.features[0].parametrizations.weight.original
    assert next(g for g in groups if any(p is v for p in g["params"]))["weight_decay"] == 0.0


def test_param_groups_repr_is_short_and_readable():
    groups = efx.param_groups(TinyResNet(), lr=0.1)
    text = repr(groups)
    assert len(text) < 300 and "tensor(" not in text
    assert text.startswith("ParamGroups(2 groups") and "weight_decay=optimizer's" in text


# ---- timm's conventions (issue 30) ----------------------------------------------------------

@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """A two-block timm ViT on 32×32 inputs, its linear layers expanded (FC, r=2)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2)
    return efx.expand(model, "FC", r=2)


def decay_of(groups, default=None) -> dict[int, float | None]:
    return {id(p): g.get("weight_decay", default) for g in groups for p in g["params"]}


def test_timm_vit_no_weight_decay_parameters_do_not_decay(vit):
    assert type(vit).__name__ == "VisionTransformer"  # keeps its class: no_weight_decay()
    with warnings.catch_warnings():
        # dist_token, reg_token: named by every timm ViT, absent from this one; silent
        warnings.simplefilter("error", efx.ExpandFXWarning)
        groups = efx.param_groups(vit, lr=1e-3, weight_decay=0.05)
    decay = decay_of(groups)
    assert vit.pos_embed.dim() == vit.cls_token.dim() == 3  # not exempt as 1-d parameters
    assert decay[id(vit.pos_embed)] == 0.0 and decay[id(vit.cls_token)] == 0.0
    qkv = vit.blocks[0].attn.qkv
    assert isinstance(qkv, efx.ExpandedBlock)
    assert decay[id(qkv.layers[0].weight)] == 0.05 and decay[id(qkv.layers[0].bias)] == 0.0
    assert decay[id(vit.patch_embed.proj.weight)] == 0.05
    # the same exemptions as timm's own param_groups_weight_decay on the same model
    from timm.optim import param_groups_weight_decay
    theirs = decay_of(param_groups_weight_decay(vit, 0.05,
                                                no_weight_decay_list=vit.no_weight_decay()))
    assert decay == theirs
    # weight_decay=None: the exempt ones carry 0, the others take the optimizer's
    adamw = torch.optim.AdamW(efx.param_groups(vit, lr=1e-3))
    decay = decay_of(adamw.param_groups)
    assert decay[id(vit.pos_embed)] == 0.0 and decay[id(qkv.layers[0].weight)] == 0.01
    # also with decay_bias_and_norm=True (timm: independent of weight_decay_exclude_1d)
    every = decay_of(efx.param_groups(vit, lr=1e-3, weight_decay=0.05,
                                      decay_bias_and_norm=True))
    assert every[id(vit.cls_token)] == 0.0 and every[id(qkv.layers[0].bias)] == 0.05


class Keyworded(nn.Module):
    """A model that names its exempt parameters by keyword (Swin's convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.rel_bias_table = nn.Parameter(torch.zeros(4, 3))
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) + self.rel_bias_table.sum())

    def no_weight_decay_keywords(self) -> set[str]:
        return {"rel_bias"}

    def no_weight_decay(self) -> set[str]:
        return {"head.weight"}


def test_keywords_and_a_claim_that_expanding_moved():
    model = Keyworded()
    with warnings.catch_warnings():
        warnings.simplefilter("error", efx.ExpandFXWarning)
        decay = decay_of(efx.param_groups(model, lr=0.1, weight_decay=0.1))
    assert decay[id(model.rel_bias_table)] == 0.0  # 2-d, but its name holds the keyword
    assert decay[id(model.head.weight)] == 0.0 and decay[id(model.fc.weight)] == 0.1
    big = efx.expand(model, "FC", r=2, include=["head"])
    with pytest.warns(efx.ExpandFXWarning, match=r"names 'head.weight', but 'head' is an "
                                                 r"expanded block.*no_decay=\['head'\]"):
        efx.param_groups(big, lr=0.1, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", efx.ExpandFXWarning)  # the fix it names: silent
        decay = decay_of(efx.param_groups(big, lr=0.1, weight_decay=0.1, no_decay=["head"]))
    assert all(decay[id(p)] == 0.0 for p in big.head.parameters())


def test_frozen_parameters_are_left_out(vit):
    frozen = [vit.patch_embed.proj.weight, *vit.blocks[0].parameters()]
    try:
        for p in frozen:
            p.requires_grad_(False)
        groups = efx.param_groups(vit, lr=1e-3, weight_decay=0.05)
        ids = [id(p) for g in groups for p in g["params"]]
        assert not {id(p) for p in frozen} & set(ids)
        assert sorted(ids) == sorted(id(p) for p in vit.parameters() if p.requires_grad)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def test_each_optimizer_gets_its_own_copy_of_the_groups(vit):
    groups = efx.param_groups(vit, lr=1e-3)  # decay left to each optimizer
    assert groups[0] is not groups[0] and groups[0]["params"] is not groups[0]["params"]
    sgd = torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=1e-4)
    adamw = torch.optim.AdamW(groups, lr=2e-3, betas=(0.8, 0.95))
    qkv = vit.blocks[0].attn.qkv.layers[0].weight
    assert decay_of(sgd.param_groups)[id(qkv)] == 1e-4
    assert decay_of(adamw.param_groups)[id(qkv)] == 0.01  # not SGD's 1e-4: nothing inherited
    for g in adamw.param_groups:
        assert "momentum" not in g and "dampening" not in g and g["betas"] == (0.8, 0.95)
    for g in sgd.param_groups:
        assert "betas" not in g and g["momentum"] == 0.9
    assert [g["expandfx_group"] for g in adamw.param_groups] == list(range(len(groups)))
    sgd.param_groups[0]["lr"] = 7.0  # a scheduler of one optimizer: the other's stays
    assert adamw.param_groups[0]["lr"] != 7.0 and groups[0]["lr"] != 7.0


def test_rescale_takes_the_optimizer_and_changes_only_its_groups():
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CL", r=2)
    groups = efx.param_groups(big, lr=0.1, chain_lr="norm")
    first, second = torch.optim.SGD(groups, momentum=0.9), torch.optim.Adam(groups)
    block = big.features[0]

    def lr_in(opt):
        return next(g["lr"] for g in opt.param_groups if block.layers[0].weight in g["params"])

    start = lr_in(first)
    assert lr_in(second) == start
    with torch.no_grad():
        for layer in block.layers:
            layer.weight.mul_(2.0)
    groups.rescale(first)
    assert lr_in(first) == pytest.approx(start / 16) and lr_in(second) == start
    groups.rescale(second)
    assert lr_in(second) == pytest.approx(start / 16)
    groups.rescale(first)  # the scale is kept per optimizer: no second division
    assert lr_in(first) == pytest.approx(start / 16)
    # a resumed optimizer (state_dict of one built from the groups) is found again
    resumed = torch.optim.SGD(efx.param_groups(big, lr=0.1, chain_lr="norm"), momentum=0.9)
    resumed.load_state_dict(first.state_dict())
    groups.rescale(resumed)
    with pytest.raises(efx.ConfigError, match=r"pass the optimizer to rescale: "
                                              r"groups.rescale\(opt\)"):
        groups.rescale()
    with pytest.raises(efx.ConfigError, match=r"holds none of these .* groups"):
        groups.rescale(torch.optim.SGD(fc_model().parameters(), lr=0.1))


def test_no_decay_takes_names_globs_and_modules():
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CL", r=2)
    wd = 5e-4
    decay = decay_of(efx.param_groups(big, lr=0.1, weight_decay=wd,
                                      no_decay=["features.0", "classifier.*.weight"]))
    assert all(decay[id(p)] == 0.0 for p in big.features[0].parameters())  # a module path
    assert decay[id(big.classifier[2].weight)] == 0.0  # a glob
    assert decay[id(big.features[4].layers[0].weight)] == wd
    one = decay_of(efx.param_groups(big, lr=0.1, weight_decay=wd,
                                    no_decay="features.4.layers.1.weight"))  # one parameter
    assert one[id(big.features[4].layers[1].weight)] == 0.0
    assert one[id(big.features[4].layers[0].weight)] == wd
    with pytest.raises(efx.ConfigError, match=r"no_decay= entry 'clasifier.0' names no "
                                              r"parameter.*closest: 'classifier.0'"):
        efx.param_groups(big, lr=0.1, no_decay=["clasifier.0"])
    with pytest.warns(efx.ExpandFXWarning, match=r"no_decay= glob 'head\.\*' matches no"):
        groups = efx.param_groups(big, lr=0.1, weight_decay=wd, no_decay=["head.*"])
    assert decay_of(groups)[id(big.classifier[2].weight)] == wd  # nothing else changed
    with pytest.raises(efx.ConfigError, match=r"no_decay= takes parameter or module names"):
        efx.param_groups(big, lr=0.1, no_decay=[big.features])


def test_no_decay_takes_a_companded_weight_out_of_the_penalty():
    torch.manual_seed(0)
    big = efx.compand(smallnet_7x7(), a=1.0, b=0.7)
    groups = efx.param_groups(big, lr=0.1, weight_decay=0.01, no_decay=["features.0"])
    expected = 0.5 * 0.01 * sum(layer.weight.pow(2).sum() for path, layer, _
                                in efx.companded(big) if path != "features.0")
    torch.testing.assert_close(groups.penalty(), expected)
