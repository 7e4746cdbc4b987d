"""compose_chain against running the layers one after another, in float64."""

import pytest
import torch
from torch import nn

from expandfx.linear.compose import compose_chain

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [(3, 1, 2), (1, 3, 2), (1, 2, 1), (2, 2, 1)])
def test_chain_of_convs_is_one_conv(dims, groups, dilation, bias, sizes):
    torch.manual_seed(dims * 10 + groups)
    conv = CONV[dims]
    ks = [(k,) * dims for k in sizes]
    total = sum(sizes) - 2
    widths = [4, 6, 8, 2]
    layers = [conv(widths[i], widths[i + 1], ks[i], dilation=dilation, groups=groups,
                   bias=bias).double() for i in range(3)]
    weight, b = compose_chain([(lay.weight, lay.bias) for lay in layers], groups)
    assert weight.shape == (2, 4 // groups, *(total,) * dims)
    x = torch.randn(2, 4, *(9,) * dims, dtype=torch.float64)
    y = x
    for layer in layers:
        y = layer(y)
    one = conv(4, 2, total, dilation=dilation, groups=groups, bias=bias).double()
    with torch.no_grad():
        one.weight.copy_(weight)
        if bias:
            one.bias.copy_(b)
    assert (b is None) == (not bias)
    torch.testing.assert_close(one(x), y, rtol=1e-12, atol=1e-12)


def test_linear_chain_is_matrix_product():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 7).double(), nn.Linear(7, 3).double()
    w, bias = compose_chain([(a.weight, a.bias), (b.weight, b.bias)])
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(x @ w.T + bias, b(a(x)), rtol=1e-12, atol=1e-12)


def test_pointwise_after_strided_layer_folds():
    torch.manual_seed(1)
    a = nn.Conv2d(3, 5, 3, stride=2).double()
    b = nn.Conv2d(5, 4, 1).double()
    w, bias = compose_chain([(a.weight, a.bias), (b.weight, b.bias)])
    x = torch.randn(1, 3, 11, 11, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, w, bias, stride=2)
    torch.testing.assert_close(y, b(a(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize(("ka", "kb"), [((3, 3), (3, 3)), ((5, 5), (3, 3)), ((3, 5), (3, 1)),
                                        ((1, 1), (3, 3)), ((3, 3), (1, 1)), ((1, 1), (1, 1))])
def test_every_kernel_composition_method_gives_the_same_values_and_gradients(groups, ka, kb):
    """The fold path, the conv path and the pointwise paths against each other (float64)."""
    from expandfx.linear import compose as algebra

    torch.manual_seed(groups)
    wa = torch.randn(4 * groups, 3, *ka, dtype=torch.float64, requires_grad=True)
    wb = torch.randn(5 * groups, 4, *kb, dtype=torch.float64, requires_grad=True)
    ref = algebra._compose_kernels_conv(wa, wb, groups)
    ref_grads = torch.autograd.grad(ref, (wa, wb), torch.linspace(-1, 1, ref.numel()).view_as(ref))
    outs = [algebra._compose_kernels(wa, wb, groups)]
    if ka != (1, 1) and kb != (1, 1):
        outs.append(algebra._fold_kernels(wa, wb, groups))
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out, (wa, wb), torch.linspace(-1, 1, out.numel()).view_as(out))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_tune_kernels_measures_each_spatial_pair_once_and_leaves_rng_alone():
    """The tuner (execution) times each spatial pair of the chain and records the faster
    method where composition reads it (linear.compose); the caller's RNG and grads stay."""
    from expandfx import execution
    from expandfx.linear import compose

    execution.forget_measurements()
    layers = [nn.Conv2d(3, 6, 3), nn.Conv2d(6, 7, 3), nn.Conv2d(7, 2, 3)]
    factors = [(lay.weight, lay.bias) for lay in layers]
    rng = torch.get_rng_state()
    chosen = execution.tune_kernels(factors, 1, repeats=1)
    assert torch.equal(rng, torch.get_rng_state())
    # two spatial pairs in the chain's best order, both among {(6,3,3,3)->(7,6,3,3), ...}
    shapes = {(6, 3, 3, 3), (7, 3, 5, 5), (7, 6, 3, 3), (2, 7, 3, 3), (2, 6, 5, 5)}
    assert len(chosen) == 2 and all(a in shapes and b in shapes for a, b in chosen)
    assert set(chosen.values()) <= {"conv", "fold"}
    for (a, b), method in chosen.items():
        assert compose.known_kernel_method(a, b, 1, torch.float32, "cpu") == method
        wa, wb = torch.zeros(a), torch.zeros(b)
        assert compose.kernel_method(wa, wb, 1) == method  # what composition now uses
    assert all(lay.weight.grad is None for lay in layers)
    execution.forget_measurements()
    a, b = next(iter(chosen))
    assert compose.known_kernel_method(a, b, 1, torch.float32, "cpu") is None
