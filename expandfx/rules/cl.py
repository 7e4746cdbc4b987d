"""Expand-CL: a convolution ``m → n`` (kernel K) becomes 1×1 (m→p) · K (p→q) · 1×1 (q→n).

p = r·m and q = r·n, rounded to multiples of ``groups``; every layer keeps the
groups (depthwise expands within each group) and the bias presence.

Why it is exact: the padding (and its mode) sits on the first 1×1 layer, which
pads the *input* exactly as the original does; the bias of that 1×1 is constant
over space, so the unpadded K layer turns it into a constant. Stride and dilation
sit on the K layer; the last 1×1 commutes with stride. Hence the chain is one
convolution with kernel ``W3 · W2 · W1`` (per tap) — see ``expandfx.linear.compose``.

A transposed convolution ``ConvTransposeNd(m → n, K)`` becomes 1×1 conv (m→p, no bias) ·
``ConvTransposeNd`` (p→q, K, with the layer's stride, padding, output_padding, dilation and
groups) · 1×1 conv (q→n). A 1×1 conv acts on channels, the transposed conv's scatter (and
its crop and output_padding) on positions, so they commute and the chain is one transposed
conv of kernel ``W[i, o, k] = Σ_{a,b} W1[a, i] W2[a, b, k] W3[o, b]`` (per group). The first
factor carries no bias: a constant scattered with stride and cropped reaches border and
stride-phase outputs through different numbers of taps, so it would be no constant; the
bias lives on the transposed factor and the last 1×1 (``docs/design.md §3``).

Example::

    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv2d(3, 8, 7, padding=3)
    >>> block = build(conv, r=4)
    >>> [tuple(l.weight.shape) for l in block.layers]
    [(12, 3, 1, 1), (32, 12, 7, 7), (8, 32, 1, 1)]
    >>> up = build(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), r=2)
    >>> [(type(l).__name__, tuple(l.weight.shape)) for l in up.layers]
    [('Conv2d', (16, 8, 1, 1)), ('ConvTranspose2d', (16, 8, 4, 4)), ('Conv2d', (4, 8, 1, 1))]
    >>> up.layers[0].bias is None                   # a bias here would not stay a constant
    True
"""

from __future__ import annotations

__all__ = ["RULE", "build", "skip_reason"]

import torch
from torch import nn

from ..block import ExpandedBlock
from ..layer_types import is_transposed
from .base import Rule
from .factors import (
    conv_factor,
    first_padding,
    match_requires_grad,
    preserve_three,
    transposed_factor,
    width,
)


def skip_reason(conv: nn.Module) -> str | None:
    """CL applies to every convolution, transposed ones included."""
    return None


def build(conv: nn.Module, r: float, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None) -> ExpandedBlock:
    g, m, n = conv.groups, conv.in_channels, conv.out_channels
    p, q = width(r, m, g), width(r, n, g)
    ones = (1,) * len(conv.kernel_size)
    if is_transposed(conv):  # bias-free first 1×1; the padding crops in the middle factor
        layers = [conv_factor(conv, m, p, ones, bias=False, device=device),
                  transposed_factor(conv, p, q, device=device),
                  conv_factor(conv, q, n, ones, device=device)]
        if init == "preserve":
            preserve_three(conv, layers, g, path=path, r=r)
        match_requires_grad(conv, layers)
        return ExpandedBlock(conv, layers, rule="CL", r=r)
    padding, pre_pad = first_padding(conv)
    layers = [
        conv_factor(conv, m, p, ones, padding=padding, padding_mode=conv.padding_mode,
                    device=device),
        conv_factor(conv, p, q, conv.kernel_size, stride=conv.stride, dilation=conv.dilation,
                    device=device),
        conv_factor(conv, q, n, ones, device=device),
    ]
    if init == "preserve":
        preserve_three(conv, layers, g, path=path, r=r)
    match_requires_grad(conv, layers)
    return ExpandedBlock(conv, layers, rule="CL", r=r, pre_pad=pre_pad)


RULE = Rule("CL", "conv", skip_reason, build,
            "a convolution becomes 1×1 · K · 1×1 (ExpandNets, Expand-CL)")
