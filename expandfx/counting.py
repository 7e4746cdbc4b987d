"""Counting parameters and multiply-accumulates (MACs) of conv/linear layers.

MACs are counted per conv/linear layer as ``output elements × weight fan-in``
(``in/groups × kernel`` for a conv, ``in_features`` for a linear), on the meta
device, so counting never touches real weights. Biases, norms and activations
are not counted (the paper's convention for its complexity tables).

Example::

    >>> import torch.nn as nn
    >>> macs(nn.Conv2d(3, 8, 3, padding=1), (1, 3, 32, 32))
    221184
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .block import LAYER_TYPES, parameter_free_copy


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of the conv/linear layers of ``module`` for one input of ``input_shape``."""
    meta = module if _on_meta(module) else _meta_twin(module)
    total = 0

    def hook(layer: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * layer.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in meta.modules()
               if isinstance(m, LAYER_TYPES)]
    try:
        dtype = next(meta.parameters()).dtype
        with torch.no_grad():
            meta(torch.empty(tuple(input_shape), device="meta", dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return total


def _on_meta(module: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


def _meta_twin(module: nn.Module) -> nn.Module:
    if isinstance(module, LAYER_TYPES):
        return parameter_free_copy(module)
    raise TypeError(f"macs: pass a conv/linear layer or a module on the meta device, "
                    f"not {type(module).__name__}")
