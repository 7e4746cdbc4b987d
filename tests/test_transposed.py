"""Transposed convolutions under CL: 1×1 conv (no bias) · ConvTransposeNd · 1×1 conv.

Properties over dims 1/2/3, stride, padding, output_padding, dilation, groups, bias and r:
expand → SGD steps in training mode → contract gives the same class, hyperparameters and
keys, within 1e-5 relative in float32 and 1e-12 in float64 (docs/design.md §3, §4);
collapsed and sequential execution give the same gradients (1e-10, float64); preserve-init
is exact. Then a real model (TinyUNet with transposed upsampling) to ONNX, the plan's rows
and MACs, and what the other rules say.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import count, draw_channels, examples, randomize, rel_err, sgd_steps
from torch import nn

import expandfx as efx
from expandfx.models.unet import TinyUNet
from expandfx.rules import RULES

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
HYPER = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding",
         "dilation", "groups", "padding_mode")
RATES = [0.25, 0.5, 1.0, 1.5, 2.0, 4.0]


@st.composite
def transposed_cases(draw):
    """A random ConvTransposeNd and an input shape it maps to a non-empty output."""
    dims = draw(st.sampled_from([1, 2, 3]))
    kmax = 4 if dims < 3 else 3
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(dims))
    # torch: output_padding must be smaller than either the stride or the dilation
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1))
                           for s, d in zip(stride, dilation, strict=True))
    g, m, n = draw_channels(draw, most=5, per_group=2, depthwise=4)
    bias = draw(st.booleans())
    layer = TRANSPOSED[dims](m, n, kernel, stride=stride, padding=padding,
                             output_padding=output_padding, groups=g, bias=bias,
                             dilation=dilation)
    # each input size large enough that the cropped output keeps at least one position
    size = []
    for k, s, d, p in zip(kernel, stride, dilation, padding, strict=True):
        least = 1 + max(0, math.ceil((2 * p - d * (k - 1)) / s))
        size.append(max(least, 2) + draw(st.integers(0, 3 if dims < 3 else 1)))
    return layer, (2, m, *size)


def expanded(layer: nn.Module, r: float, init: str = "default") -> nn.Module:
    """``Sequential(layer)`` under CL — or, where the plan refuses r (it would shrink the
    layer), the block CL builds, whose algebra must be exact all the same."""
    model = nn.Sequential(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return efx.expand(model, "CL", r, include=["0"], init=init)
        except efx.ConfigError as exc:
            assert "cannot represent every weight" in str(exc)
            return nn.Sequential(RULES["CL"].build(layer, r, init))


@settings(max_examples=examples(120, 2000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=transposed_cases(), r=st.sampled_from(RATES),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99))
def test_trained_expansion_contracts_exactly_to_the_same_class(case, r, dtype, seed):
    layer, shape = case
    layer = layer.to(dtype)
    big = expanded(layer, r)
    block = big[0]
    first, middle, last = block.layers
    assert type(first) is type(last) is CONV[len(layer.kernel_size)]  # plain 1×1 convs
    assert first.kernel_size == last.kernel_size == (1,) * len(layer.kernel_size)
    assert first.bias is None and type(middle) is type(layer)
    assert (middle.bias is None) == (last.bias is None) == (layer.bias is None)
    assert {f.groups for f in block.layers} == {layer.groups}
    randomize(big, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    big.train()
    sgd_steps(big, x, steps=2, lr=0.01)  # real training steps: trained, not initial factors
    small = efx.contract(big)
    folded = small[0]
    assert type(folded) is type(layer)
    for attr in HYPER:
        assert getattr(folded, attr) == getattr(layer, attr), attr
    assert list(small.state_dict()) == list(nn.Sequential(layer).state_dict())
    assert folded.weight.shape == layer.weight.shape and folded.weight.dtype == dtype
    with torch.no_grad():
        want, got = big(x), small(x)
    assert got.shape == want.shape == layer(x).shape
    assert rel_err(want, got) <= (1e-12 if dtype == torch.float64 else 1e-5)
    count("random transposed convs (1D/2D/3D, every hyperparameter): train → contract exact")


def outputs_and_grads(model: nn.Module, x: torch.Tensor, mode: str):
    model = efx.set_mode(copy.deepcopy(model), mode)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=x.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@settings(max_examples=examples(60, 1000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=transposed_cases(), r=st.sampled_from(RATES), seed=st.integers(0, 99))
def test_collapsed_and_sequential_give_the_same_gradients(case, r, seed):
    layer, shape = case
    big = expanded(layer.double(), r)
    randomize(big, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out_s, grad_s), (out_c, grad_c) = (outputs_and_grads(big, x, "sequential"),
                                        outputs_and_grads(big, x, "collapsed"))
    assert rel_err(out_s, out_c) <= 1e-12
    assert grad_s.keys() == grad_c.keys() == dict(big.named_parameters()).keys()
    scale = max(g.abs().max().item() for g in grad_s.values()) + 1e-300
    for name in grad_s:
        assert (grad_s[name] - grad_c[name]).abs().max().item() <= 1e-10 * scale, name
    count("random transposed convs: collapsed == sequential (outputs and every gradient)")


@settings(max_examples=examples(40, 500), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=transposed_cases(), r=st.sampled_from([1.0, 1.5, 2.0, 4.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99))
def test_preserve_init_computes_the_layer(case, r, dtype, seed):
    layer, shape = case
    torch.manual_seed(seed)
    layer = layer.to(dtype)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()  # a bias that matters
    big = expanded(layer, r, init="preserve")
    assert all(f.weight.abs().sum() > 0 for f in big[0].layers)  # no factor is all-zero
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert rel_err(layer(x), big(x)) <= (1e-12 if dtype == torch.float64 else 1e-5)
    count("random transposed convs: init='preserve' computes the layer")


def test_preserve_needs_r_at_least_one():
    with pytest.raises(efx.ConfigError, match=r"init='preserve' cannot keep '0' exact with "
                                              r"r=0.5.*r >= 1"):
        RULES["CL"].build(nn.ConvTranspose2d(8, 8, 2, stride=2), 0.5, "preserve", path="0")


@pytest.mark.parametrize("mode", ["sequential", "collapsed"])
def test_output_size_picks_the_output_padding_in_both_modes(mode):
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
    block = efx.set_mode(RULES["CL"].build(up, 2, "preserve"), mode)
    x = torch.randn(2, 4, 5, 7)
    for size in ([9, 13], [10, 14], [10, 13]):
        with torch.no_grad():
            want, got = up(x, output_size=size), block(x, output_size=size)
        assert got.shape[2:] == tuple(size) and rel_err(want, got) <= 1e-5


def test_unet_with_transposed_upsampling_expands_contracts_and_exports(tmp_path):
    torch.manual_seed(0)
    model = TinyUNet(upsample="transposed")
    x = torch.randn(2, 3, 32, 32)
    plan = efx.plan(model, "CL", 2, example_inputs=(x,))
    rows = {row.path: row for row in plan.rows}
    assert rows["up2.up"].rule == rows["up1.up"].rule == "CL"
    assert rows["up2.up"].layer == "ConvTranspose2d(32→16, k3, s2, p1, op1)"
    big = efx.expand(model, "CL", 2, example_inputs=(x,))
    assert isinstance(big.up2.up, efx.ExpandedBlock) and isinstance(big.up1.up, efx.ExpandedBlock)
    sgd_steps(big, x, steps=3, lr=0.01)  # training mode: BatchNorms move, blocks train
    big.eval()
    small = efx.contract(big)
    assert type(small.up2.up) is nn.ConvTranspose2d and small.up2.up.output_padding == (1, 1)
    assert list(small.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5
    fresh = TinyUNet(upsample="transposed")
    fresh.load_state_dict(small.state_dict())  # the compact class takes the trained weights
    report = efx.export_onnx(big, (x,), tmp_path / "unet.onnx")
    assert report.passed and report.verified and report.structure_matches is True
    assert report.op_histogram.get("ConvTranspose") == 2


def test_plan_counts_the_expanded_transposed_conv_as_torch_does():
    from torch.utils.flop_counter import FlopCounterMode

    up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2)
    model = nn.Sequential(up)
    x = torch.randn(2, 8, 6, 6)
    row = efx.plan(model, "CL", 2, example_inputs=(x,)).rows[0]
    big = efx.set_mode(efx.expand(model, "CL", 2), "sequential")
    with torch.no_grad():
        with FlopCounterMode(display=False) as before:
            model(x)
        with FlopCounterMode(display=False) as after:
            big(x)
    # 2·8·36 inputs × 2 outputs per group × 16 taps; then 1×1 (8→16), the transposed
    # conv (16→8) and 1×1 (8→4), each MAC half of torch's flop count
    assert row.macs_before == before.get_total_flops() // 2 == 2 * 8 * 36 * 2 * 16
    assert row.macs_after == after.get_total_flops() // 2
    assert row.params_after == sum(p.numel() for p in big.parameters())


def test_plan_says_which_rules_apply_to_transposed_convs():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 5, stride=2))
    assert efx.plan(model, "CL", 2).rows[0].rule == "CL"
    for rule in ("CK", "RepVGG", "ACNet", "DBB", "MobileOne", "OREPA"):
        row = efx.plan(model, rule, 2 if rule == "CK" else None).rows[0]
        assert row.rule is None
        assert row.reason.startswith(f"{rule} does not apply to transposed convolutions: ")
        assert row.reason.endswith("; use CL")
        if rule != "CK":
            assert "sums of transposed-convolution branches are not folded" in row.reason
    assert efx.plan(model, "FC", 2).rows[0].reason == "rule FC does not apply to ConvTranspose2d"
    with pytest.raises(efx.ConfigError, match=r"'0' was requested exactly \(rule mapping key "
                                              r"'0'\).*CK does not apply to transposed"):
        efx.expand(model, {"0": "CK"}, 2)


def test_an_edited_transposed_factor_is_refused_at_contract():
    big = efx.expand(nn.Sequential(nn.ConvTranspose1d(4, 4, 3, stride=2)), "CL", 2)
    big[0].layers[1].output_padding = (1,)
    with pytest.raises(efx.ContractionError, match=r"was edited after expansion"):
        efx.contract(big)


def test_companded_transposed_block_trains_and_bakes_into_the_compact_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 3, 2, stride=2), nn.ReLU())
    big = efx.compand(efx.expand(model, "CL", 2), a=1.0, b=0.7)
    assert len(efx.companded(big)) == 3  # every factor, the transposed one included
    x = torch.randn(2, 4, 5, 5)
    sgd_steps(big, x, steps=2, lr=0.01)
    small = efx.contract(big)
    assert type(small[0]) is nn.ConvTranspose2d and not efx.companded(small)
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5


def test_auto_mode_times_both_executions_of_a_transposed_block(monkeypatch):
    from expandfx import execution

    execution.forget_measurements()
    monkeypatch.delenv(execution.MEASURE_ENV, raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, output_padding=1))
    big = efx.expand(model, "CL", 2)  # mode="auto"
    x = torch.randn(4, 8, 12, 12)
    want = outputs_and_grads(big, x, "sequential")
    out = big(x)  # measures: forward and backward of both executions, on detached copies
    found = [m for m in execution.measurements() if m.shape == tuple(x.shape)]
    assert len(found) == 1 and found[0].grad and set(found[0].seconds) == {"sequential",
                                                                           "collapsed"}
    assert all(p.grad is None for p in big.parameters())  # timing leaves no .grad behind
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert rel_err(want[0], out.detach()) <= 1e-5
    for name, p in big.named_parameters():
        assert rel_err(want[1][name], p.grad) <= 1e-4, name
    # the MAC model: collapsed runs the compact layer plus the fold of the 3 factors
    block = big[0]
    assert execution.collapsed_macs(block, x.shape) == (
        efx.plan(model, "CL", 2, example_inputs=(x,)).rows[0].macs_before
        + execution.compose_macs(block))
    assert sorted({g["lr"] for g in efx.param_groups(big, lr=0.3)}) == [pytest.approx(0.1)]
    execution.forget_measurements()
