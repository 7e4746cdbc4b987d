"""Property: for any conv/linear layer, contract(expand(layer)) computes what expand(layer) does.

Random layers over every hyperparameter the core pass supports; the expanded
weights are randomized after expansion, so the check is on trained-like factors,
not on an identity init. Tolerance: docs/design.md §4 (1e-5 of the max output, fp32).
"""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import count, draw_channels, examples, randomize, rel_err
from torch import nn

import expandfx as efx
from expandfx.rules import RULES

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
HYPER = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    kmax, dmax = (9, 3) if dims < 3 else (5, 2)
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, dmax)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    form = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if form == "same":
        stride = (1,) * dims  # PyTorch: 'same' needs stride 1
        padding = "same"
        pads = [d * (k - 1) - d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True)]
    elif form == "valid":
        padding, pads = "valid", [0] * dims
    elif form == "int":
        padding = draw(st.integers(0, 4))
        pads = [padding] * dims
    else:
        pads = [draw(st.integers(0, 4)) for _ in range(dims)]
        padding = tuple(pads)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros" and form == "valid":
        mode = "zeros"
    g, m, n = draw_channels(draw, most=6, per_group=3, depthwise=6)
    bias = draw(st.booleans())
    conv = CONV[dims](m, n, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=g, bias=bias, padding_mode=mode)
    # every spatial size large enough for the kernel and for reflect/circular padding
    size = [max(d * (k - 1) + 1, p + 1) + draw(st.integers(0, 3))
            for k, d, p in zip(kernel, dilation, pads, strict=True)]
    if dims == 3:
        size = [min(s, 14) for s in size]
        size = [max(s, d * (k - 1) + 1, p + 1) for s, k, d, p in zip(size, kernel, dilation, pads,
                                                                        strict=True)]
    return conv, (2, m, *size)


rates = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0])


def roundtrip(layer: nn.Module, shape, rule: str, r: float, seed: int):
    model = nn.Sequential(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            big = efx.expand(model, rule=rule, r=r, include=["0"])  # "0": also the output
        except efx.ConfigError as exc:  # asked for exactly, so a layer it cannot take raises
            if "cannot represent every weight" not in str(exc):
                assert rule == "CK" and "CK: kernel" in str(exc)
                return model, model, None, None
            # an expansion narrower than the layer is refused (it would contract it), but
            # its algebra is still exact: check the block the rule builds, directly
            big = nn.Sequential(RULES[rule].build(layer, r))
    randomize(big, seed)
    small = efx.contract(big) if isinstance(big[0], efx.ExpandedBlock) else None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return model, big, small, x


@settings(max_examples=examples(300, 3000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), r=rates, rule=st.sampled_from(["CL", "CK"]), seed=st.integers(0, 99))
def test_conv_roundtrip_is_exact(case, r, rule, seed):
    conv, shape = case
    model, big, small, x = roundtrip(conv, shape, rule, r, seed)
    if small is None:  # CK on a kernel it cannot shorten: left alone, and the plan says why
        assert rule == "CK"
        assert efx.plan(model, rule, r).rows[0].reason.startswith("CK:")
        return
    with torch.no_grad():
        expected, got = big(x), small(x)
    assert got.shape == expected.shape
    assert rel_err(expected, got) <= 1e-5
    folded = small[0]
    assert type(folded) is type(conv)
    for attr in HYPER:
        assert getattr(folded, attr) == getattr(conv, attr), attr
    assert (folded.bias is None) == (conv.bias is None)
    assert folded.weight.shape == conv.weight.shape
    count("random conv layers (1D/2D/3D, every hyperparameter): expand → contract exact")


@settings(max_examples=examples(40, 400), deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), bias=st.booleans(), r=rates,
       seed=st.integers(0, 99), lead=st.sampled_from([(3,), (2, 5)]))
def test_linear_roundtrip_is_exact(m, n, bias, r, seed, lead):
    model, big, small, _ = roundtrip(nn.Linear(m, n, bias=bias), (1, m), "FC", r, seed)
    x = torch.randn(*lead, m)
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5
    assert (small[0].bias is None) == (not bias)
    assert [len(b.layers) for b in [big[0]]] == [3]
    count("random linear layers: expand → contract exact")
