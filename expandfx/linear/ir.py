"""A small IR of linear maps: :class:`Affine` leaves combined by :class:`Seq` and :class:`Par`.

``Affine`` is one conv/linear map (weight, bias, :class:`Geometry`); ``Seq`` applies its
parts one after another; ``Par`` applies its parts to the same input and *sums* them;
``Identity`` is the input itself (a residual branch). BatchNorm in eval mode is a per-channel
affine map (:func:`batchnorm`). :func:`expandfx.linear.fold.fold` turns any legal tree into
one ``Affine`` — see ``docs/design.md §3``. No module subclasses live here: the same
nodes describe an expanded block's topology (leaves are the paths of its factor modules)
and the tensors being folded (leaves are ``Affine``).

Example::

    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv2d(4, 4, 3, padding=1)
    >>> tree = Par((Affine.of(conv), Identity()))
    >>> [type(leaf).__name__ for leaf in leaves(tree)]
    ['Affine', 'Identity']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = ["PAD_MODES", "Affine", "Geometry", "Identity", "Node", "Par", "Seq", "batchnorm",
           "explicit_padding", "leaves", "map_leaves", "multiplicity", "pad_from_pairs",
           "pairs_from_pad", "run"]

# a conv's padding_mode -> the F.pad mode that pads the same way
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}

Tensor = torch.Tensor
Pairs = tuple[tuple[int, int], ...]


def explicit_padding(conv: nn.Module) -> list[int]:
    """The padding a conv applies, in ``F.pad`` order (last dim first, left/right).

    Read from the live ``padding`` (and ``dilation``) as ``forward`` does for zero padding —
    code that edits ``conv.padding`` after construction (dilated segmentation backbones) is
    seen — resolving ``"same"`` (asymmetric for even effective kernels) and ``"valid"``
    exactly as PyTorch does; other modes pad by the amounts fixed at construction.
    """
    if conv.padding_mode != "zeros":
        return list(conv._reversed_padding_repeated_twice)
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [0] * (2 * dims)
    out = []
    for i in reversed(range(dims)):
        if conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            out += [total // 2, total - total // 2]
        else:
            out += [conv.padding[i], conv.padding[i]]
    return out


def pairs_from_pad(pad: list[int] | tuple[int, ...]) -> Pairs:
    """``F.pad`` order (last dim first) → ``((before, after), ...)`` in dim order."""
    return tuple((pad[2 * i], pad[2 * i + 1]) for i in reversed(range(len(pad) // 2)))


def pad_from_pairs(pairs: Pairs) -> list[int]:
    """Inverse of :func:`pairs_from_pad`."""
    return [p for pair in reversed(pairs) for p in pair]


@dataclass(frozen=True)
class Geometry:
    """How a map slides over its input: ``dims`` spatial dims (0 for a linear map), and per
    dim the stride, the padding ``(before, after)`` and the dilation; plus groups and the
    padding mode (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``).

    ``transposed``: a transposed convolution (``ConvTransposeNd``), whose weight is laid out
    ``[in, out // groups, *kernel]``, whose ``padding`` crops the output (as torch's does)
    and which adds ``output_padding`` at the end of each dim."""

    dims: int
    stride: tuple[int, ...] = ()
    padding: Pairs = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @classmethod
    def linear(cls) -> Geometry:
        return cls(0)

    @classmethod
    def pointwise(cls, dims: int, groups: int = 1) -> Geometry:
        """Stride 1, no padding, dilation 1: a 1×…×1 kernel's geometry."""
        return cls(dims, (1,) * dims, ((0, 0),) * dims, (1,) * dims, groups)

    @classmethod
    def of(cls, layer: nn.Module) -> Geometry:
        """The geometry of a torch conv or linear layer."""
        if not hasattr(layer, "kernel_size"):
            return cls.linear()
        dims = len(layer.kernel_size)
        if getattr(layer, "transposed", False):
            return cls(dims, tuple(layer.stride), tuple((p, p) for p in layer.padding),
                       tuple(layer.dilation), layer.groups, layer.padding_mode, True,
                       tuple(layer.output_padding))
        return cls(dims, tuple(layer.stride), pairs_from_pad(explicit_padding(layer)),
                   tuple(layer.dilation), layer.groups, layer.padding_mode)

    @property
    def padded(self) -> bool:
        return any(p for pair in self.padding for p in pair)

    @property
    def symmetric_padding(self) -> tuple[int, ...] | None:
        """Per-dim padding if every dim pads equally on both sides, else ``None``."""
        if all(a == b for a, b in self.padding):
            return tuple(a for a, _ in self.padding)
        return None

    def canonical(self, kernel: tuple[int, ...]) -> Geometry:
        """The same sliding with what cannot matter normalised: dilation 1 where the kernel
        is 1 wide, padding mode ``"zeros"`` when nothing is padded."""
        dilation = tuple(d if k > 1 else 1 for d, k in zip(self.dilation, kernel, strict=True))
        return replace(self, dilation=dilation,
                       padding_mode=self.padding_mode if self.padded else "zeros")

    def with_padding(self, padding: Pairs, mode: str | None = None) -> Geometry:
        return replace(self, padding=padding, padding_mode=mode or self.padding_mode)


@dataclass(frozen=True)
class Affine:
    """``y = W ⋆ x + b``: a conv (weight ``[out, in // groups, *kernel]``), a transposed conv
    (weight ``[in, out // groups, *kernel]``, ``geometry.transposed``) or a linear map
    (weight ``[out, in]``), with its geometry."""

    weight: Tensor
    bias: Tensor | None
    geometry: Geometry

    @classmethod
    def of(cls, layer: nn.Module) -> Affine:
        """A torch conv/linear layer's current (differentiable) weight and bias."""
        return cls(layer.weight, layer.bias, Geometry.of(layer))

    @property
    def in_channels(self) -> int:
        if self.geometry.transposed:
            return self.weight.shape[0]
        return self.weight.shape[1] * self.geometry.groups

    @property
    def out_channels(self) -> int:
        if self.geometry.transposed:
            return self.weight.shape[1] * self.geometry.groups
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def pointwise(self) -> bool:
        """A 1×…×1 kernel (every linear map is pointwise)."""
        return all(k == 1 for k in self.kernel)

    def to(self, dtype: torch.dtype | None) -> Affine:
        if dtype is None:
            return self
        bias = None if self.bias is None else self.bias.to(dtype)
        return Affine(self.weight.to(dtype), bias, self.geometry)


@dataclass(frozen=True)
class Identity:
    """The input itself: a residual branch of a :class:`Par` (a no-op in a :class:`Seq`)."""


@dataclass(frozen=True)
class Seq:
    """Parts applied one after another (the first part sees the input)."""

    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Par:
    """Parts applied to the same input, outputs summed."""

    parts: tuple[Node, ...]


Node = Affine | Identity | Seq | Par | Any  # Any: a leaf of a topology (a module path)


def batchnorm(bn: nn.Module, dims: int) -> Affine:
    """An eval-mode BatchNorm as ``y = s·x + t`` per channel, ``s = γ / √(var + ε)``,
    ``t = β − s·mean``; as a depthwise 1×…×1 conv (``dims`` > 0) or a diagonal matrix
    (``dims`` = 0, a BatchNorm1d on ``[N, C]``)."""
    var, mean = bn.running_var, bn.running_mean
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if dims == 0:
        return Affine(torch.diag(scale), shift, Geometry.linear())
    weight = scale.reshape(-1, 1, *(1,) * dims)
    return Affine(weight, shift, Geometry.pointwise(dims, groups=scale.numel()))


def leaves(node: Node) -> Iterator[Any]:
    """Every leaf (``Affine``, ``Identity`` or topology path), in order."""
    if isinstance(node, (Seq, Par)):
        for part in node.parts:
            yield from leaves(part)
    else:
        yield node


def map_leaves(node: Node, fn: Callable[[Any], Node]) -> Node:
    """The same tree with every non-``Identity`` leaf replaced by ``fn(leaf)``."""
    if isinstance(node, (Seq, Par)):
        return type(node)(tuple(map_leaves(part, fn) for part in node.parts))
    return node if isinstance(node, Identity) else fn(node)


def run(node: Node, x: Tensor, apply: Callable[[Any, Tensor], Tensor]) -> Tensor:
    """Interpret a tree on ``x``: ``apply(leaf, x)`` for each leaf, sums for ``Par``."""
    if isinstance(node, Seq):
        for part in node.parts:
            x = run(part, x, apply)
        return x
    if isinstance(node, Par):
        outs = [run(part, x, apply) for part in node.parts]
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total
    return x if isinstance(node, Identity) else apply(node, x)


def multiplicity(node: Node, factor: Callable[[Any], bool] | None = None) -> int:
    """How many factors a gradient step moves the folded weight through, at most: a chain
    of N factors counts N (each step adds about ``lr`` to the product's step at balanced
    init), parallel branches add up (a tap covered by k branches moves k times),
    ``Identity`` has no parameters. ``factor(leaf)`` says whether a leaf is a factor (default:
    every leaf); ``param_groups`` leaves out per-branch norms and fixed maps, and divides
    the learning rate by the count.

    >>> tree = Par((Seq(("a", "a_scale")), Seq(("b", "b_scale")), Identity()))
    >>> multiplicity(tree), multiplicity(tree, lambda leaf: not leaf.endswith("_scale"))
    (4, 2)
    """
    if isinstance(node, (Seq, Par)):
        return sum(multiplicity(part, factor) for part in node.parts)
    if isinstance(node, Identity):
        return 0
    return 1 if factor is None or factor(node) else 0
