"""Collapsed execution: same function, same gradients for every factor, cache never stale."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import count, examples, randomize, rel_err, sgd_steps
from test_roundtrip_property import conv_cases, rates
from torch import nn

import expandfx as efx
from expandfx import execution
from expandfx.models import EXAMPLE_SHAPES, MODELS


def run(model: nn.Module, x: torch.Tensor, mode: str):
    """Output and per-parameter gradients of a fixed loss in ``mode``."""
    model = efx.set_mode(copy.deepcopy(model), mode)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(seq, col, tol=1e-4):
    (out_s, grad_s), (out_c, grad_c) = seq, col
    assert rel_err(out_s, out_c) <= 1e-5
    assert grad_s.keys() == grad_c.keys()
    # float32 rounding scales with the largest gradient in play (a true gradient of ~0,
    # e.g. of a first bias whose effect cancels, comes out as rounding noise in either mode)
    scale = max(g.abs().max().item() for g in grad_s.values()) + 1e-12
    for name in grad_s:
        assert (grad_s[name] - grad_c[name]).abs().max().item() <= tol * scale, name


@settings(max_examples=examples(80, 1000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), r=rates, rule=st.sampled_from(["CL", "CK"]), seed=st.integers(0, 99))
def test_collapsed_equals_sequential_on_random_layers(case, r, rule, seed):
    conv, shape = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = efx.expand(nn.Sequential(conv), rule=rule, r=r)
    if not isinstance(big[0], efx.ExpandedBlock):
        return
    randomize(big, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert_same(run(big, x, "sequential"), run(big, x, "collapsed"))
    count("random conv layers: collapsed == sequential (outputs and every gradient)")


@pytest.mark.parametrize(("name", "rule"), [
    ("smallnet_7x7", "CL+FC"), ("smallnet_7x7", "CK+FC"), ("mobilenet_v1", "CL+FC"),
    ("tiny_unet", "CL"), ("cnn1d", "CK+FC"), ("cnn1d", "CL+FC")])
def test_training_in_each_mode_gives_the_same_model(name, rule):
    torch.manual_seed(0)
    model = MODELS[name]()
    outputs = [r.path for r in efx.plan(model, rule, 2).rows if "output layer" in (r.reason or "")]
    # float64: in float32 the two modes' rounding differs, and BatchNorm's training-mode
    # backward on a small batch amplifies it past 1e-4 in three steps (mobilenet_v1: 7e-4)
    big = efx.expand(model, rule, r=2, include=["*", *outputs]).double()  # the logit layer too
    x = torch.randn(EXAMPLE_SHAPES[name], dtype=torch.float64)
    seq = efx.set_mode(copy.deepcopy(big), "sequential")
    col = efx.set_mode(copy.deepcopy(big), "collapsed")
    assert_same(run(seq, x, "sequential"), run(col, x, "collapsed"))
    sgd_steps(seq, x, steps=3, lr=0.01)
    sgd_steps(col, x, steps=3, lr=0.01)
    for (n, p), q in zip(seq.named_parameters(), col.parameters(), strict=True):
        assert rel_err(p.detach(), q.detach()) <= 1e-4, n
    col.eval()
    small = efx.contract(col)  # a model trained collapsed contracts exactly
    with torch.no_grad():
        assert rel_err(col(x), small(x)) <= 1e-5


def test_collapsed_with_compander_on_factors():
    torch.manual_seed(0)
    big = efx.compand(efx.expand(MODELS["smallnet_7x7"](), "CK+FC", r=2), a=1.0, b=0.6,
                      learnable="layer")
    x = torch.randn(2, 3, 32, 32)
    assert_same(run(big, x, "sequential"), run(big, x, "collapsed"))


def test_eval_cache_is_invalidated_by_optimizer_step_and_load_state_dict():
    torch.manual_seed(0)
    big = efx.expand(MODELS["smallnet_7x7"](), "CL+FC", r=2, mode="collapsed")
    x = torch.randn(2, 3, 32, 32)
    snapshot = copy.deepcopy(big.state_dict())
    block = big.features[0]
    big.eval()
    with efx.frozen(big):
        with torch.no_grad():
            y0 = big(x)
            assert execution._FROZEN[block][1] is not None
            assert torch.equal(big(x), y0)  # served from the cache
        big.train()
        sgd_steps(big, x, steps=1)
        big.eval()
        with torch.no_grad():
            y1 = big(x)
            reference = efx.set_mode(copy.deepcopy(big), "sequential")(x)
        assert not torch.allclose(y0, y1) and rel_err(reference, y1) <= 1e-5
        big.load_state_dict(snapshot)
        with torch.no_grad():
            assert rel_err(y0, big(x)) <= 1e-6
            block.layers[1].weight.mul_(2)  # any in-place edit through the parameter
            assert rel_err(efx.set_mode(copy.deepcopy(big), "sequential")(x), big(x)) <= 1e-5
    assert block not in execution._FROZEN  # the cache lives only inside frozen()


def test_frozen_never_leaks_into_copies_and_sees_dtype_changes():
    big = efx.expand(MODELS["smallnet_7x7"](), "CL", r=2, mode="collapsed").eval()
    x = torch.randn(2, 3, 32, 32)
    with efx.frozen(big), torch.no_grad():
        with efx.frozen(big):  # nested: the outer one keeps caching
            big(x)
        big(x)
        assert execution._FROZEN[big.features[0]][1] is not None
        twin = copy.deepcopy(big)
        assert twin.features[0] not in execution._FROZEN
        for p in twin.parameters():
            p.data.mul_(2)
        assert not torch.allclose(twin(x), big(x))
        big.double()
        assert big(x.double()).dtype == torch.float64  # key includes dtype: no stale fold


def test_no_cache_outside_frozen_so_data_edits_are_seen():
    big = efx.expand(MODELS["smallnet_7x7"](), "CL", r=2, mode="collapsed").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = big(x)
        for p in big.parameters():
            p.data.mul_(0.5)  # invisible to version counters
        y1 = big(x)
        reference = efx.set_mode(copy.deepcopy(big), "sequential")(x)
    assert not torch.allclose(y0, y1) and rel_err(reference, y1) <= 1e-5


def test_no_cache_while_gradients_are_needed():
    big = efx.expand(MODELS["smallnet_7x7"](), "CL", r=2, mode="collapsed").eval()
    x = torch.randn(2, 3, 32, 32)
    big(x).sum().backward()
    big(x).sum().backward()  # a cached graph would fail the second backward
    assert big.features[0] not in execution._FROZEN


def test_auto_picks_per_input_shape():
    big = efx.expand(nn.Sequential(nn.Conv2d(3, 8, 7, padding=3)), "CL", r=4)
    block = big[0]
    assert block.mode == "auto"
    assert block.resolve_mode(torch.Size([128, 3, 32, 32])) == "collapsed"
    assert block.resolve_mode(torch.Size([1, 3, 1, 1])) == "sequential"
    x = torch.randn(1, 3, 1, 1)
    assert rel_err(efx.set_mode(copy.deepcopy(big), "collapsed")(x), big(x)) <= 1e-5


def test_bad_mode():
    with pytest.raises(efx.ConfigError, match=r"execution mode must be one of"):
        efx.expand(MODELS["smallnet_3x3"](), "CL", r=2, mode="fast")
