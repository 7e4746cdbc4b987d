"""compose_chain against running the layers one after another, in float64."""

import pytest
import torch
from torch import nn

from expandfx.algebra import compose_chain

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
