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
    >>> from expandfx.passes import expand_cl
    >>> block = expand_cl.build(nn.Conv2d(3, 8, 7, padding=3), r=4)
    >>> cheaper_mode(block, (128, 3, 32, 32)), cheaper_mode(block, (1, 3, 1, 1))
    ('collapsed', 'sequential')
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .algebra import chain_cost
from .block import ExpandedBlock, explicit_padding


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
    total = 0
    for layer in block.layers:
        shape, macs = layer_macs(layer, shape)
        total += macs
    return total


def collapsed_macs(block: ExpandedBlock, input_shape: Sequence[int]) -> int:
    _, macs = layer_macs(block.template, list(input_shape))
    return macs + compose_macs(block)


def compose_macs(block: ExpandedBlock) -> int:
    """MACs of folding the chain with :func:`expandfx.algebra.compose_chain`."""
    return chain_cost([tuple(layer.weight.shape) for layer in block.layers])


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
