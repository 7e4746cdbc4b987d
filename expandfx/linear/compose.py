"""Exact algebra of linear chains: the one home of kernel composition and bias propagation.

:func:`expandfx.linear.fold.fold` composes every chain with :func:`compose_chain` (and
chain blocks whose factors share one ``groups`` call it directly, for speed). Weights use
PyTorch's layouts: a convolution weight is ``[out, in // groups, *kernel]``, a linear
weight ``[out, in]``.

Example::

    >>> import torch
    >>> a, b = torch.randn(6, 3, 1, 1), torch.randn(8, 6, 3, 3)
    >>> w, bias = compose_chain([(a, None), (b, None)], groups=1)
    >>> tuple(w.shape), bias
    ((8, 3, 3, 3), None)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["KERNEL_METHODS", "chain_cost", "compose_chain", "compose_pair", "composed_shape",
           "forget_kernel_methods", "grouped", "kernel_method", "known_kernel_method",
           "pair_cost", "prefer_kernel_method", "spatial_pairs", "ungrouped"]


Tensor = torch.Tensor
WeightBias = tuple[Tensor, Tensor | None]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def compose_pair(
    first: WeightBias, second: WeightBias, groups: int = 1
) -> WeightBias:
    """Weight and bias of ``second(first(x))`` for two stride-1, unpadded layers.

    Proof (1D, dilation ``d`` shared by both layers, one group; the rest is
    per group and per dimension):
    ``y1[j,i] = sum_{c,t} A[j,c,t] x[c,i+t*d] + a[j]`` and
    ``y2[o,i] = sum_{j,u} B[o,j,u] y1[j,i+u*d] + b[o]``, so
    ``y2[o,i] = sum_{c,v} C[o,c,v] x[c,i+v*d] + (b[o] + sum_{j,u} B[o,j,u] a[j])``
    with ``C[o,c,v] = sum_j sum_{u+t=v} B[o,j,u] A[j,c,t]`` — the full
    convolution of the kernels, which is ``conv(A^T, flip(B), padding=kb-1)``.
    The first bias is constant over space, so a valid convolution turns it into
    the constant ``B.sum(space) @ a``. A 1x1 layer commutes with stride, so the
    same formula folds a pointwise layer placed after a strided one.
    """
    (wa, ba), (wb, bb) = first, second
    if wa.dim() == 2:  # linear: y = Wb (Wa x + ba) + bb
        weight = wb @ wa
        bias = None if ba is None else wb @ ba
    else:
        weight = _compose_kernels(wa, wb, groups)
        bias = None
        if ba is not None:
            out_g, in_g = wb.shape[0] // groups, wb.shape[1]
            if all(k == 1 for k in wb.shape[2:]):
                summed = wb.reshape(groups, out_g, in_g)  # a view: nothing to sum
            else:
                summed = wb.sum(tuple(range(2, wb.dim()))).reshape(groups, out_g, in_g)
            if groups == 1:
                bias = summed.reshape(out_g, in_g) @ ba  # a view, not a select
            else:
                bias = (summed @ ba.reshape(groups, in_g, 1)).reshape(-1)
    if bb is not None:
        bias = bb if bias is None else bias + bb
    return weight, bias


def _compose_kernels(wa: Tensor, wb: Tensor, groups: int) -> Tensor:
    """``C[o,c,v] = sum_j sum_{u+t=v} B[o,j,u] A[j,c,t]`` per group.

    When either kernel is pointwise this is a per-tap matrix product, laid out so that
    neither direction of autograd copies a weight: ``B @ A`` over ``[j, c·t]`` when ``B`` is
    pointwise, a batch of ``A^T @ B[o]`` over ``[j, u]`` when ``A`` is. Otherwise (two spatial
    kernels) :func:`kernel_method` picks between a full convolution of the kernels,
    ``conv(A^T, flip(B), padding=kb-1)``, and one matrix product of all tap pairs followed
    by ``F.fold`` (col2im), which sums the pairs with ``u + t = v``.
    """
    a_point = all(k == 1 for k in wa.shape[2:])
    b_point = all(k == 1 for k in wb.shape[2:])
    if b_point:  # C[o,c,t] = sum_j B[o,j] A[j,c,t]
        a = wa.reshape(groups, wa.shape[0] // groups, -1)  # [g, j, c·t] (a view)
        b = wb.reshape(groups, wb.shape[0] // groups, wb.shape[1])  # [g, o, j]
        if groups == 1:  # views, not selects (whose backward zero-fills and copies)
            out = b.reshape(b.shape[1:]) @ a.reshape(a.shape[1:])
        else:
            out = torch.bmm(b, a)
        return out.reshape(wb.shape[0], *wa.shape[1:])
    if a_point:  # C[o,c,u] = sum_j B[o,j,u] A[j,c]: for each o, A^T [c, j] @ B[o] [j, u]
        g, j, c = groups, wa.shape[0] // groups, wa.shape[1]
        o = wb.shape[0] // g
        b = wb.reshape(g * o, j, -1)  # [g·o, j, u] (a view)
        at = wa.reshape(g, j, c).transpose(1, 2)  # [g, c, j]
        if g == 1:
            at = at.expand(o, c, j)  # stride 0 over o: bmm reads A once per o, no copy
        else:
            at = at.unsqueeze(1).expand(g, o, c, j).reshape(g * o, c, j)
        return torch.bmm(at, b).reshape(wb.shape[0], c, *wb.shape[2:])
    if wa.dim() == 4 and kernel_method(wa, wb, groups) == "fold":
        return _fold_kernels(wa, wb, groups)
    return _compose_kernels_conv(wa, wb, groups)


def _fold_kernels(wa: Tensor, wb: Tensor, groups: int) -> Tensor:
    """2-D ``C = B ∘ A`` as ``P[o,c,u,t] = sum_j B[o,j,u] A[j,c,t]`` (one matrix product,
    exactly the multiply-accumulates of the full convolution) then ``F.fold``, which adds
    ``P[o,c,u,t]`` into ``C[o,c,u+t]`` (the kernel index ``u`` slides over the grid of ``t``)."""
    g = groups
    j, c, o = wa.shape[0] // g, wa.shape[1], wb.shape[0] // g
    ka, kb = tuple(wa.shape[2:]), tuple(wb.shape[2:])
    ta, tb = ka[0] * ka[1], kb[0] * kb[1]
    b = wb.reshape(g, o, j, tb).transpose(2, 3).reshape(g, o * tb, j)  # copies B (small)
    if g > 1:
        pairs = torch.bmm(b, wa.reshape(g, j, c * ta))
    else:
        pairs = b.reshape(o * tb, j) @ wa.reshape(j, c * ta)
    pairs = pairs.reshape(g * o, tb, c, ta).transpose(1, 2).reshape(1, g * o * c * tb, ta)
    kc = (ka[0] + kb[0] - 1, ka[1] + kb[1] - 1)
    out = F.fold(pairs, kc, kernel_size=kb)
    if out.untyped_storage().nbytes() > out.numel() * out.element_size():
        # col2im on the CPU returns a view into a buffer as large as ``pairs``; whoever keeps
        # the kernel (a convolution saving it for backward) would keep that buffer too
        out = out.clone()
    return out.reshape(g * o, c, *kc)


# (shape of A, shape of B, groups, dtype, device) -> "conv" | "fold": measured preferences,
# filled by the execution layer's tuner (:func:`expandfx.execution.tune_kernels`); this
# module only reads them (it times nothing).
_KERNEL_METHOD: dict[tuple, str] = {}


def _method_key(a: tuple[int, ...], b: tuple[int, ...], groups: int, dtype: torch.dtype,
                device: torch.device | str) -> tuple:
    return (tuple(a), tuple(b), groups, dtype, str(device))


def kernel_method(wa: Tensor, wb: Tensor, groups: int) -> str:
    """How :func:`compose_pair` composes two spatial 2-D kernels: the preference recorded
    by :func:`prefer_kernel_method` for these shapes, dtype and device, else ``"fold"`` when
    the full convolution would waste at least half its multiply-accumulates on padding
    (and ``"conv"`` otherwise)."""
    found = _KERNEL_METHOD.get(_method_key(wa.shape, wb.shape, groups, wa.dtype, wa.device))
    if found is not None:
        return found
    ka, kb = wa.shape[2:], wb.shape[2:]
    kc = [x + y - 1 for x, y in zip(ka, kb, strict=True)]
    return "fold" if 2 * math.prod(ka) <= math.prod(kc) else "conv"


def known_kernel_method(a: tuple[int, ...], b: tuple[int, ...], groups: int,
                        dtype: torch.dtype, device: torch.device | str) -> str | None:
    """The recorded preference for composing kernels of shapes ``a`` then ``b``, or ``None``."""
    return _KERNEL_METHOD.get(_method_key(a, b, groups, dtype, device))


def prefer_kernel_method(a: tuple[int, ...], b: tuple[int, ...], groups: int,
                         dtype: torch.dtype, device: torch.device | str, method: str) -> None:
    """Record ``method`` (``"conv"`` or ``"fold"``) for kernels of shapes ``a`` then ``b``."""
    if method not in KERNEL_METHODS:
        raise ValueError(f"prefer_kernel_method: method must be one of "
                         f"{sorted(KERNEL_METHODS)}, got {method!r}")
    _KERNEL_METHOD[_method_key(a, b, groups, dtype, device)] = method


def forget_kernel_methods() -> None:
    """Drop every recorded preference (back to the shape rule of :func:`kernel_method`)."""
    _KERNEL_METHOD.clear()


Shape = tuple[int, ...]


def spatial_pairs(shapes: Sequence[Shape]) -> list[tuple[Shape, Shape]]:
    """The (A, B) weight shapes of every pair of spatial 2-D kernels that
    :func:`compose_chain` composes for a chain of these weight shapes, in its order."""
    shapes = [tuple(s) for s in shapes]
    if any(len(s) != 4 for s in shapes):
        return []
    split, _ = _best_splits(tuple(shapes))
    pairs: list[tuple[Shape, Shape]] = []

    def walk(i: int, j: int) -> tuple[int, ...]:
        if i == j:
            return shapes[i]
        k = split[i, j]
        a, b = walk(i, k), walk(k + 1, j)
        if any(x > 1 for x in a[2:]) and any(x > 1 for x in b[2:]):
            pairs.append((a, b))
        return composed_shape(a, b)

    walk(0, len(shapes) - 1)
    return pairs


def _compose_kernels_conv(wa: Tensor, wb: Tensor, groups: int) -> Tensor:
    """The full convolution of the kernels as one convolution (any number of dims)."""
    space = tuple(range(2, wa.dim()))
    padding = [k - 1 for k in wb.shape[2:]]
    return _CONV[len(space)](wa.transpose(0, 1), wb.flip(space), padding=padding,
                             groups=groups).transpose(0, 1)


# The two ways of composing two spatial 2-D kernels (same values, same gradients).
KERNEL_METHODS = {
    "conv": lambda wa, wb, groups: _compose_kernels_conv(wa, wb, groups),
    "fold": lambda wa, wb, groups: _fold_kernels(wa, wb, groups),
}


def compose_chain(layers: Sequence[WeightBias], groups: int = 1) -> WeightBias:
    """Fold ``[(w1, b1), (w2, b2), ...]`` (applied in that order) into one ``(w, b)``.

    All layers share ``groups``; only the padding of the first layer, the stride
    of a layer followed solely by pointwise layers, and one common dilation are
    allowed — :func:`expandfx.linear.fold.chain` checks that first. Composition of affine maps
    is associative, so the pairs are folded in the order that costs the fewest
    multiply-accumulates (as for a matrix chain). Works in the dtype given:
    ``contract`` passes float64, collapsed execution the working dtype.
    """
    if not layers:
        raise ValueError("compose_chain: empty chain")
    split, _ = _best_splits(tuple(tuple(w.shape) for w, _ in layers))

    def fold(i: int, j: int) -> WeightBias:
        if i == j:
            return layers[i]
        k = split[i, j]
        return compose_pair(fold(i, k), fold(k + 1, j), groups)

    return fold(0, len(layers) - 1)


def composed_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Weight shape of ``b ∘ a``."""
    return (b[0], a[1], *(x + y - 1 for x, y in zip(a[2:], b[2:], strict=True)))


def pair_cost(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Multiply-accumulates of :func:`compose_pair` for weights of shapes ``a`` then ``b``."""
    kc = composed_shape(a, b)[2:]
    if all(k == 1 for k in a[2:]) or all(k == 1 for k in b[2:]):
        return b[0] * b[1] * a[1] * math.prod(kc)
    return a[1] * b[0] * math.prod(kc) * b[1] * math.prod(b[2:])


@functools.lru_cache(maxsize=4096)
def _best_splits(shapes: tuple[tuple[int, ...], ...]) -> tuple[dict[tuple[int, int], int], int]:
    """Matrix-chain dynamic programme: the cheapest split of every sub-chain, and the cost
    (memoized: a block's plan is computed once, not at every forward)."""
    n = len(shapes)
    cost = {(i, i): 0 for i in range(n)}
    shape = {(i, i): shapes[i] for i in range(n)}
    split: dict[tuple[int, int], int] = {}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            options = [(cost[i, k] + cost[k + 1, j] + pair_cost(shape[i, k], shape[k + 1, j]), k)
                       for k in range(i, j)]
            cost[i, j], split[i, j] = min(options)
            k = split[i, j]
            shape[i, j] = composed_shape(shape[i, k], shape[k + 1, j])
    return split, cost[0, n - 1]


def chain_cost(shapes: Sequence[tuple[int, ...]]) -> int:
    """Multiply-accumulates of folding a chain of weights of these shapes (best order)."""
    return _best_splits(tuple(tuple(s) for s in shapes))[1]


def grouped(weight: Tensor, groups: int) -> Tensor:
    """View ``[out, in_g, *k]`` as ``[groups, out_g, in_g, *k]``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def ungrouped(weight: Tensor) -> Tensor:
    """Inverse of :func:`grouped`."""
    return weight.reshape(weight.shape[0] * weight.shape[1], *weight.shape[2:])
