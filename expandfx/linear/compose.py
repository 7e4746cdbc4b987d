"""Exact algebra of linear chains: the one home of kernel composition and bias propagation.

:func:`expandfx.linear.fold.fold` composes every chain with :func:`compose_chain` (and
chain blocks whose factors share one ``groups`` call it directly, for speed). A chain folds
pairwise (:func:`compose_pair`, in the cheapest order) or all at once at points
(:func:`compose_points`), whichever costs fewer multiply-accumulates or was measured faster
(:func:`chain_method`, which reads the preferences :func:`prefer_chain_method` records);
:func:`last_step`, :func:`finish` and :func:`finish_grad` split off the last composition so
that a recomputing backward need not run it again. Weights use PyTorch's layouts: a
convolution weight is ``[out, in // groups, *kernel]``, a linear weight ``[out, in]``.

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
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["CHAIN_METHODS", "KERNEL_METHODS", "POINTS", "Step", "chain_bias", "chain_cost",
           "chain_method", "compose_chain", "compose_pair", "compose_points", "composed_shape",
           "finish", "finish_grad", "forget_chain_methods", "forget_kernel_methods", "grouped",
           "kernel_method", "known_chain_method", "known_kernel_method", "last_step",
           "last_step_cost", "pair_cost", "pairs_cost", "points_allowed", "points_cost",
           "prefer_chain_method", "prefer_kernel_method", "spatial_pairs", "ungrouped"]


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
    return (tuple(a), tuple(b), groups, dtype, _device_name(device))


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


def spatial_pairs(shapes: Sequence[Shape], dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None, *,
                  method: str | None = None) -> list[tuple[Shape, Shape]]:
    """The (A, B) weight shapes of every pair of spatial 2-D kernels that
    :func:`compose_chain` composes for a chain of these weight shapes, in its order: none
    when it composes at points (:func:`chain_method` for ``dtype`` and ``device``, or
    ``method``; ``method="pairs"``: the pairs of the pairwise order in any case)."""
    shapes = [tuple(s) for s in shapes]
    if method is None:
        method = chain_method(shapes, dtype, device)
    if any(len(s) != 4 for s in shapes) or method == "points":
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


def compose_chain(layers: Sequence[WeightBias], groups: int = 1, *,
                  method: str | None = None) -> WeightBias:
    """Fold ``[(w1, b1), (w2, b2), ...]`` (applied in that order) into one ``(w, b)``.

    All layers share ``groups``; only the padding of the first layer, the stride
    of a layer followed solely by pointwise layers, and one common dilation are
    allowed — :func:`expandfx.linear.fold.chain` checks that first. Composition of affine maps
    is associative, so the pairs are folded in the order that costs the fewest
    multiply-accumulates (as for a matrix chain), or, when that is cheaper still, the whole
    chain at once by :func:`compose_points` (:func:`chain_method` decides for the weights'
    dtype and device; ``method``, ``"pairs"`` or ``"points"``, forces one: both give the same
    weight to rounding). Works in the dtype given: ``contract`` passes float64, collapsed
    execution the working dtype.
    """
    if not layers:
        raise ValueError("compose_chain: empty chain")
    shapes = tuple(tuple(w.shape) for w, _ in layers)
    ref = layers[0][0]
    if _method(shapes, ref.dtype, ref.device, method, "compose_chain") == "points":
        return compose_points([w for w, _ in layers], groups), chain_bias(layers, groups)
    split, _ = _best_splits(shapes)

    def fold(i: int, j: int) -> WeightBias:
        if i == j:
            return layers[i]
        k = split[i, j]
        return compose_pair(fold(i, k), fold(k + 1, j), groups)

    return fold(0, len(layers) - 1)


def chain_bias(layers: Sequence[WeightBias], groups: int = 1) -> Tensor | None:
    """The bias of the composed chain: ``b = b_n + S_n (b_{n-1} + S_{n-1} (...))`` where
    ``S_i`` is layer ``i``'s weight summed over space (a constant through a valid
    convolution is multiplied by the kernel's sum), per group; ``None`` without biases."""
    bias = None
    for w, b in layers:
        if bias is not None:
            if w.dim() == 2:
                bias = w @ bias
            else:
                out_g, in_g = w.shape[0] // groups, w.shape[1]
                summed = w.sum(tuple(range(2, w.dim()))) if w.dim() > 2 else w
                bias = (summed.reshape(groups, out_g, in_g)
                        @ bias.reshape(groups, in_g, 1)).reshape(-1)
        if b is not None:
            bias = b if bias is None else bias + b
    return bias


# ---------------------------------------------------------------- the point method
#
# A kernel is a polynomial in the shift of each spatial dimension (a matrix of polynomials
# over the channels), composing kernels multiplies these polynomials, and a product of
# degree < K per dimension is fixed by its values at K points. So: evaluate every factor at
# the K_1 x ... x K_d points of the composed kernel's size, multiply the channel matrices
# point by point (a batched matrix chain, the cheapest order), interpolate. A 7x7 kernel
# from three 3x3 ones costs 49 channel products per (o, j, c) instead of 81 and 225 tap
# pairs. Each sub-product needs only its own kernel's points (the first two 3x3 factors:
# a 5x5 kernel, 25 points; POINTS[:5] are among POINTS[:7]); one exact [49, 25] matrix
# (interpolate, evaluate) lifts it to its parent's points, which halves the largest
# product's work and what it stores for backward. ``inf`` stands for the leading
# coefficient (of the factor's own degree: degrees add up, so leading coefficients multiply).
# These points keep the Vandermonde
# matrices well conditioned (condition 7.4e2 at K = 7: float32 compositions agree with the
# pairwise ones to about 3e-6 relative, float64 to 1e-14); more points would not, so larger
# kernels (and half precision, or float32 with reduced-precision matmuls) compose pairwise.
POINTS = (0.0, 1.0, -1.0, math.inf, 2.0, -2.0, 0.5)


@functools.lru_cache(maxsize=64)
def _vandermonde(size: int, k: int) -> Tensor:
    """``[size, k]`` (float64): values at the first ``size`` points of the polynomial with
    coefficients ``c_0 .. c_{k-1}``; the row of ``inf`` picks the leading coefficient
    ``c_{k-1}`` (leading coefficients multiply: degrees add up in a composition)."""
    rows = [[1.0 if i == k - 1 else 0.0 for i in range(k)] if x == math.inf
            else [x ** i for i in range(k)] for x in POINTS[:size]]
    return torch.tensor(rows, dtype=torch.float64)


@functools.lru_cache(maxsize=16)
def _interpolation(size: int) -> Tensor:
    return torch.linalg.inv(_vandermonde(size, size))


_MATRICES: dict[tuple, Tensor] = {}


def _matrix(kind: str, size: tuple[int, ...], k: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """``"eval"``: ``[points, taps]``, the values at every point of a kernel of size ``k``
    (all dimensions at once: the Kronecker product of the per-dimension matrices);
    ``"interp"``: ``[points, points]``, its inverse for kernels of size ``size``; ``"lift"``:
    ``[points, taps]``, a size-``k`` kernel's values at ``size``'s points from its values at
    its own points (interpolate, evaluate)."""
    key = (kind, size, k, dtype, str(device))
    found = _MATRICES.get(key)
    if found is None:
        # plain tensors even when first asked for under inference_mode (an inference tensor
        # cached here could not be saved for backward by later training)
        with torch.inference_mode(False), torch.no_grad():
            per_dim = [_vandermonde(n, t) if kind == "eval" else _interpolation(n)
                       if kind == "interp" else _vandermonde(n, t) @ _interpolation(t)
                       for n, t in zip(size, k, strict=True)]
            exact = functools.reduce(torch.kron, per_dim)
            found = _MATRICES[key] = exact.to(dtype=dtype, device=device, copy=True)
    return found


def compose_points(weights: Sequence[Tensor], groups: int = 1) -> Tensor:
    """The composed kernel of a chain of convolution weights (applied in that order, all of
    ``groups``) by evaluation at points, a point-wise batched matrix chain and interpolation
    (see :data:`POINTS`); the same kernel as :func:`compose_chain`'s pairwise folding.

    Laid out so that nothing is copied either way: each evaluation is one matrix product
    ``V [points, taps] @ W^T`` whose result ``[points, out·in]`` is already the batch of
    per-point channel matrices; the interpolation reads the chain's ``[points, out·in]``
    transposed.

    >>> a, b, c = (torch.randn(*s, 3, 3, dtype=torch.float64) for s in ((4, 2), (5, 4), (3, 5)))
    >>> pairwise = compose_pair(compose_pair((a, None), (b, None)), (c, None))[0]
    >>> bool(torch.allclose(compose_points([a, b, c]), pairwise, rtol=0, atol=1e-10))
    True
    """
    return finish(_points_step(weights, groups))


class Step(NamedTuple):
    """The last composition of a chain, its two operands already computed: ``first`` (the
    earlier factors) and ``second`` (the later ones). ``kind``: ``"points"`` (operands are
    per-point channel matrices ``[points · g, out_g, in_g]``, then interpolation),
    ``"matmul"`` (one group, ``second`` pointwise or linear: ``second @ first``), ``"pair"``
    (any other :func:`compose_pair`). ``out`` is the composed weight's shape."""

    kind: str
    first: Tensor
    second: Tensor
    groups: int
    out: tuple[int, ...]


def last_step(weights: Sequence[Tensor], groups: int = 1, *,
              method: str | None = None) -> Step:
    """The chain's last composition with its operands computed as :func:`compose_chain`
    computes them (differentiably, by ``method`` as there): ``finish(last_step(ws, g))`` is
    its weight. A backward
    that has ``dW`` can get the operands' gradients from :func:`finish_grad` without
    computing the last (largest) product again.

    >>> ws = [torch.randn(6, 3, 1, 1), torch.randn(8, 6, 3, 3), torch.randn(4, 8, 1, 1)]
    >>> step = last_step(ws)
    >>> step.kind, bool(torch.equal(finish(step), compose_chain([(w, None) for w in ws])[0]))
    ('matmul', True)
    """
    if len(weights) < 2:
        raise ValueError("last_step: a chain of at least two weights is needed")
    shapes = tuple(tuple(w.shape) for w in weights)
    if _method(shapes, weights[0].dtype, weights[0].device, method, "last_step") == "points":
        return _points_step(weights, groups)
    split, _ = _best_splits(shapes)

    def fold(i: int, j: int) -> Tensor:
        if i == j:
            return weights[i]
        k = split[i, j]
        return compose_pair((fold(i, k), None), (fold(k + 1, j), None), groups)[0]

    k = split[0, len(weights) - 1]
    first, second = fold(0, k), fold(k + 1, len(weights) - 1)
    kind = "matmul" if groups == 1 and all(x == 1 for x in second.shape[2:]) else "pair"
    return Step(kind, first, second, groups, composed_shape(tuple(first.shape),
                                                            tuple(second.shape)))


def _grid(shapes: Sequence[Shape], i: int, j: int) -> tuple[int, ...]:
    """Points per dimension that determine the composed kernel of factors ``i..j``: its
    size (degrees add up in a composition)."""
    return tuple(1 + sum(s[2 + d] - 1 for s in shapes[i:j + 1])
                 for d in range(len(shapes[0]) - 2))


@functools.lru_cache(maxsize=4096)
def _values_cost(shapes: tuple[Shape, ...], i: int, j: int, grid: tuple[int, ...]
                 ) -> tuple[int, bool]:
    """MACs of the values of factors ``i..j`` at ``grid``'s points, and whether they are
    computed at their own kernel's points and lifted (interpolate, evaluate: one
    ``[P, p]`` matrix), which pays where the contracted channels are wide: CK's first two
    3x3 factors at 25 points instead of 49. The one home of that choice: the point method
    and :func:`points_cost` both read it."""
    points = math.prod(grid)
    if i == j:  # one [points, taps] @ [taps, out·in] per spatial factor
        s = shapes[i]
        return (s[0] * s[1] * math.prod(s[2:]) * points if any(k > 1 for k in s[2:]) else 0,
                False)
    k = _matrix_chain(_chain_dims(shapes))[i, j]

    def product_at(g: tuple[int, ...]) -> int:  # out (all groups) x contracted x in per group
        return (_values_cost(shapes, i, k, g)[0] + _values_cost(shapes, k + 1, j, g)[0]
                + math.prod(g) * shapes[j][0] * shapes[k + 1][1] * shapes[i][1])

    own = _grid(shapes, i, j)
    if own == grid:
        return product_at(grid), False
    lifted = product_at(own)
    if math.prod(own) > 1:  # a pointwise sub-chain is the same matrix at every point: free
        lifted += points * math.prod(own) * shapes[j][0] * shapes[i][1]
    here = product_at(grid)
    return (lifted, True) if lifted < here else (here, False)


def _points_step(weights: Sequence[Tensor], groups: int) -> Step:
    """Products of the point-wise chain run at the composed kernel's points, or at their own
    kernel's fewer points and lifted where that costs less (:func:`_values_cost`)."""
    g, ref = groups, weights[0]
    shapes = tuple(tuple(w.shape) for w in weights)
    size = _grid(shapes, 0, len(shapes) - 1)
    if max(size) > len(POINTS):
        raise ValueError(f"compose_points: composed kernel {size} needs more than "
                         f"{len(POINTS)} points per dimension; compose it with compose_chain")
    split = _matrix_chain(_chain_dims(shapes))

    def leaf(w: Tensor, grid: tuple[int, ...]) -> Tensor:  # [points · g, out_g, in_g]
        points, o, j, k = math.prod(grid), w.shape[0] // g, w.shape[1], tuple(w.shape[2:])
        if all(t == 1 for t in k):  # the same matrix at every point
            m = w.reshape(g, o, j)
            return (m.expand(points, o, j) if g == 1
                    else m.expand(points, g, o, j).reshape(points * g, o, j))
        # the taps-major copy is cheap and makes autograd's weight gradient E^T @ dV, a wide
        # product; on the transposed view it is (dV^T @ E)^T, a skinny one (2x slower)
        taps_major = w.reshape(g * o * j, -1).t().contiguous()
        return (_matrix("eval", grid, k, w.dtype, w.device) @ taps_major).reshape(
            points * g, o, j)

    def at(i: int, j: int, grid: tuple[int, ...]) -> Tensor:  # factors i..j: M_j ... M_i
        if i == j:
            return leaf(weights[i], grid)
        own, k = _grid(shapes, i, j), split[i, j]
        if not _values_cost(shapes, i, j, grid)[1]:
            return torch.bmm(at(k + 1, j, grid), at(i, k, grid))
        values = torch.bmm(at(k + 1, j, own), at(i, k, own))
        o, c, points = values.shape[1], values.shape[2], math.prod(grid)
        if math.prod(own) == 1:  # pointwise factors only: the same matrix at every point
            return values.reshape(1, -1).expand(points, -1).reshape(points * g, o, c)
        lift = _matrix("lift", grid, own, values.dtype, values.device)
        return (lift @ values.reshape(math.prod(own), -1)).reshape(points * g, o, c)

    k = split[0, len(weights) - 1]
    return Step("points", at(0, k, size), at(k + 1, len(weights) - 1, size), g,
                (weights[-1].shape[0], ref.shape[1], *size))


def finish(step: Step) -> Tensor:
    """The composed weight from the chain's :func:`last_step`."""
    if step.kind != "points":
        return compose_pair((step.first, None), (step.second, None), step.groups)[0]
    size = step.out[2:]
    values = torch.bmm(step.second, step.first).reshape(math.prod(size), -1)
    coefficients = values.t() @ _matrix("interp", size, size, values.dtype, values.device).t()
    return coefficients.reshape(step.out)


def finish_grad(step: Step, grad: Tensor) -> tuple[Tensor, Tensor] | None:
    """Gradients of ``finish(step)`` with respect to ``step.first`` and ``step.second``
    given the composed weight's gradient, computed from the operands alone (``finish`` is
    not run again); ``None`` for a ``"pair"`` step (differentiate :func:`finish` instead).

    >>> ws = [torch.randn(32, 8, 3, 3), torch.randn(64, 32, 3, 3), torch.randn(16, 64, 3, 3)]
    >>> step, dw = last_step(ws), torch.randn(16, 8, 7, 7)
    >>> step.kind
    'points'
    >>> first, second = (t.detach().requires_grad_() for t in (step.first, step.second))
    >>> ref = torch.autograd.grad(finish(step._replace(first=first, second=second)),
    ...                           [first, second], dw)
    >>> all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(finish_grad(step, dw), ref))
    True
    """
    first, second = step.first, step.second
    if step.kind == "matmul":  # W = B [o, j] @ A [j, c·t]
        a = first.reshape(first.shape[0], -1)
        b = second.reshape(second.shape[0], -1)
        g = grad.reshape(b.shape[0], a.shape[1])
        return (b.t() @ g).reshape(first.shape), (g @ a.t()).reshape(second.shape)
    if step.kind != "points":
        return None
    size = step.out[2:]
    interp = _matrix("interp", size, size, grad.dtype, grad.device)
    values = (interp.t() @ grad.reshape(-1, math.prod(size)).t())  # [points, out·in]
    values = values.reshape(-1, second.shape[1], first.shape[2])
    return (torch.bmm(second.transpose(1, 2), values),
            torch.bmm(values, first.transpose(1, 2)))


@functools.lru_cache(maxsize=1024)
def _matrix_chain(dims: tuple[int, ...]) -> dict[tuple[int, int], int]:
    """Cheapest split of every sub-chain of matrices ``dims[i+1] x dims[i]``."""
    n = len(dims) - 1
    cost = {(i, i): 0 for i in range(n)}
    split: dict[tuple[int, int], int] = {}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            cost[i, j], split[i, j] = min(
                (cost[i, k] + cost[k + 1, j] + dims[i] * dims[k + 1] * dims[j + 1], k)
                for k in range(i, j))
    return split


def _chain_dims(shapes: Sequence[Shape]) -> tuple[int, ...]:
    """The matrix-chain dimensions of a chain of weight shapes (from shapes alone, so that
    the cost model and the composition pick the same order)."""
    return tuple(s[1] for s in shapes) + (shapes[-1][0],)


def _points_shape_ok(shapes: Sequence[Shape]) -> bool:
    if len(shapes) < 2 or any(len(s) < 3 or len(s) != len(shapes[0]) for s in shapes):
        return False
    spatial = [s for s in shapes if any(k > 1 for k in s[2:])]
    size = [1 + sum(s[2 + d] - 1 for s in shapes) for d in range(len(shapes[0]) - 2)]
    return len(spatial) >= 2 and max(size) <= len(POINTS)


def points_cost(shapes: Sequence[Shape]) -> int:
    """Multiply-accumulates of :func:`compose_points` for weights of these shapes: the
    evaluations, the point-wise matrix chain (sub-products lifted where cheaper), the
    interpolation."""
    shapes = tuple(tuple(s) for s in shapes)
    n = len(shapes)
    size = _grid(shapes, 0, n - 1)
    points, k = math.prod(size), _matrix_chain(_chain_dims(shapes))[0, n - 1]
    return (_values_cost(shapes, 0, k, size)[0] + _values_cost(shapes, k + 1, n - 1, size)[0]
            + points * shapes[-1][0] * shapes[k + 1][1] * shapes[0][1]
            + shapes[-1][0] * shapes[0][1] * points * points)  # [out·in, points] @ [points]^2


def last_step_cost(shapes: Sequence[Shape]) -> int:
    """Multiply-accumulates of a chain's last composition (:func:`finish` of
    :func:`last_step`): what a backward that recomputes only the operands does not redo;
    ``chain_cost(shapes) - last_step_cost(shapes)`` is what it recomputes."""
    shapes = tuple(tuple(s) for s in shapes)
    n = len(shapes)
    if n < 2:
        return 0
    if chain_method(shapes) == "points":
        size = [1 + sum(s[2 + d] - 1 for s in shapes) for d in range(len(shapes[0]) - 2)]
        points = math.prod(size)
        k = _matrix_chain(_chain_dims(shapes))[0, n - 1]
        return (points * shapes[-1][0] * shapes[k + 1][1] * shapes[0][1]
                + shapes[-1][0] * shapes[0][1] * points * points)
    split, _ = _best_splits(shapes)
    k = split[0, n - 1]

    def shape(i: int, j: int) -> Shape:
        return shapes[i] if i == j else composed_shape(shape(i, split[i, j]),
                                                       shape(split[i, j] + 1, j))

    return pair_cost(shape(0, k), shape(k + 1, n - 1))


# The two ways of composing a whole chain (same weight to rounding): pairwise in the
# cheapest order, or at once at points.
CHAIN_METHODS = ("pairs", "points")

# (weight shapes, dtype, device) -> "pairs" | "points": measured preferences, filled by the
# execution layer's tuner (:func:`expandfx.execution.tune_chain`); read here, timed there.
_CHAIN_METHOD: dict[tuple, str] = {}


def _chain_key(shapes: Sequence[Shape], dtype: torch.dtype,
               device: torch.device | str) -> tuple:
    return (tuple(tuple(s) for s in shapes), dtype, _device_name(device))


def _device_name(device: torch.device | str) -> str:
    """``cuda:0`` for ``"cuda"`` too (the current device), as a tensor's ``.device`` says."""
    d = torch.device(device)
    if d.index is None and d.type == "cuda" and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def points_allowed(shapes: Sequence[Shape], dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`compose_points` may compose a chain of these weight shapes in
    ``dtype``: at least two spatial kernels, a composed kernel of at most ``len(POINTS)``
    per dimension, and float64 or float32 with full-precision matmuls (not half precision,
    TF32 or bf16 shortcuts: the interpolation's error would grow with them)."""
    shapes = tuple(tuple(s) for s in shapes)
    if dtype not in (torch.float32, torch.float64) or not _points_shape_ok(shapes):
        return False
    return dtype == torch.float64 or _full_precision()


def chain_method(shapes: Sequence[Shape], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> str:
    """How :func:`compose_chain` composes a chain of these weight shapes: ``"pairs"`` where
    the point method cannot be used (:func:`points_allowed`), else the preference recorded
    by :func:`prefer_chain_method` for these shapes, ``dtype`` and ``device`` (none is read
    when ``device`` is ``None``: the cost model), else ``"points"`` when
    :func:`compose_points` costs fewer multiply-accumulates than the best pairwise order."""
    shapes = tuple(tuple(s) for s in shapes)
    if not points_allowed(shapes, dtype):
        return "pairs"
    if device is not None:
        found = _CHAIN_METHOD.get(_chain_key(shapes, dtype, device))
        if found is not None:
            return found
    return "points" if points_cost(shapes) < _best_splits(shapes)[1] else "pairs"


def known_chain_method(shapes: Sequence[Shape], dtype: torch.dtype,
                       device: torch.device | str) -> str | None:
    """The recorded preference for a chain of these weight shapes, or ``None``."""
    return _CHAIN_METHOD.get(_chain_key(shapes, dtype, device))


def prefer_chain_method(shapes: Sequence[Shape], dtype: torch.dtype,
                        device: torch.device | str, method: str) -> None:
    """Record ``method`` (``"pairs"`` or ``"points"``) for chains of these weight shapes;
    :func:`chain_method` still answers ``"pairs"`` where points cannot be used.

    >>> ck = [(128, 32, 3, 3), (256, 128, 3, 3), (64, 256, 3, 3)]
    >>> prefer_chain_method(ck, torch.float32, "cpu", "pairs")
    >>> chain_method(ck, torch.float32, "cpu"), chain_method(ck)  # recorded, the MAC rule
    ('pairs', 'points')
    >>> prefer_chain_method(ck, torch.float16, "cpu", "points")
    >>> chain_method(ck, torch.float16, "cpu")  # half precision never composes at points
    'pairs'
    >>> forget_chain_methods()
    """
    if method not in CHAIN_METHODS:
        raise ValueError(f"prefer_chain_method: method must be one of {list(CHAIN_METHODS)}, "
                         f"got {method!r}")
    _CHAIN_METHOD[_chain_key(shapes, dtype, device)] = method


def forget_chain_methods(shapes: Sequence[Sequence[Shape]] | None = None) -> None:
    """Drop the recorded chain preferences: every one, or those of these chains (a list of
    chains' weight shapes; every dtype and device) — back to the MAC rule of
    :func:`chain_method`."""
    if shapes is None:
        _CHAIN_METHOD.clear()
        return
    drop = {tuple(tuple(s) for s in chain) for chain in shapes}
    for key in [k for k in _CHAIN_METHOD if k[0] in drop]:
        del _CHAIN_METHOD[key]


def _method(shapes: tuple[Shape, ...], dtype: torch.dtype, device: torch.device,
            method: str | None, who: str) -> str:
    if method is None:
        return chain_method(shapes, dtype, device)
    if method not in CHAIN_METHODS:
        raise ValueError(f"{who}: method must be one of {list(CHAIN_METHODS)}, got {method!r}")
    if method == "points" and not points_allowed(shapes, dtype):
        raise ValueError(f"{who}: the point method cannot compose weights of shapes "
                         f"{list(shapes)} in {dtype} (see points_allowed); use 'pairs'")
    return method


def _full_precision() -> bool:
    """float32 matmuls are not allowed TF32/bf16 shortcuts (the point method's error would
    grow with them)."""
    return (torch.get_float32_matmul_precision() == "highest"
            and not torch.backends.cuda.matmul.allow_tf32)


def composed_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Weight shape of ``b ∘ a``."""
    return (b[0], a[1], *(x + y - 1 for x, y in zip(a[2:], b[2:], strict=True)))


def pair_cost(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Multiply-accumulates of :func:`compose_pair` for weights of shapes ``a`` then ``b``:
    one per tap pair ``(u, t)`` and channel triple — what the per-tap products and the
    col2im method do (the full convolution of the kernels also multiplies the padding's
    zeros: ``prod(kc) / prod(ka)`` times as many; a measured preference may still pick it)."""
    return b[0] * b[1] * a[1] * math.prod(a[2:]) * math.prod(b[2:])


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


def pairs_cost(shapes: Sequence[tuple[int, ...]]) -> int:
    """Multiply-accumulates of folding a chain of weights of these shapes pair by pair in
    the cheapest order (the matrix-chain programme)."""
    return _best_splits(tuple(tuple(s) for s in shapes))[1]


def chain_cost(shapes: Sequence[tuple[int, ...]]) -> int:
    """Multiply-accumulates of folding a chain of weights of these shapes as
    :func:`compose_chain` does by the MAC rule (float32, no measured preference): the best
    pairwise order or the point method."""
    shapes = tuple(tuple(s) for s in shapes)
    return points_cost(shapes) if chain_method(shapes) == "points" else pairs_cost(shapes)


def grouped(weight: Tensor, groups: int) -> Tensor:
    """View ``[out, in_g, *k]`` as ``[groups, out_g, in_g, *k]``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def ungrouped(weight: Tensor) -> Tensor:
    """Inverse of :func:`grouped`."""
    return weight.reshape(weight.shape[0] * weight.shape[1], *weight.shape[2:])
