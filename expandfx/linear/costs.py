"""MACs (multiply-accumulates per forward) of layers and expanded blocks, computed from
shapes alone: the plan's MAC columns, and the cost model ``mode="auto"`` falls back on where
it cannot or may not time the two executions (see ``ExpandedBlock.resolve_mode``); it also
settles, without timing, the cases where one mode costs 8× fewer MACs than the other.

A conv/linear layer costs output elements × weight fan-in (biases, norms and activations
are not counted — the paper's convention for its complexity tables). Sequential: the MACs
of every factor on the input. Collapsed: the MACs of the original layer plus those of
composing the factors (independent of the batch). Backward costs about twice the forward in
both modes, so forward MACs decide.

Example::

    >>> import torch.nn as nn
    >>> from expandfx.rules import cl
    >>> block = cl.build(nn.Conv2d(3, 8, 7, padding=3), r=4)
    >>> cheaper_mode(block, (128, 3, 32, 32)), cheaper_mode(block, (1, 3, 1, 1))
    ('collapsed', 'sequential')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from .compose import chain_cost, composed_shape
from .ir import Identity, Par, Seq, explicit_padding

if TYPE_CHECKING:  # the block is a client of this module, not a dependency
    from ..block import ExpandedBlock

__all__ = ["cheaper_mode", "collapsed_macs", "compose_macs", "layer_macs", "sequential_macs"]


def cheaper_mode(block: ExpandedBlock, input_shape: Sequence[int]) -> str:
    """``"collapsed"`` unless running the factors one by one costs fewer MACs."""
    seq = sequential_macs(block, input_shape)
    col = collapsed_macs(block, input_shape)
    return "collapsed" if col <= seq else "sequential"


def sequential_macs(block: ExpandedBlock, input_shape: Sequence[int]) -> int:
    shape = list(input_shape)
    if block.pre_pad is not None:
        for i in range(len(block.pre_pad) // 2):
            shape[-1 - i] += block.pre_pad[2 * i] + block.pre_pad[2 * i + 1]
    return _walk_macs(block, block.topology, shape)[1]


def _walk_macs(block: ExpandedBlock, node, shape: list[int]) -> tuple[list[int], int]:
    """(output shape, MACs) of running a topology node on an input of ``shape``."""
    if isinstance(node, Identity):
        return shape, 0
    if isinstance(node, Seq):
        total = 0
        for part in node.parts:
            shape, macs = _walk_macs(block, part, shape)
            total += macs
        return shape, total
    if isinstance(node, Par):
        runs = [_walk_macs(block, part, shape) for part in node.parts]
        return runs[0][0], sum(macs for _, macs in runs)
    layer = block.get_submodule(node)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # a branch norm: one MAC per element
        return shape, math.prod(shape)
    return layer_macs(layer, shape)


def collapsed_macs(block: ExpandedBlock, input_shape: Sequence[int]) -> int:
    _, macs = layer_macs(block.template, list(input_shape))
    return macs + compose_macs(block)


def compose_macs(block: ExpandedBlock) -> int:
    """MACs of folding the block's factors (:func:`expandfx.linear.fold.fold`): the best
    order of every chain, plus the chains inside branches (sums are not counted)."""

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
        layer = block.get_submodule(node)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # folds as a depthwise 1×…×1
            dims = len(getattr(block.template, "kernel_size", ()))
            return (layer.num_features, 1, *(1,) * dims), 0
        return tuple(layer.weight.shape), 0

    return walk(block.topology)[1]


def _chain_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    out = shapes[0]
    for s in shapes[1:]:
        out = composed_shape(out, s)
    return out


def layer_macs(layer: nn.Module, shape: list[int]) -> tuple[list[int], int]:
    """(output shape, MACs) of a conv/linear layer for an input shape: output elements ×
    weight fan-in (``in/groups × kernel`` for a conv, ``in_features`` for a linear)."""
    if isinstance(layer, nn.Linear):
        out = [*shape[:-1], layer.out_features]
        return out, math.prod(out) * layer.in_features
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
