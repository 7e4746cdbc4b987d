"""MACs (multiply-accumulates per forward) of layers and linear topologies, computed from
shapes alone: the plan's MAC columns, and the cost model that ``mode="auto"``
(:mod:`expandfx.execution`) falls back on where it cannot or may not time the two executions.

A conv/linear layer costs output elements × weight fan-in (biases, norms and activations
are not counted — the paper's convention for its complexity tables). Running a topology:
the MACs of every factor on the input (:func:`topology_macs`). Folding it: the best order of
every chain (:func:`fold_macs`, independent of the batch). This module knows topologies and
layer hyperparameters, not blocks: a caller passes how to find a factor by its path.

Example::

    >>> import torch.nn as nn
    >>> from expandfx.linear.ir import Seq
    >>> layers = {"a": nn.Conv2d(3, 12, 1), "b": nn.Conv2d(12, 8, 3)}
    >>> topology_macs(Seq(("a", "b")), layers.__getitem__, [2, 3, 10, 10])
    ([2, 8, 8, 8], 117792)
    >>> fold_macs(Seq(("a", "b")), lambda p: tuple(layers[p].weight.shape))
    2592
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from .compose import chain_cost, composed_shape
from .ir import Identity, Node, Par, Seq, explicit_padding

__all__ = ["fold_macs", "layer_macs", "topology_macs"]


def topology_macs(node: Node, layer: Callable[[str], nn.Module],
                  shape: list[int]) -> tuple[list[int], int]:
    """(output shape, MACs) of running a topology node on an input of ``shape``; ``layer``
    maps a factor path to its conv/linear layer."""
    if isinstance(node, Identity):
        return shape, 0
    if isinstance(node, Seq):
        total = 0
        for part in node.parts:
            shape, macs = topology_macs(part, layer, shape)
            total += macs
        return shape, total
    if isinstance(node, Par):
        runs = [topology_macs(part, layer, shape) for part in node.parts]
        return runs[0][0], sum(macs for _, macs in runs)
    found = layer(node)
    if isinstance(found, nn.modules.batchnorm._BatchNorm):  # a branch norm: one MAC per element
        return shape, math.prod(shape)
    return layer_macs(found, shape)


def fold_macs(node: Node, weight_shape: Callable[[str], tuple[int, ...]]) -> int:
    """MACs of folding a topology (:func:`expandfx.linear.fold.fold`): the best order of
    every chain, plus the chains inside branches (sums are not counted); ``weight_shape``
    maps a factor path to its weight shape."""

    def walk(node) -> tuple[tuple[int, ...] | None, int]:
        if isinstance(node, Identity):
            return None, 0
        if isinstance(node, (Seq, Par)):
            parts = [walk(part) for part in node.parts]
            shapes = [s for s, _ in parts if s is not None]
            inner = sum(c for _, c in parts)
            if isinstance(node, Seq):
                return _chain_shape(shapes), inner + chain_cost(shapes)
            widest = max(shapes, key=lambda s: math.prod(s[2:]))
            return widest, inner
        return tuple(weight_shape(node)), 0

    return walk(node)[1]


def _chain_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    out = shapes[0]
    for s in shapes[1:]:
        out = composed_shape(out, s)
    return out


def layer_macs(layer: nn.Module, shape: list[int]) -> tuple[list[int], int]:
    """(output shape, MACs) of a conv/linear layer for an input shape: output elements ×
    weight fan-in (``in/groups × kernel`` for a conv, ``in_features`` for a linear); a
    transposed conv: input elements × fan-out (``out/groups × kernel``, as torch's flop
    counter has it), at its ``output_padding``."""
    if isinstance(layer, nn.Linear):
        out = [*shape[:-1], layer.out_features]
        return out, math.prod(out) * layer.in_features
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        spatial = [(size - 1) * s - 2 * p + d * (k - 1) + op + 1 for size, s, p, d, k, op in
                   zip(shape[2:], layer.stride, layer.padding, layer.dilation,
                       layer.kernel_size, layer.output_padding, strict=True)]
        fan_out = layer.out_channels // layer.groups * math.prod(layer.kernel_size)
        return [shape[0], layer.out_channels, *spatial], math.prod(shape) * fan_out
    pads = explicit_padding(layer)
    spatial = []
    for i, size in enumerate(shape[2:]):
        j = len(shape) - 3 - i  # F.pad order is last dim first
        padded = size + pads[2 * j] + pads[2 * j + 1]
        span = layer.dilation[i] * (layer.kernel_size[i] - 1) + 1
        spatial.append((padded - span) // layer.stride[i] + 1)
    out = [shape[0], layer.out_channels, *spatial]
    fan_in = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return out, math.prod(out) * fan_in


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once).

    >>> import torch.nn as nn
    >>> param_count(nn.Linear(4, 2))
    10
    """
    return sum(p.numel() for p in module.parameters())
