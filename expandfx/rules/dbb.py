"""DBB (Diverse Branch Block, Ding et al., CVPR 2021): a k×k convolution becomes four branches.

Branches (``<layer>.branches.<name>``): ``kxk`` — the layer's own geometry (and its bias);
``1x1`` — bias-free, same stride and groups, padded ``P − d·(k−1)/2`` so that its tap sits
on the kernel's centre (as RepVGG's); ``1x1_kxk`` — a bias-free grouped 1×1 ``m → m``
(stride 1, no padding), then a bias-free k×k with the layer's geometry; ``avg`` — a
bias-free grouped 1×1 ``m → n``, then k×k *average pooling* with the layer's stride,
padding and dilation. Works for 1-, 2- and 3-D convolutions with odd kernels wider than 1.

Why it is exact: average pooling with ``count_include_pad=True`` over zero padding is the
depthwise convolution with the constant kernel ``1/k^d`` (``<layer>.branches.avg.1.weight``,
a parameter with ``requires_grad=False``: pooling has nothing to learn); a 1×1 followed by a
k×k composes into one k×k (the padding moves to the front of the chain, past the bias-free,
unstrided 1×1); the four k×k kernels then add (``expandfx.linear.fold``).

The inner 1×1 of ``1x1_kxk`` starts as the identity (DBB's ``IdentityBasedConv1x1``), so the
branch starts as a k×k convolution. ``norm=`` (:mod:`expandfx.rules.norms`) adds the norm
at the end of each branch; DBB's BatchNorm after the inner 1×1s (padded by its shift) is
not reproduced (there the 1×1 stays linear in front of the k×k/pooling).
``init="preserve"``: ``kxk`` = the layer, the ``1x1``, the second k×k of ``1x1_kxk`` and the
1×1 of ``avg`` zero.

Example::

    >>> import torch.nn as nn
    >>> block = build(nn.Conv2d(4, 8, 3, padding=1))
    >>> list(block.branches)
    ['kxk', '1x1', '1x1_kxk', 'avg']
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..block import ExpandedBlock, torch_layer_type
from ..linear.ir import explicit_padding, pairs_from_pad
from . import repvgg
from .base import Rule
from .factors import conv_factor, match_requires_grad
from .norms import add_norms

__all__ = ["RULE", "build", "skip_reason"]


def skip_reason(conv: nn.Module) -> str | None:
    reason = repvgg.skip_reason(conv)
    return None if reason is None else reason.replace("RepVGG:", "DBB:", 1)


def build(conv: nn.Module, r: float = 1.0, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None, norm: str | None = None) -> ExpandedBlock:
    m, n, dims, g = conv.in_channels, conv.out_channels, len(conv.kernel_size), conv.groups
    pads = tuple(a for a, _ in pairs_from_pad(explicit_padding(conv)))
    centre = tuple(a - d * (size - 1) // 2
                   for a, d, size in zip(pads, conv.dilation, conv.kernel_size, strict=True))
    one = (1,) * dims

    def factor(c_in: int, c_out: int, kernel: tuple[int, ...], bias: bool = False,
               **geometry) -> nn.Module:
        return conv_factor(conv, c_in, c_out, kernel, bias=bias, padding_mode=conv.padding_mode,
                           device=device, **geometry)

    spatial = {"stride": conv.stride, "padding": pads, "dilation": conv.dilation}
    kxk = factor(m, n, conv.kernel_size, conv.bias is not None, **spatial)
    one_by_one = factor(m, n, one, stride=conv.stride, padding=centre)
    inner, second = factor(m, m, one), factor(m, n, conv.kernel_size, **spatial)
    squeeze = factor(m, n, one)
    pool = torch_layer_type(conv)(
        n, n, conv.kernel_size, groups=n, bias=False, padding_mode=conv.padding_mode,
        device=device or conv.weight.device, dtype=conv.weight.dtype, **spatial)
    with torch.no_grad():
        pool.weight.fill_(1.0 / math.prod(conv.kernel_size))
        inner.weight.copy_(repvgg.dirac(inner.weight.shape, g, inner.weight))
        if init == "preserve":
            kxk.weight.copy_(conv.weight)
            if kxk.bias is not None:
                kxk.bias.copy_(conv.bias)
            for zero in (one_by_one, second, squeeze):
                zero.weight.zero_()
    pool.weight.requires_grad_(False)  # average pooling: a fixed linear map
    match_requires_grad(conv, [kxk, one_by_one, inner, second, squeeze])
    branches = {"kxk": kxk, "1x1": one_by_one, "1x1_kxk": [inner, second],
                "avg": [squeeze, pool]}
    branches = add_norms(conv, branches, norm, init, rule="DBB", path=path, device=device)
    return ExpandedBlock(conv, branches, rule="DBB", r=r)


RULE = Rule("DBB", "conv", skip_reason, build, options=frozenset({"norm"}), uses_r=False,
            summary=
            "a k×k convolution becomes k×k + 1×1 + (1×1 → k×k) + (1×1 → k×k average "
            "pooling) branches, summed (Diverse Branch Block)")
