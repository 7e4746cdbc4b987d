"""``fold``: one :class:`~expandfx.linear.ir.Affine` for any legal tree of linear maps.

Legality is checked, never assumed; :class:`~expandfx.errors.FoldError` says what breaks it.
The rules (proofs in ``docs/design.md §3``):

- **Seq** (:func:`chain`). Padding sits on the first map — or on a later one when every map
  before it is a pointwise, unstrided, unpadded map without bias (or pads by copying, any
  mode but ``zeros``): such maps commute with padding, so it moves to the front. A strided
  map may be followed by pointwise maps only (they commute with subsampling); strides
  multiply. Spatial maps share one dilation per dim. Groups differing along the chain are
  regrouped to their gcd (:func:`regroup`). The kernels then compose as in
  :func:`~expandfx.linear.compose.compose_chain`.
- **Par** (:func:`total`). Every branch maps the same input to the same output: equal
  channels and stride, one dilation, one padding mode among padded branches. A smaller
  kernel is embedded into the largest at the offset its padding implies (RepVGG's centred
  padding is the common case) and every branch must then end at the same right edge.
  ``Identity`` branches are Dirac kernels (``in == out``, stride 1). Weights and biases add.
- **Transposed convolutions** (:func:`_transposed_chain`). A chain holds at most one; every
  other map is pointwise, unstrided and unpadded, and the maps before it are bias-free. A
  per-pixel linear map commutes with the transposed convolution's scatter (it acts on
  channels, the scatter on positions), so ``C ∘ T ∘ A`` is the transposed convolution of
  kernel ``W[i, o, k] = Σ_{a,b} A[a, i] T[a, b, k] C[o, b]`` (per group) and bias
  ``C b_T + b_C``. A bias before it is not foldable: a constant input scattered with stride
  and cropping reaches border and stride-phase outputs through different numbers of taps,
  so it is no constant. ConvTranspose → BatchNorm is the case ``A = 1``, ``C`` = the BN.
  Sums of transposed convolutions are not folded.

Example::

    >>> import torch, torch.nn as nn
    >>> from expandfx.linear.ir import Affine, Identity, Par
    >>> k3, k1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
    >>> one = fold(Par((Affine.of(k3), Affine.of(k1), Identity())))
    >>> tuple(one.weight.shape), one.geometry.padding
    ((4, 4, 3, 3), ((1, 1), (1, 1)))
    >>> x = torch.randn(1, 4, 8, 8)
    >>> y = nn.functional.conv2d(x, one.weight, one.bias, padding=1)
    >>> torch.allclose(y, k3(x) + k1(x) + x, atol=1e-5)
    True
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..errors import FoldError
from .compose import compose_chain
from .ir import Affine, Geometry, Identity, Node, Par, Seq

__all__ = ["chain", "fold", "regroup", "total"]


def fold(node: Node, dtype: torch.dtype | None = None) -> Affine:
    """The single affine map a tree computes, in ``dtype`` (default: the tensors' own),
    differentiable in every leaf's weight and bias."""
    if isinstance(node, Affine):
        return node.to(dtype)
    if isinstance(node, Seq):
        maps = [fold(part, dtype) for part in node.parts if not isinstance(part, Identity)]
        if not maps:
            raise FoldError("a chain of identities has no shape to fold to")
        return chain(maps)
    if isinstance(node, Par):
        maps = [fold(part, dtype) for part in node.parts if not isinstance(part, Identity)]
        if not maps:
            raise FoldError("a sum of identities alone has no shape to fold to")
        return total(maps, identities=len(node.parts) - len(maps))
    if isinstance(node, Identity):
        raise FoldError("an identity alone has no shape to fold to")
    raise FoldError(f"cannot fold a {type(node).__name__} leaf; map the topology's leaves to "
                    f"Affine maps first (expandfx.linear.ir.map_leaves)")


def chain(maps: list[Affine]) -> Affine:
    """``maps`` applied in order, as one map (the Seq rules above)."""
    maps = _merge_diagonals(maps)
    if len(maps) == 1:
        return maps[0]
    dims = _common_dims(maps, "chain")
    for i, (a, b) in enumerate(itertools.pairwise(maps)):
        if a.out_channels != b.in_channels:
            raise FoldError(f"map {i} of the chain gives {a.out_channels} channels but map "
                            f"{i + 1} takes {b.in_channels}")
    if dims == 0:
        return Affine(*compose_chain([(m.weight, m.bias) for m in maps], 1), Geometry.linear())
    if any(m.geometry.transposed for m in maps):
        return _transposed_chain(maps)
    maps = _padding_to_front(maps)
    stride = [1] * dims
    for i, m in enumerate(maps):
        if any(s > 1 for s in m.geometry.stride):
            if not all(later.pointwise for later in maps[i + 1:]):
                raise FoldError(f"map {i} of the chain is strided {m.geometry.stride} and a "
                                f"spatial map follows it; only pointwise maps may follow a "
                                f"stride")
            stride = [s * t for s, t in zip(stride, m.geometry.stride, strict=True)]
    groups = math.gcd(*(m.geometry.groups for m in maps))
    factors = [(regroup(m.weight, m.geometry.groups, groups), m.bias) for m in maps]
    weight, bias = compose_chain(factors, groups)
    first = maps[0].geometry
    return Affine(weight, bias, Geometry(dims, tuple(stride), first.padding,
                                         _common_dilation(maps, "chain"), groups,
                                         first.padding_mode if first.padded else "zeros"))


def total(maps: list[Affine], identities: int = 0) -> Affine:
    """The sum of ``maps`` (and ``identities`` copies of the input), as one map."""
    dims = _common_dims(maps, "sum")
    if any(m.geometry.transposed for m in maps):
        raise FoldError("a sum with a transposed convolution branch is not folded (only chains "
                        "through one transposed convolution are)")
    ins, outs = {m.in_channels for m in maps}, {m.out_channels for m in maps}
    if len(ins) > 1 or len(outs) > 1:
        raise FoldError(f"the branches of a sum map {sorted(ins)} → {sorted(outs)} channels; "
                        f"every branch must map the same input to the same output shape")
    (c_in,), (c_out,) = ins, outs
    if identities and c_in != c_out:
        raise FoldError(f"an identity branch needs equal in and out channels, got "
                        f"{c_in} → {c_out}")
    bias = _sum([m.bias for m in maps if m.bias is not None])
    ref = maps[0].weight
    if dims == 0:
        weight = _sum([m.weight for m in maps])
        if identities:
            weight = weight + identities * torch.eye(c_in, dtype=ref.dtype, device=ref.device)
        return Affine(weight, bias, Geometry.linear())
    if identities:  # Dirac kernels: depthwise ones, no padding, stride 1
        dirac = torch.ones(c_in, 1, *(1,) * dims, dtype=ref.dtype, device=ref.device)
        maps = [*maps, Affine(dirac, None, Geometry.pointwise(dims, groups=c_in))]
    strides = {m.geometry.stride for m in maps}
    if len(strides) > 1:
        raise FoldError(f"the branches of a sum have different strides {sorted(strides)}"
                        + (" (an identity branch has stride 1)" if identities else ""))
    dilation = _common_dilation(maps, "sum")
    modes = {m.geometry.padding_mode for m in maps if m.geometry.padded}
    if len(modes) > 1:
        raise FoldError(f"the branches of a sum pad in different modes {sorted(modes)}")
    padding, offsets = _aligned(maps, dilation)
    kernel = _kernel_size(maps, offsets)
    groups = math.gcd(*(m.geometry.groups for m in maps))
    weight = _sum([_embed(regroup(m.weight, m.geometry.groups, groups), off, kernel)
                   for m, off in zip(maps, offsets, strict=True)])
    return Affine(weight, bias, Geometry(dims, maps[0].geometry.stride, padding, dilation,
                                         groups, modes.pop() if modes else "zeros"))


def regroup(weight: torch.Tensor, groups: int, to: int) -> torch.Tensor:
    """A conv weight of ``groups`` groups as the same map with ``to`` groups (``to`` divides
    ``groups``): each of the ``groups / to`` old groups inside a new group becomes a
    diagonal block of it (zeros elsewhere). Differentiable; a no-op when ``to == groups``.

    >>> w = torch.ones(4, 1, 1)          # depthwise, 4 channels
    >>> regroup(w, 4, 1)[:, :, 0]
    tensor([[1., 0., 0., 0.],
            [0., 1., 0., 0.],
            [0., 0., 1., 0.],
            [0., 0., 0., 1.]])
    """
    if to == groups:
        return weight
    if groups % to:
        raise FoldError(f"cannot regroup a {groups}-group weight into {to} groups")
    ratio = groups // to
    out, in_g, *kernel = weight.shape
    blocks = weight.reshape(to, ratio, out // groups, 1, in_g, *kernel)
    eye = torch.eye(ratio, dtype=weight.dtype, device=weight.device)
    mask = eye.reshape(1, ratio, 1, ratio, 1, *(1,) * len(kernel))
    return (blocks * mask).reshape(out, ratio * in_g, *kernel)


def _transposed_chain(maps: list[Affine]) -> Affine:
    """``after ∘ T ∘ before`` for one transposed convolution ``T`` (the rule above)."""
    found = [i for i, m in enumerate(maps) if m.geometry.transposed]
    if len(found) > 1:
        raise FoldError(f"maps {found} of the chain are transposed convolutions; a chain folds "
                        f"through one only")
    (t,) = found
    for j, m in enumerate(maps):
        if j == t:
            continue
        why = ("spatial" if not m.pointwise else
               "strided" if any(s > 1 for s in m.geometry.stride) else
               "padded" if m.geometry.padded else
               "biased (the transposed convolution would spread its bias unevenly over the "
               "output)" if j < t and m.bias is not None else None)
        if why:
            raise FoldError(f"map {j} of the chain is {why}; around a transposed convolution "
                            f"(map {t}) only pointwise, unstrided, unpadded maps fold, and "
                            f"bias-free ones before it")
    tr = maps[t]
    before = chain(maps[:t]) if t > 0 else None
    after = chain(maps[t + 1:]) if t + 1 < len(maps) else None
    groups = math.gcd(*(m.geometry.groups for m in (before, tr, after) if m is not None))
    ref = tr.weight
    w = regroup(tr.weight, tr.geometry.groups, groups)  # [in, out_g, *k]: grouped on dim 0
    w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])  # [G, p_g, q_g, *k]
    spatial = "".join("xyz"[:tr.geometry.dims])
    if before is not None:  # [m, ...] ← A [p, m_g]: W[i, o] = Σ_a A[a, i] T[a, o]
        a = regroup(before.weight, before.geometry.groups, groups)
        a = a.reshape(groups, a.shape[0] // groups, a.shape[1])  # [G, p_g, m_g]
        w = torch.einsum(f"gpm,gpq{spatial}->gmq{spatial}", a, w)
    bias = tr.bias
    if after is not None:  # C [n, q_g]: W[i, o] = Σ_b T[i, b] C[o, b]
        c = regroup(after.weight, after.geometry.groups, groups)
        c = c.reshape(groups, c.shape[0] // groups, c.shape[1])  # [G, n_g, q_g]
        w = torch.einsum(f"gmq{spatial},gnq->gmn{spatial}", w, c)
        if bias is not None:
            bias = torch.einsum("gnq,gq->gn", c, bias.reshape(groups, -1)).reshape(-1)
        if after.bias is not None:
            bias = after.bias if bias is None else bias + after.bias
    weight = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:]).to(ref.dtype)
    return Affine(weight, bias, replace(tr.geometry, groups=groups))


def _diagonal(m: Affine) -> bool:
    """A per-channel scale (and shift): depthwise, 1×…×1, stride 1, unpadded — a branch's
    ``norm="scale"`` or an eval-mode BatchNorm."""
    g = m.geometry
    return (g.dims > 0 and not g.transposed and m.pointwise
            and g.groups == m.out_channels == m.in_channels
            and m.weight.shape[1] == 1 and not g.padded and all(s == 1 for s in g.stride))


def _merge_diagonals(maps: list[Affine]) -> list[Affine]:
    """Each per-channel scale after another map multiplies that map's output channels: the
    same map as composing it (a dense regrouped ``n × n`` product), in ``O(weight)``."""
    out = [maps[0]]
    for m in maps[1:]:
        prev = out[-1]
        if (not _diagonal(m) or prev.geometry.dims != m.geometry.dims
                or prev.geometry.transposed):  # a transposed weight is [in, out/g, *k]
            out.append(m)
            continue
        scale = m.weight.reshape(-1)
        weight = prev.weight * scale.reshape(-1, *(1,) * (prev.weight.dim() - 1))
        bias = None if prev.bias is None else prev.bias * scale
        if m.bias is not None:
            bias = m.bias if bias is None else bias + m.bias
        out[-1] = Affine(weight, bias, prev.geometry)
    return out


def _padding_to_front(maps: list[Affine]) -> list[Affine]:
    padded = [i for i, m in enumerate(maps) if m.geometry.padded]
    if not padded or padded == [0]:
        return maps
    if len(padded) > 1:
        raise FoldError(f"maps {padded} of the chain all pad; only one padding can become the "
                        f"folded map's")
    (i,) = padded
    copies = maps[i].geometry.padding_mode != "zeros"  # reflect & co. copy biases along
    for j, m in enumerate(maps[:i]):
        why = ("spatial" if not m.pointwise else
               "strided" if any(s > 1 for s in m.geometry.stride) else
               "biased (zero padding would not see its bias)" if m.bias is not None
               and not copies else None)
        if why:
            raise FoldError(f"map {i} of the chain pads after map {j}, which is {why}; padding "
                            f"folds only on the chain's first map, or behind pointwise, "
                            f"unstrided, bias-free maps")
    moved = maps[i].geometry
    front = maps[0].geometry.with_padding(moved.padding, moved.padding_mode)
    unpadded = moved.with_padding(((0, 0),) * moved.dims, "zeros")
    out = list(maps)
    out[0], out[i] = replace(maps[0], geometry=front), replace(maps[i], geometry=unpadded)
    return out


def _aligned(maps: list[Affine], dilation: tuple[int, ...]
             ) -> tuple[tuple[tuple[int, int], ...], list[tuple[int, ...]]]:
    """The common padding of a sum and each branch's kernel offset inside the common kernel."""
    dims = len(dilation)
    before = [max(m.geometry.padding[d][0] for m in maps) for d in range(dims)]
    offsets = []
    for i, m in enumerate(maps):
        off = []
        for d in range(dims):
            shift = before[d] - m.geometry.padding[d][0]
            if shift % dilation[d]:
                raise FoldError(f"branch {i} of the sum pads {m.geometry.padding[d][0]} in dim "
                                f"{d}, which is not a whole number of dilated taps from the "
                                f"others' {before[d]}")
            off.append(shift // dilation[d])
        offsets.append(tuple(off))
    size = _kernel_size(maps, offsets)
    padding = []
    for d in range(dims):
        ends = {m.geometry.padding[d][1] + dilation[d] * (size[d] - off[d] - m.kernel[d])
                for m, off in zip(maps, offsets, strict=True)}
        if len(ends) > 1:
            raise FoldError(f"the branches of the sum end at different right edges in dim {d} "
                            f"(their padding and kernel sizes are not centred alike)")
        padding.append((before[d], ends.pop()))
    return tuple(padding), offsets


def _kernel_size(maps: list[Affine], offsets: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The common kernel: wide enough for every branch at its offset."""
    return tuple(max(off[d] + m.kernel[d] for m, off in zip(maps, offsets, strict=True))
                 for d in range(len(offsets[0])))


def _embed(weight: torch.Tensor, offset: tuple[int, ...], kernel: tuple[int, ...]
           ) -> torch.Tensor:
    pad = []
    for d in reversed(range(len(kernel))):
        pad += [offset[d], kernel[d] - offset[d] - weight.shape[2 + d]]
    return F.pad(weight, pad) if any(pad) else weight


def _common_dims(maps: list[Affine], what: str) -> int:
    dims = {m.geometry.dims for m in maps}
    if len(dims) > 1:
        raise FoldError(f"a {what} mixes linear maps and convolutions of "
                        f"{sorted(dims)} spatial dims")
    return dims.pop()


def _common_dilation(maps: list[Affine], what: str) -> tuple[int, ...]:
    """One dilation per dim among the maps whose kernel is wider than 1 there."""
    dims = maps[0].geometry.dims
    out = []
    for d in range(dims):
        found = {m.geometry.dilation[d] for m in maps if m.kernel[d] > 1}
        if len(found) > 1:
            raise FoldError(f"the maps of a {what} dilate dim {d} differently {sorted(found)}")
        out.append(found.pop() if found else 1)
    return tuple(out)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    if not tensors:
        return None
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out
