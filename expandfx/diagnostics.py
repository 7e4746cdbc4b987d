"""Training diagnostics: gradient confusion (ExpandNets paper §5.1, after Sankararaman et al.).

Example::

    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Linear(4, 2)
    >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
    >>> round(gradient_confusion(model, F.cross_entropy, batches), 4)  # two batches disagree
    -0.4666
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["gradient_confusion", "minibatch_gradients"]


def minibatch_gradients(model: nn.Module, loss_fn: Callable[..., torch.Tensor],
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One row per batch: the gradient of the loss w.r.t. every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                               for p, g in zip(params, grads, strict=True)]))
    return torch.stack(rows)


def gradient_confusion(model: nn.Module, loss_fn: Callable[..., torch.Tensor],
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Minimum pairwise cosine similarity of mini-batch gradients (higher is better)."""
    g = minibatch_gradients(model, loss_fn, batches)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = g @ g.T
    i, j = torch.triu_indices(len(g), len(g), offset=1)
    return cos[i, j].min().item()
