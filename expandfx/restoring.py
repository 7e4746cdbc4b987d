"""Leave the caller's model exactly as it was after running code on it.

Tracing runs ``forward`` with FX proxies, and a recorded forward runs it for real. A model
that caches in ``forward`` (timm's LeViT stores its attention bias in eval mode; RAFT keeps
its last correlation pyramid) would keep proxies or stale tensors afterwards, so that
``torch.save(model)`` or a second ``plan`` fails. :func:`preserved` restores every
module's attributes (one level into dicts, lists and sets, where caches live) and every
buffer's values.

Example::

    >>> import torch, torch.nn as nn
    >>> class Cache(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.seen = {}
    ...     def forward(self, x):
    ...         self.seen["x"], self.last = x, x
    ...         return x
    >>> model = Cache()
    >>> with preserved(model):
    ...     _ = model(torch.ones(1))
    >>> model.seen, hasattr(model, "last")
    ({}, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["preserved", "training_flags"]


_CONTAINERS = (dict, list, set)


def _contents(value: Any) -> Any:
    return value.copy() if isinstance(value, _CONTAINERS) else None


def _restore_contents(value: Any, saved: Any) -> None:
    if isinstance(value, dict):
        value.clear()
        value.update(saved)
    elif isinstance(value, list):
        value[:] = saved
    elif isinstance(value, set):
        value.clear()
        value.update(saved)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body on ``model``, then restore its attributes and buffer values."""
    modules = list({id(m): m for m in model.modules()}.values())
    attrs = [(m, dict(vars(m))) for m in modules]
    contents = [(v, _contents(v)) for _, d in attrs for v in d.values()
                if isinstance(v, _CONTAINERS)]
    buffers = [(b, b._version, b.detach().clone()) for m in modules
               for b in m._buffers.values() if isinstance(b, torch.Tensor)]
    try:
        yield model
    finally:
        for module, saved in attrs:
            for name in set(vars(module)) - set(saved):
                del vars(module)[name]
            vars(module).update(saved)
        for value, saved in contents:
            _restore_contents(value, saved)
        with torch.no_grad():
            for buf, version, value in buffers:
                if buf._version != version:
                    buf.copy_(value)


@contextlib.contextmanager
def training_flags(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's ``training`` flag on exit (code inside may call ``eval()``,
    ``train()`` or set flags per module).

    >>> bn = nn.BatchNorm1d(2)
    >>> with training_flags(bn):
    ...     _ = bn.eval()
    >>> bn.training
    True
    """
    flags = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag
