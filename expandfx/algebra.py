"""Exact algebra of linear chains: the one home of kernel composition and bias propagation.

Every pass that folds a chain (``contract``, later collapsed execution) calls
:func:`compose_chain`. Weights use PyTorch's layouts: a convolution weight is
``[out, in // groups, *kernel]``, a linear weight ``[out, in]``.

Example::

    >>> import torch
    >>> a, b = torch.randn(6, 3, 1, 1), torch.randn(8, 6, 3, 3)
    >>> w, bias = compose_chain([(a, None), (b, None)], groups=1)
    >>> tuple(w.shape), bias
    ((8, 3, 3, 3), None)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

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
        space = tuple(range(2, wa.dim()))
        conv = _CONV[len(space)]
        padding = [k - 1 for k in wb.shape[2:]]
        weight = conv(
            wa.transpose(0, 1), wb.flip(space), padding=padding, groups=groups
        ).transpose(0, 1)
        bias = None
        if ba is not None:
            out_g, in_g = wb.shape[0] // groups, wb.shape[1]
            summed = wb.sum(space).reshape(groups, out_g, in_g)
            bias = (summed @ ba.reshape(groups, in_g, 1)).reshape(-1)
    if bb is not None:
        bias = bb if bias is None else bias + bb
    return weight, bias


def compose_chain(layers: Sequence[WeightBias], groups: int = 1) -> WeightBias:
    """Fold ``[(w1, b1), (w2, b2), ...]`` (applied in that order) into one ``(w, b)``.

    All layers share ``groups``; only the padding of the first layer, the stride
    of a layer followed solely by pointwise layers, and one common dilation are
    allowed — the chains :mod:`expandfx.passes` builds. Work in the dtype given:
    ``contract`` passes float64.
    """
    if not layers:
        raise ValueError("compose_chain: empty chain")
    weight, bias = layers[0]
    for nxt in layers[1:]:
        weight, bias = compose_pair((weight, bias), nxt, groups)
    return weight, bias


def grouped(weight: Tensor, groups: int) -> Tensor:
    """View ``[out, in_g, *k]`` as ``[groups, out_g, in_g, *k]``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def ungrouped(weight: Tensor) -> Tensor:
    """Inverse of :func:`grouped`."""
    return weight.reshape(weight.shape[0] * weight.shape[1], *weight.shape[2:])
