"""MobileOne (Vasu et al., CVPR 2023): ``k`` parallel copies of the convolution, a 1×1
"scale" branch and an identity branch.

Branches (``<layer>.branches.<name>``): ``kxk_0`` … ``kxk_{k-1}`` — the layer's own
geometry (``kxk_0`` carries its bias, the others are bias-free); ``1x1`` — bias-free, same
stride and groups, centred as RepVGG's (only for kernels wider than 1); ``identity`` — where
the layer maps ``m → m`` with stride 1 and padding ``d·(k−1)/2``. Works for 1-, 2- and
3-D convolutions with odd kernels, 1×1 included (MobileOne's pointwise block: ``k`` 1×1
branches and the identity) and depthwise ones (its depthwise block).

``k`` (the paper's trivial over-parameterization factor; 4 for MobileOne-S0, 1 for the
larger models) is a rule option: ``efx.MobileOne(k=2)``, ``build(conv, k=2)`` or
``RULES["MobileOne"].configured("MobileOne-k2", k=2)``. Default 4. Without per-branch
norms the ``k`` copies add into one kernel (their sum trains like one branch of ``k``× the
learning rate); the paper trains each with its own BatchNorm: ``norm="bn"``
(:mod:`expandfx.rules.norms`).

``init="preserve"``: ``kxk_0`` = the layer minus the identity (where there is one), every
other branch zero.

Example::

    >>> import torch.nn as nn
    >>> list(build(nn.Conv2d(8, 8, 3, padding=1, groups=8), k=2).branches)
    ['kxk_0', 'kxk_1', '1x1', 'identity']
"""

from __future__ import annotations

import torch
from torch import nn

from ..block import ExpandedBlock
from ..errors import ConfigError
from ..linear.ir import explicit_padding, pairs_from_pad
from . import repvgg
from .base import Rule
from .factors import conv_factor, match_requires_grad
from .norms import add_norms

__all__ = ["RULE", "build", "skip_reason"]


def skip_reason(conv: nn.Module) -> str | None:
    if all(size == 1 for size in conv.kernel_size):
        pads = pairs_from_pad(explicit_padding(conv))
        return None if all(a == b for a, b in pads) else \
            f"MobileOne: padding {pads} is asymmetric"
    reason = repvgg.skip_reason(conv)
    return None if reason is None else reason.replace("RepVGG:", "MobileOne:", 1)


def build(conv: nn.Module, r: float = 1.0, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None, norm: str | None = None,
          k: int = 4) -> ExpandedBlock:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"MobileOne{' for ' + repr(path) if path else ''}: k (the number of "
                          f"parallel k×k branches) must be an integer ≥ 1, got {k!r}.")
    m, n, dims = conv.in_channels, conv.out_channels, len(conv.kernel_size)
    pads = tuple(a for a, _ in pairs_from_pad(explicit_padding(conv)))
    copies = [conv_factor(conv, m, n, conv.kernel_size, stride=conv.stride, padding=pads,
                          dilation=conv.dilation, padding_mode=conv.padding_mode,
                          bias=conv.bias is not None and i == 0, device=device)
              for i in range(k)]
    branches: dict[str, nn.Module] = {f"kxk_{i}": c for i, c in enumerate(copies)}
    factors = list(copies)
    if any(size > 1 for size in conv.kernel_size):
        centre = tuple(a - d * (size - 1) // 2
                       for a, d, size in zip(pads, conv.dilation, conv.kernel_size, strict=True))
        branches["1x1"] = conv_factor(conv, m, n, (1,) * dims, stride=conv.stride,
                                      padding=centre, padding_mode=conv.padding_mode,
                                      bias=False, device=device)
        factors.append(branches["1x1"])
    if repvgg.has_identity(conv):
        branches["identity"] = nn.Identity()
    if init == "preserve":
        with torch.no_grad():
            copies[0].weight.copy_(conv.weight)
            if "identity" in branches:
                copies[0].weight.sub_(repvgg.dirac(conv.weight.shape, conv.groups,
                                                   copies[0].weight))
            if conv.bias is not None:
                copies[0].bias.copy_(conv.bias)
            for other in factors[1:]:
                other.weight.zero_()
    match_requires_grad(conv, factors)
    branches = add_norms(conv, branches, norm, init, rule="MobileOne", path=path, device=device)
    return ExpandedBlock(conv, branches, rule="MobileOne", r=r)


RULE = Rule("MobileOne", "conv", skip_reason, build, options=frozenset({"norm", "k"}),
            uses_r=False, summary=
            "a convolution becomes k parallel copies + a 1×1 + (identity), summed "
            "(MobileOne; k is a rule option, default 4)")
