"""Counting parameters (MACs live in :mod:`expandfx.linear.costs`).

Example::

    >>> import torch.nn as nn
    >>> param_count(nn.Linear(4, 2))
    10
"""

from __future__ import annotations

from torch import nn

__all__ = ["param_count"]


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
