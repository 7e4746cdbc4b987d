"""OREPA (Online Convolutional Re-parameterization, Hu et al., CVPR 2022): a convolution
becomes six linear branches, each ending in a learnable per-channel scale, summed.

Branches (``<layer>.branches.<name>``) of a k×k convolution (OREPA's ``OREPA`` block),
each a chain whose last layer is the branch's scale (OREPA's ``vector`` row, a depthwise
1×…×1 convolution of weight ``[n, 1, 1, …]``, :mod:`expandfx.rules.norms`' ``"scale"``):

- ``origin`` — the layer's own geometry (and its bias, if any);
- ``avg`` — a grouped 1×1 ``m → n``, then k×k average pooling (the depthwise constant
  kernel ``1/k^d``, fixed) with the layer's stride, padding and dilation;
- ``prior`` — a grouped 1×1 ``m → n``, then a fixed depthwise k×k *frequency prior*: output
  channel ``c`` of ``n`` is a DCT-II basis function ``cos(π (x + ½) f / k)`` along one
  spatial axis (channels split evenly across the axes of size > 1, frequency ``f`` counting
  from 1 within each share); for 2-D 3×3 kernels this is OREPA's ``fre_init`` tensor;
- ``1x1_kxk`` — a grouped 1×1 ``m → t`` starting as the identity (``t = m``; ``2m``,
  each input twice, for layers of more than 4 groups), then a k×k ``t → n``;
- ``1x1`` — a 1×1 with the layer's stride, centred on the kernel (RepVGG's);
- ``dws`` — a depthwise k×k ``m → 8m`` (multiplier 8, the layer's geometry), then a grouped
  1×1 ``8m → n`` (OREPA's depthwise-separable branch).

Scales start at OREPA's values ``origin 0.25, avg 0.25, prior 0, 1x1_kxk 0.5, 1x1 1,
dws 0.5``; every trainable weight not starting as an identity starts Kaiming-uniform with
``a = 0`` (OREPA's init, ``√6`` wider than PyTorch's default). A 1×…×1 layer gets OREPA's
``OREPA_1x1`` block: ``origin`` (scale 1) and ``l2i`` (scale 0.5), a 1×1 ``m → n`` then a
1×1 ``n → n`` starting as the identity (or, when ``n > m``, the identity ``m → m`` first),
Kaiming-uniform ``a = 1``. Works for 1-, 2- and 3-D convolutions with odd kernels (grouped
and depthwise ones too), stride and dilation.

``norm``: only ``"scale"`` (the default). The per-branch scale *is* OREPA's block — it
replaces DBB's per-branch BatchNorms by linear scales so that the whole block stays one
linear map of its weights, folded into one kernel in every training step (OREPA's online
re-parameterization: ``mode="collapsed"``, exactly the gradients of ``"sequential"``);
OREPA's one BatchNorm after the sum is the model's own norm after the layer (OREPA's
block replaces a conv → BN pair and keeps that BN). ``"bn"`` per branch is DBB's offline
block (``DBB``, ``norm="bn"``); ``None`` would drop the scales, and by OREPA's analysis a
sum of one-layer branches (``origin``, ``1x1``) then trains exactly as one kernel — the
scales make every branch a product of at least two layers. Both are refused.

``init="preserve"``: ``origin`` = the layer with scale 1, every other scale 0 — OREPA's
``single_init`` with the layer's weights, so the block computes exactly the layer.

Not reproduced: kernels of 7 and more, for which OREPA uses ``OREPA_LargeConv`` (a stack of
3×3 OREPA blocks composed into one large kernel) — here the k×k block applies to every
odd k; OREPA's identity-based 1×1 is a learnable weight plus a fixed identity, here one
weight starting at the identity (same function and gradients; weight decay then pulls it
towards zero rather than towards the identity); in grouped layers OREPA's ``dwsc2full``
reads the pointwise weight's rows in a permuted order (row ``o`` is output
``(o mod g)·n/g + ⌊o/g⌋``) — the same family of maps and the same i.i.d. init, stored in
the ordinary grouped layout here; and the transposed convolutions OREPA does
not define (a sum of transposed branches is not folded) are skipped.

Example::

    >>> import torch.nn as nn
    >>> block = build(nn.Conv2d(4, 8, 3, padding=1))
    >>> list(block.branches)
    ['origin', 'avg', 'prior', '1x1_kxk', '1x1', 'dws']
    >>> [round(block.branches[b][-1].weight[0].item(), 2) for b in block.branches]
    [0.25, 0.25, 0.0, 0.5, 1.0, 0.5]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..block import ExpandedBlock, torch_layer_type
from ..errors import ConfigError
from ..linear.ir import explicit_padding, pairs_from_pad
from . import repvgg
from .base import Rule
from .factors import conv_factor, match_requires_grad
from .norms import add_norms

__all__ = ["RULE", "SCALES", "build", "prior", "skip_reason"]

# OREPA's initial branch weights ("vector" rows) for the k×k block and the 1×1 block
SCALES = {"origin": 0.25, "avg": 0.25, "prior": 0.0, "1x1_kxk": 0.5, "1x1": 1.0, "dws": 0.5}
SCALES_1X1 = {"origin": 1.0, "l2i": 0.5}
DWS_MULTIPLIER = 8


def skip_reason(conv: nn.Module) -> str | None:
    if getattr(conv, "transposed", False):
        return ("OREPA: a transposed convolution: OREPA defines no such block, and a sum of "
                "transposed branches is not folded")
    if all(size == 1 for size in conv.kernel_size):
        return None  # OREPA's 1×1 block
    reason = repvgg.skip_reason(conv)
    return None if reason is None else reason.replace("RepVGG:", "OREPA:", 1)


def prior(channels: int, kernel: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """OREPA's frequency prior as a depthwise kernel ``[channels, 1, *kernel]``: channel ``c``
    is ``cos(π (x + ½) f / k)`` along one axis of size ``k > 1`` (constant along the others);
    the channels are split evenly across those axes, ``f = c + 1 − (axis share start)``.

    >>> prior(2, (3, 3), torch.zeros(())).squeeze(1)[0, :, 0].round(decimals=4)  # vertical, f=1
    tensor([ 0.8660,  0.0000, -0.8660])
    """
    axes = [a for a, size in enumerate(kernel) if size > 1]
    share = channels / len(axes)
    out = torch.empty(channels, 1, *kernel, dtype=torch.float64)
    for c in range(channels):
        j = min(int(c // share), len(axes) - 1)
        axis, freq = axes[j], c + 1 - j * share
        taps = torch.arange(kernel[axis], dtype=torch.float64)
        wave = torch.cos(math.pi * (taps + 0.5) * freq / kernel[axis])
        view = [1] * len(kernel)
        view[axis] = kernel[axis]
        out[c, 0] = wave.reshape(view).expand(kernel)
    return out.to(dtype=like.dtype, device=like.device)


def check_options(options: dict[str, Any]) -> str | None:
    """Why OREPA cannot take these settings: its block *is* the per-branch scales."""
    norm = options.get("norm", "scale")
    if norm == "scale":
        return None
    return (f"norm={norm!r}; OREPA's block is defined by its per-branch channel scales "
            f"(norm='scale', the default), which keep it linear so that it trains collapsed. "
            f"For per-branch BatchNorms use rule 'DBB' with norm='bn'; for plain branches 'DBB' "
            f"or 'RepVGG' without norm")


def build(conv: nn.Module, r: float = 1.0, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None, norm: str | None = "scale"
          ) -> ExpandedBlock:
    why = check_options({"norm": norm})
    if why:
        raise ConfigError(f"OREPA{f' for {path!r}' if path else ''}: {why}.")
    m, n, dims, g = conv.in_channels, conv.out_channels, len(conv.kernel_size), conv.groups
    pads = tuple(a for a, _ in pairs_from_pad(explicit_padding(conv)))
    spatial = {"stride": conv.stride, "padding": pads, "dilation": conv.dilation}
    one = (1,) * dims

    def factor(c_in: int, c_out: int, kernel: tuple[int, ...], bias: bool = False,
               **geometry) -> nn.Module:
        return conv_factor(conv, c_in, c_out, kernel, bias=bias, padding_mode=conv.padding_mode,
                           device=device, **geometry)

    def depthwise(c_in: int, c_out: int) -> nn.Module:
        return torch_layer_type(conv)(
            c_in, c_out, conv.kernel_size, groups=c_in, bias=False,
            padding_mode=conv.padding_mode, device=device or conv.weight.device,
            dtype=conv.weight.dtype, **spatial)

    origin = factor(m, n, conv.kernel_size, conv.bias is not None, **spatial)
    fixed: list[nn.Module] = []
    if all(size == 1 for size in conv.kernel_size):  # OREPA_1x1
        scales, gain = SCALES_1X1, 1.0
        if n > m:
            first, second = factor(m, m, one, **spatial), factor(m, n, one)
            identity, random = first, second
        else:
            first, second = factor(m, n, one, **spatial), factor(n, n, one)
            identity, random = second, first
        trainable = [first, second]
        random_init, identities = [origin, random], [identity]
        branches = {"origin": origin, "l2i": [first, second]}
    else:
        scales, gain = SCALES, 0.0
        centre = tuple(a - d * (size - 1) // 2
                       for a, d, size in zip(pads, conv.dilation, conv.kernel_size, strict=True))
        t = m if g <= 4 else 2 * m
        squeeze, pool = factor(m, n, one), depthwise(n, n)
        pfir, basis = factor(m, n, one), depthwise(n, n)
        inner, kxk = factor(m, t, one), factor(t, n, conv.kernel_size, **spatial)
        one_by_one = factor(m, n, one, stride=conv.stride, padding=centre)
        dw, pw = depthwise(m, DWS_MULTIPLIER * m), factor(DWS_MULTIPLIER * m, n, one)
        with torch.no_grad():
            pool.weight.fill_(1.0 / math.prod(conv.kernel_size))
            basis.weight.copy_(prior(n, conv.kernel_size, basis.weight))
        fixed = [pool, basis]
        trainable = [squeeze, pfir, inner, kxk, one_by_one, dw, pw]
        random_init = [origin, squeeze, pfir, kxk, one_by_one, dw, pw]
        identities = [inner]
        branches = {"origin": origin, "avg": [squeeze, pool], "prior": [pfir, basis],
                    "1x1_kxk": [inner, kxk], "1x1": one_by_one, "dws": [dw, pw]}
    with torch.no_grad():
        for layer in random_init:
            nn.init.kaiming_uniform_(layer.weight, a=gain)
        for layer in identities:
            layer.weight.copy_(repvgg.dirac(layer.weight.shape, layer.groups, layer.weight))
        if init == "preserve":
            origin.weight.copy_(conv.weight)
            if origin.bias is not None:
                origin.bias.copy_(conv.bias)
    for layer in fixed:  # pooling and the frequency prior: fixed linear maps
        layer.weight.requires_grad_(False)
    match_requires_grad(conv, [origin, *trainable])
    branches = add_norms(conv, branches, "scale", init, rule="OREPA", path=path, device=device)
    with torch.no_grad():
        for name, chain in branches.items():
            value = scales[name] if init != "preserve" else float(name == "origin")
            chain[-1].weight.fill_(value)
    return ExpandedBlock(conv, branches, rule="OREPA", r=r)


RULE = Rule("OREPA", "conv", skip_reason, build, options=frozenset({"norm"}), uses_r=False,
            check_options=check_options, summary=
            "a convolution becomes six scaled linear branches (k×k, 1×1 → avg pooling, "
            "1×1 → frequency prior, 1×1 → k×k, 1×1, depthwise-separable), summed; "
            "1×1 layers two (Online Re-parameterization)")
