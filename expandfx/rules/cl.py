"""Expand-CL: a convolution ``m → n`` (kernel K) becomes 1×1 (m→p) · K (p→q) · 1×1 (q→n).

p = r·m and q = r·n, rounded to multiples of ``groups``; every layer keeps the
groups (depthwise expands within each group) and the bias presence.

Why it is exact: the padding (and its mode) sits on the first 1×1 layer, which
pads the *input* exactly as the original does; the bias of that 1×1 is constant
over space, so the unpadded K layer turns it into a constant. Stride and dilation
sit on the K layer; the last 1×1 commutes with stride. Hence the chain is one
convolution with kernel ``W3 · W2 · W1`` (per tap) — see ``expandfx.linear.compose``.

Example::

    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv2d(3, 8, 7, padding=3)
    >>> block = build(conv, r=4)
    >>> [tuple(l.weight.shape) for l in block.layers]
    [(12, 3, 1, 1), (32, 12, 7, 7), (8, 32, 1, 1)]
"""

from __future__ import annotations

__all__ = ["RULE", "build", "skip_reason"]

import torch
from torch import nn

from ..block import ExpandedBlock
from .base import Rule
from .factors import conv_factor, first_padding, match_requires_grad, preserve_three, width


def skip_reason(conv: nn.Module) -> str | None:
    """CL applies to every convolution."""
    return None


def build(conv: nn.Module, r: float, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None) -> ExpandedBlock:
    g, m, n = conv.groups, conv.in_channels, conv.out_channels
    p, q = width(r, m, g), width(r, n, g)
    ones = (1,) * len(conv.kernel_size)
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
