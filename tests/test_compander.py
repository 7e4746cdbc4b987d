"""Weight compander: exact at init, the right gradients, weight decay, optimizer, baking."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from support import rel_err, sgd_steps
from torch import nn
from torch.nn.utils import parametrize

import expandfx as efx
from expandfx.models import EXAMPLE_SHAPES, MODELS

# closed forms, written independently of expandfx.compander
SHAPES = {
    "arctan": (torch.atan, lambda u: 1 / (1 + u**2)),
    "arsinh": (torch.asinh, lambda u: 1 / torch.sqrt(1 + u**2)),
    "erf": (torch.erf, lambda u: 2 / math.sqrt(math.pi) * torch.exp(-(u**2))),
}


def small_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("psi", list(SHAPES))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("expanded", [False, True])
def test_compand_at_init_computes_the_same(psi, name, expanded):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    if expanded:
        model = efx.expand(model, "CL+FC", r=2).eval()
    x = torch.randn(EXAMPLE_SHAPES[name])
    comp = efx.compand(model, psi=psi, a=1.0, b=0.7, inplace=False)
    assert type(comp) is type(model)
    with torch.no_grad():
        assert rel_err(model(x), comp(x)) <= 1e-6
    paths = [p for p, _, _ in efx.companded(comp)]
    n_layers = sum(isinstance(m, efx.block.LAYER_TYPES) for m in model.modules())
    assert len(paths) == n_layers  # every conv/linear, every factor of every block
    for _, layer, _ in efx.companded(comp):
        assert not parametrize.is_parametrized(layer, "bias")
    assert not any(parametrize.is_parametrized(m) for m in comp.modules()
                   if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("psi", list(SHAPES))
def test_gradient_of_v_is_chain_rule_with_closed_form_derivative(psi):
    a, b = 0.8, 0.6
    model = efx.compand(small_linear(), psi=psi, a=a, b=b)
    x = torch.randn(7, 5)
    loss = model(x).pow(2).sum()
    loss.backward()
    layer = model[0]
    v = layer.parametrizations.weight.original
    f, df = SHAPES[psi]
    # independent path: w as a leaf, same loss
    w = (a * f(v.detach() / b)).requires_grad_()
    h = torch.tanh(F.linear(x, w, layer.bias.detach()))
    F.linear(h, model[2].weight.detach(), model[2].bias.detach()).pow(2).sum().backward()
    expected = w.grad * (a / b) * df(v.detach() / b)
    torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-7)


def grad_w(model, x):
    """∂L/∂w of the first layer, by an independent functional forward with w as a leaf."""
    w = model[0].weight.detach().clone().requires_grad_()
    h = torch.tanh(F.linear(x, w, model[0].bias.detach()))
    F.linear(h, model[2].weight.detach(), model[2].bias.detach()).sum().backward()
    return w.grad


def test_weight_decay_hits_psi_of_v_when_a_b_are_fixed():
    a, b, lr, wd = 1.0, 0.6, 0.1, 0.05
    model = efx.compand(small_linear(), a=a, b=b)
    x = torch.randn(6, 5)
    v0 = model[0].parametrizations.weight.original.detach().clone()
    w0 = model[0].weight.detach().clone()
    bias0 = model[0].bias.detach().clone()
    gw = grad_w(model, x)
    groups = efx.param_groups(model, lr, weight_decay=wd, chain_lr=None,
                              decay_bias_and_norm=True)
    penalty = groups.penalty
    opt = torch.optim.SGD(groups, lr=lr)
    (model(x).sum() + penalty()).backward()
    gb = model[0].bias.grad.clone()
    opt.step()
    dpsi = (a / b) / (1 + (v0 / b) ** 2)
    expected_v = v0 - lr * (gw + wd * w0) * dpsi  # decay of w, through the chain rule
    torch.testing.assert_close(model[0].parametrizations.weight.original, expected_v)
    torch.testing.assert_close(model[0].bias.detach(), bias0 - lr * (gb + wd * bias0))


@pytest.mark.parametrize("learnable", ["layer", "global"])
def test_weight_decay_hits_v_and_never_a_b_when_learnable(learnable):
    lr, wd = 0.1, 0.05
    model = efx.compand(small_linear(), a=0.5, b=1.0, learnable=learnable)
    x = torch.randn(6, 5)
    comp = model[0].parametrizations.weight[0]
    v0 = model[0].parametrizations.weight.original.detach().clone()
    a0, b0 = comp.a.detach().clone(), comp.b.detach().clone()
    groups = efx.param_groups(model, lr, weight_decay=wd, chain_lr=None,
                              decay_bias_and_norm=True)
    penalty = groups.penalty
    opt = torch.optim.SGD(groups, lr=lr)
    loss = model(x).sum() + penalty()
    assert penalty().item() == 0.0  # learnable: no penalty on Ψ(v)
    loss.backward()
    gv, ga, gb = (model[0].parametrizations.weight.original.grad.clone(), comp.a.grad.clone(),
                  comp.b.grad.clone())
    assert ga.abs() > 0 and gb.abs() > 0
    opt.step()
    torch.testing.assert_close(model[0].parametrizations.weight.original.detach(),
                               v0 - lr * (gv + wd * v0))
    torch.testing.assert_close(comp.a.detach(), a0 - lr * ga)  # no decay on a
    torch.testing.assert_close(comp.b.detach(), b0 - lr * gb)  # nor on b
    shared = model[2].parametrizations.weight[0].a is comp.a
    assert shared == (learnable == "global")


def adam_reference(model, xs, a, b, lr, eps, betas=(0.9, 0.999)):
    """Hand-written Adam whose moments use ∂L/∂w, each step scaled by Ψ'(v) (the paper)."""
    v = model[0].parametrizations.weight.original.detach().clone()
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)
    for t, x in enumerate(xs, start=1):
        gw = grad_w(model_at(model, v, a, b), x)
        m1 = betas[0] * m1 + (1 - betas[0]) * gw
        m2 = betas[1] * m2 + (1 - betas[1]) * gw * gw
        step = lr * (m1 / (1 - betas[0] ** t)) / ((m2 / (1 - betas[1] ** t)).sqrt() + eps)
        v = v - step * (a / b) / (1 + (v / b) ** 2)
    return v


def model_at(model, v, a, b):
    """A plain copy of ``model`` whose first weight is Ψ(v)."""
    plain = efx.bake(model)
    with torch.no_grad():
        plain[0].weight.copy_(a * torch.atan(v / b))
    return plain


@pytest.mark.parametrize("use_closure", [False, True])
def test_modified_adaptive_optimizer_matches_hand_computed_adam_steps(use_closure):
    a, b, lr, eps = 1.0, 0.7, 1e-2, 1e-8
    model = efx.compand(small_linear(), a=a, b=b, include="0")
    v0 = model[0].parametrizations.weight.original
    for p in model.parameters():  # only v0 trains, so the reference below is all of it
        p.requires_grad_(p is v0)
    xs = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = adam_reference(copy.deepcopy(model), xs, a, b, lr, eps)
    opt = efx.modified_adaptive(torch.optim.Adam([v0], lr=lr, eps=eps), model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # still an Optimizer
    for x in xs:
        opt.zero_grad()
        if use_closure:
            opt.step(lambda x=x: model(x).sum().backward())
        else:
            model(x).sum().backward()
            opt.step()
        sched.step()
    got = model[0].parametrizations.weight.original.detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # plain Adam on v (moments of ∂L/∂v) lands elsewhere after several steps
    plain = efx.compand(small_linear(), a=a, b=b, include="0")
    plain_opt = torch.optim.Adam([plain[0].parametrizations.weight.original], lr=lr, eps=eps)
    for x in xs:
        plain_opt.zero_grad()
        plain(x).sum().backward()
        plain_opt.step()
    assert not torch.allclose(plain[0].parametrizations.weight.original, expected, atol=1e-5)


@pytest.mark.parametrize("learnable", [None, "layer", "global"])
def test_bake_and_contract_after_training(learnable):
    torch.manual_seed(0)
    model = MODELS["smallnet_7x7"]()
    x = torch.randn(2, 3, 32, 32)
    big = efx.compand(efx.expand(model, "CK+FC", r=2), a=1.0, b=0.6, learnable=learnable)
    groups = efx.param_groups(big, 0.01, weight_decay=5e-4, chain_lr=None,
                              decay_bias_and_norm=True)
    penalty = groups.penalty
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        (F.mse_loss(big(x), torch.ones(2, 10)) + penalty()).backward()
        opt.step()
    big.eval()
    baked = efx.bake(big)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert efx.companded(big)  # bake copies unless inplace=True
    small = efx.contract(big)
    assert not any(parametrize.is_parametrized(m) for m in small.modules())
    assert list(small.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert rel_err(big(x), baked(x)) <= 1e-6
        assert rel_err(big(x), small(x)) <= 1e-5


def test_bake_compact_model_restores_keys_and_class():
    model = MODELS["tiny_resnet"]().eval()
    comp = efx.compand(model, psi="erf", a=1, b=1, inplace=False)
    sgd_steps(comp, torch.randn(2, 3, 32, 32), steps=2)
    baked = efx.bake(comp)
    assert list(baked.state_dict()) == list(model.state_dict())
    assert [type(m) for m in baked.modules()] == [type(m) for m in model.modules()]


def test_learnable_a_b_move_and_survive_save_load():
    torch.manual_seed(0)
    model = efx.compand(small_linear(), a=0.5, b=1.0, learnable="layer")
    sgd_steps(model, torch.randn(8, 5), steps=3, lr=0.1)
    comp = model[0].parametrizations.weight[0]
    assert comp.a.item() != 0.5 and comp.b.item() != 1.0
    assert any(p is comp.a for p in model.parameters())  # the optimizer sees them
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = efx.compand(small_linear(), a=0.5, b=1.0, learnable="layer")
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh[0].parametrizations.weight[0].a.item() == comp.a.item()
    x = torch.randn(3, 5)
    assert torch.equal(fresh(x), model(x))


def test_summary_lists_weights_with_a_and_b():
    model = efx.compand(small_linear(), psi="arsinh", a=0.9, b=0.6)
    text = efx.compander.summary(model)
    assert "0.weight" in text and "2.weight" in text and "arsinh" in text
    assert "0.9" in text and "0.6" in text and "fixed" in text


def test_contract_of_companded_compact_model_bakes_and_says_so():
    model = efx.compand(small_linear(), inplace=False)
    with pytest.warns(UserWarning, match=r"baked its 2 companded weights"):
        out = efx.contract(model)
    assert not any(parametrize.is_parametrized(m) for m in out.modules())
    x = torch.randn(2, 5)
    assert rel_err(model(x), out(x)) <= 1e-6
    copy.deepcopy(out)
