"""ACNet: a k×k convolution (odd k ≥ 3, 2-D) becomes k×k + 1×k + k×1, summed.

Branches (``<layer>.branches.<name>``): ``kxk`` — the layer's own geometry (and its bias,
if any); ``1xk`` and ``kx1`` — bias-free, same stride, dilation, groups and padding mode,
padded so that their taps sit on the k×k kernel's central row and column (``P − d·(k−1)/2``
in their 1-wide dimension).

Why it is exact: a 1×k kernel placed on the central row of a k×k one reads the same inputs
at every output position, so the sum of the three branches is one k×k convolution whose
kernel is ``K + row(H) + column(V)`` (the skeleton strengthened, as in Ding et al.,
ICCV 2019, who put a BatchNorm on each branch: ``norm="bn"``; ``norm="scale"`` is OREPA's
linear alternative; default ``None``, plain branches — :mod:`expandfx.rules.norms`).
Folding: ``expandfx.linear.fold.total``.

``r`` is not used (branches keep the layer's width). ``init="preserve"``: ``kxk`` = the
layer, the other branches zero.

This file is the worked example of ``docs/design.md §8``: a rule is a ``skip_reason``, a
``build`` returning an :class:`~expandfx.block.ExpandedBlock` of named branches, and a
``RULE`` that registers them.

Example::

    >>> import torch.nn as nn
    >>> block = build(nn.Conv2d(4, 8, 3, padding=1), r=1)
    >>> {name: tuple(b.kernel_size) for name, b in block.branches.items()}
    {'kxk': (3, 3), '1xk': (1, 3), 'kx1': (3, 1)}
"""

from __future__ import annotations

import torch
from torch import nn

from ..block import ExpandedBlock
from ..linear.ir import explicit_padding, pairs_from_pad
from .base import Rule
from .factors import conv_factor, match_requires_grad
from .norms import add_norms

__all__ = ["RULE", "build", "skip_reason"]


def skip_reason(conv: nn.Module) -> str | None:
    k = conv.kernel_size
    if len(k) != 2:
        return (f"ACNet: asymmetric 1×k / k×1 branches are defined for 2-D convolutions, not "
                f"{len(k)}-D")
    if k[0] != k[1] or k[0] < 3 or k[0] % 2 == 0:
        return f"ACNet: kernel {k} is not square with an odd size ≥ 3"
    pads = pairs_from_pad(explicit_padding(conv))
    if any(a != b for a, b in pads):
        return f"ACNet: padding {pads} is asymmetric"
    if any(a < d * (k[0] - 1) // 2 for (a, _), d in zip(pads, conv.dilation, strict=True)):
        return (f"ACNet: padding {tuple(a for a, _ in pads)} is smaller than half the dilated "
                f"kernel, so the 1×k and k×1 branches cannot be centred")
    return None


def build(conv: nn.Module, r: float = 1.0, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None, norm: str | None = None) -> ExpandedBlock:
    m, n, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
    (ph, _), (pw, _) = pairs_from_pad(explicit_padding(conv))
    dh, dw = conv.dilation
    half = (k - 1) // 2

    def branch(kernel: tuple[int, int], padding: tuple[int, int], bias: bool) -> nn.Module:
        return conv_factor(conv, m, n, kernel, stride=conv.stride, padding=padding,
                           dilation=conv.dilation, padding_mode=conv.padding_mode,
                           bias=bias, device=device)

    branches = {"kxk": branch((k, k), (ph, pw), conv.bias is not None),
                "1xk": branch((1, k), (ph - dh * half, pw), False),
                "kx1": branch((k, 1), (ph, pw - dw * half), False)}
    if init == "preserve":
        with torch.no_grad():
            branches["kxk"].weight.copy_(conv.weight)
            if conv.bias is not None:
                branches["kxk"].bias.copy_(conv.bias)
            branches["1xk"].weight.zero_()
            branches["kx1"].weight.zero_()
    match_requires_grad(conv, list(branches.values()))
    branches = add_norms(conv, branches, norm, init, rule="ACNet", path=path, device=device)
    return ExpandedBlock(conv, branches, rule="ACNet", r=r)


RULE = Rule("ACNet", "conv", skip_reason, build, options=frozenset({"norm"}), uses_r=False,
            summary=
            "a k×k convolution (odd k ≥ 3, 2-D) becomes k×k + 1×k + k×1 branches, summed "
            "(ACNet)")
