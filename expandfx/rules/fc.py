"""Expand-FC: a linear layer ``m → n`` becomes Linear m→p · p→q · q→n (p = r·m, q = r·n).

Three layers, as in the paper's experiments. Exact because a product of matrices
is a matrix: ``W = W3 W2 W1`` and ``b = W3 (W2 b1 + b2) + b3``.

Example::

    >>> import torch.nn as nn
    >>> block = build(nn.Linear(256, 64), r=2)
    >>> [tuple(l.weight.shape) for l in block.layers]
    [(512, 256), (128, 512), (64, 128)]
"""

from __future__ import annotations

__all__ = ["RULE", "build", "skip_reason"]

import torch
from torch import nn

from ..block import ExpandedBlock
from .base import Rule
from .factors import linear_factor, match_requires_grad, preserve_three, width


def skip_reason(linear: nn.Module) -> str | None:
    """FC applies to every linear layer."""
    return None


def build(linear: nn.Linear, r: float, init: str = "default", *, path: str = "",
          device: torch.device | str | None = None) -> ExpandedBlock:
    m, n = linear.in_features, linear.out_features
    p, q = width(r, m), width(r, n)
    layers = [linear_factor(linear, m, p, device=device),
              linear_factor(linear, p, q, device=device),
              linear_factor(linear, q, n, device=device)]
    if init == "preserve":
        preserve_three(linear, layers, path=path, r=r)
    match_requires_grad(linear, layers)
    return ExpandedBlock(linear, layers, rule="FC", r=r)


RULE = Rule("FC", "linear", skip_reason, build,
            "a linear layer becomes three (ExpandNets, Expand-FC)")
