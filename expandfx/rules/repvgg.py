"""RepVGG: a k×k convolution becomes k×k + 1×1 (+ identity), summed.

Branches (``<layer>.branches.<name>``): ``kxk`` — the layer's own geometry (and its bias,
if any); ``1x1`` — same stride and groups, bias-free, padded by ``P − d·(k−1)/2`` so that
its tap sits on the k×k kernel's centre; ``identity`` — the input itself, only where the
layer maps ``m → m`` channels with stride 1 and padding exactly ``d·(k−1)/2``. Works for
1-D, 2-D and 3-D convolutions with odd kernels wider than 1 (per dim).

Why it is exact: a 1×1 kernel centred in a k×k one and a Dirac kernel (the identity) are
k×k kernels; convolution is linear in the kernel, so the sum of branches is one k×k
convolution whose kernel is the sum of the (embedded) kernels and whose bias is the sum of
biases (``expandfx.linear.fold.total``). ``norm=`` (:mod:`expandfx.rules.norms`): ``None``
— plain branches; ``"scale"`` — OREPA's per-branch channel scale (still linear);
``"bn"`` — a BatchNorm per branch, as Ding et al. (CVPR 2021) train it (sequential in
training mode, folded with its running statistics in eval mode).

``r`` is not used (branches keep the layer's width). ``init="preserve"``: k×k = W − identity,
1×1 = 0 — the block computes exactly the layer.

Example::

    >>> import torch.nn as nn
    >>> block = build(nn.Conv2d(8, 8, 3, padding=1), r=1)
    >>> list(block.branches)
    ['kxk', '1x1', 'identity']
"""

from __future__ import annotations

import torch
from torch import nn

from ..block import ExpandedBlock
from ..linear.ir import explicit_padding, pairs_from_pad
from .base import Rule
from .factors import conv_factor, match_requires_grad
from .norms import add_norms

__all__ = ["RULE", "build", "dirac", "has_identity", "skip_reason"]


def skip_reason(conv: nn.Module) -> str | None:
    k = conv.kernel_size
    if all(size == 1 for size in k):
        return f"RepVGG: kernel {k} is already 1×…×1; its branches would all be 1×1"
    if any(size % 2 == 0 for size in k):
        return f"RepVGG: kernel {k} has an even size, so no 1×1 tap sits on its centre"
    pads = pairs_from_pad(explicit_padding(conv))
    if any(a != b for a, b in pads):
        return f"RepVGG: padding {pads} is asymmetric"
    if any(a < d * (size - 1) // 2 for (a, _), d, size in zip(pads, conv.dilation, k, strict=True)):
        return (f"RepVGG: padding {tuple(a for a, _ in pads)} is smaller than half the dilated "
                f"kernel, so a 1×1 branch cannot be centred")
    return None


def has_identity(conv: nn.Module) -> bool:
    """Whether the identity branch fits: ``m → m``, stride 1, padding exactly ``d·(k−1)/2``."""
    pads = pairs_from_pad(explicit_padding(conv))
    return (conv.in_channels == conv.out_channels and all(s == 1 for s in conv.stride)
            and all(a == d * (size - 1) // 2
                    for (a, _), d, size in zip(pads, conv.dilation, conv.kernel_size, strict=True)))


def build(conv: nn.Module, r: float = 1.0, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None, norm: str | None = None) -> ExpandedBlock:
    m, n, dims = conv.in_channels, conv.out_channels, len(conv.kernel_size)
    pads = pairs_from_pad(explicit_padding(conv))
    centre = tuple(a - d * (size - 1) // 2
                   for (a, _), d, size in zip(pads, conv.dilation, conv.kernel_size, strict=True))
    kxk = conv_factor(conv, m, n, conv.kernel_size, stride=conv.stride,
                      padding=tuple(a for a, _ in pads), dilation=conv.dilation,
                      padding_mode=conv.padding_mode, device=device)
    one = conv_factor(conv, m, n, (1,) * dims, stride=conv.stride, padding=centre,
                      padding_mode=conv.padding_mode, bias=False, device=device)
    branches: dict[str, nn.Module] = {"kxk": kxk, "1x1": one}
    if has_identity(conv):
        branches["identity"] = nn.Identity()
    if init == "preserve":
        with torch.no_grad():
            kxk.weight.copy_(conv.weight)
            if "identity" in branches:
                kxk.weight.sub_(dirac(kxk.weight.shape, conv.groups, kxk.weight))
            one.weight.zero_()
            if kxk.bias is not None:
                kxk.bias.copy_(conv.bias)
    match_requires_grad(conv, [kxk, one])
    branches = add_norms(conv, branches, norm, init, rule="RepVGG", path=path, device=device)
    return ExpandedBlock(conv, branches, rule="RepVGG", r=r)


def dirac(shape: torch.Size, groups: int, like: torch.Tensor) -> torch.Tensor:
    """The identity as a ``[m, m/groups, *k]`` kernel: 1 at the centre tap of each channel's
    own input."""
    out = torch.zeros(shape, dtype=like.dtype, device=like.device)
    per_group = shape[1]
    centre = tuple(k // 2 for k in shape[2:])
    for c in range(shape[0]):
        out[(c, c % per_group, *centre)] = 1.0
    return out


RULE = Rule("RepVGG", "conv", skip_reason, build, options=frozenset({"norm"}), uses_r=False,
            summary=
            "a k×k convolution becomes k×k + 1×1 (+ identity) branches, summed (RepVGG)")
