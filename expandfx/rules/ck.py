"""Expand-CK: a convolution with odd kernel k > 3 becomes l = (k−1)/2 layers of 3×3.

Widths m→p, p→q, …, q→n (p = r·m, q = r·n); every layer keeps groups, bias
presence and dilation d; padding P (and its mode) goes on the first layer,
stride s on the last. Non-square kernels shorten per dimension: a dimension of
odd size k > 3 gets 3 in its first (k−1)/2 layers and 1 after; a dimension of
size ≤ 3 keeps its size in the first layer and 1 after. An even size > 3 cannot
be written as a chain of 3s, so such layers are skipped (use CL).

Why it is exact: stride-1 valid convolutions with a common dilation compose into
one convolution whose kernel is the full convolution of the kernels (sizes add
up: 3 + 3 + 3 − 2 = 7); biases become constants; a stride on the last layer
subsamples the composed output, which is the strided composed convolution.

Example::

    >>> import torch.nn as nn
    >>> block = build(nn.Conv2d(8, 16, 7, padding=3), r=2)
    >>> [tuple(l.weight.shape) for l in block.layers]
    [(16, 8, 3, 3), (32, 16, 3, 3), (16, 32, 3, 3)]
"""

from __future__ import annotations

__all__ = ["RULE", "build", "skip_reason"]

import torch
from torch import nn

from ..block import ExpandedBlock
from ..errors import ConfigError
from .base import Rule
from .factors import conv_factor, first_padding, match_requires_grad, width


def skip_reason(conv: nn.Module) -> str | None:
    k = conv.kernel_size
    if any(size > 3 and size % 2 == 0 for size in k):
        return f"CK: kernel {k} has an even size > 3, which is no chain of 3-wide kernels (use CL)"
    if all(size <= 3 for size in k):
        return f"CK: kernel {k} has no odd size > 3 to shorten"
    return None


def factor_kernels(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-layer kernels: ``(1, 7)`` → ``[(1, 3)] * 3``; ``(3, 5)`` → ``[(3, 3), (1, 3)]``."""
    depth = max((k - 1) // 2 for k in kernel)

    def size(k: int, i: int) -> int:
        if k > 3:
            return 3 if i < (k - 1) // 2 else 1
        return k if i == 0 else 1

    return [tuple(size(k, i) for k in kernel) for i in range(depth)]


def build(conv: nn.Module, r: float, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None) -> ExpandedBlock:
    if init == "preserve":
        raise ConfigError(
            f"expand: init='preserve' is not possible for '{path}' with rule CK: a "
            f"{conv.kernel_size} kernel does not in general factor into 3-wide kernels. "
            f"Use init='default', or rule CL to keep a pretrained layer's function."
        )
    g, m, n = conv.groups, conv.in_channels, conv.out_channels
    kernels = factor_kernels(conv.kernel_size)
    widths = [m, width(r, m, g)] + [width(r, n, g)] * (len(kernels) - 2) + [n]
    padding, pre_pad = first_padding(conv)
    last = len(kernels) - 1
    layers = [
        conv_factor(conv, widths[i], widths[i + 1], k, dilation=conv.dilation,
                    stride=conv.stride if i == last else 1,
                    padding=padding if i == 0 else 0,
                    padding_mode=conv.padding_mode if i == 0 else "zeros", device=device)
        for i, k in enumerate(kernels)
    ]
    match_requires_grad(conv, layers)
    return ExpandedBlock(conv, layers, rule="CK", r=r, pre_pad=pre_pad)


RULE = Rule("CK", "conv", skip_reason, build,
            "a k×k convolution (odd k > 3) becomes (k−1)/2 layers of 3×3 (ExpandNets, Expand-CK)",
            inits=("default",))
