"""Copying a model for ``expand`` / ``contract``, also when it holds non-leaf tensors.

``copy.deepcopy`` refuses tensors that are part of an autograd graph (torchvision's RAFT
keeps the correlation pyramid of its last training forward in a plain list). Such tensors
are stale activations, not state: the copy gets their detached values. Anything else that
cannot be copied is named (module path and attribute) in a one-line error that says to
pass ``inplace=True``.

Example::

    >>> import torch, torch.nn as nn
    >>> class Keeps(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.last = nn.Conv2d(3, 4, 3), []
    ...     def forward(self, x):
    ...         self.last = [self.conv(x) * 2]        # part of the autograd graph
    ...         return self.last[0]
    >>> model = Keeps()
    >>> _ = model(torch.randn(1, 3, 8, 8))
    >>> copy_model(model).last[0].grad_fn is None
    True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ExpandFXWarning

__all__ = ["as_module", "copy_model", "parameter_free_copy", "require_module"]


def require_module(model: Any, who: str) -> None:
    """A ConfigError unless ``model`` is an ``nn.Module`` (a string, a class, a state_dict)."""
    if isinstance(model, nn.Module):
        return
    text = f"with {len(model)} entries" if isinstance(model, dict) else repr(model)
    hint = (" (a class: call it to build the model)" if isinstance(model, type) else
            " (a state_dict: load it into the model first)" if isinstance(model, dict) else "")
    raise ConfigError(f"{who}: the model must be an nn.Module, got {type(model).__name__} "
                      f"{text if len(text) <= 40 else text[:37] + '...'}{hint}. Pass the "
                      f"module itself.", code="not_a_module", where=who)


def as_module(model: Any, who: str) -> nn.Module:
    """The ``nn.Module`` a verb works on: a ``torch.compile``'d model's original module
    (with an :class:`~expandfx.errors.ExpandFXWarning`: the result is not compiled, its keys
    have no ``_orig_mod.``); a TorchScript module or a non-Module is refused with the fix."""
    require_module(model, who)
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(f"{who}: {type(model).__name__} is a TorchScript module "
                          f"(torch.jit.script / trace): its forward is TorchScript code, which "
                          f"expandfx cannot see or rewrite, so {who} would do nothing. Pass "
                          f"the Python nn.Module it was made from, and script the result.",
                          code="torchscript", where=who)
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        warnings.warn(f"{who}: the model is torch.compile'd; {who} works on its original "
                      f"module (model._orig_mod) and returns an uncompiled one, whose "
                      f"state_dict keys have no '_orig_mod.' prefix. Compile the result again "
                      f"if you want it compiled: torch.compile(result).", ExpandFXWarning,
                      stacklevel=3)
        return as_module(inner, who)
    return model


def copy_model(model: nn.Module, who: str = "expand") -> nn.Module:
    """A deep copy of ``model``; non-leaf tensors are copied detached. A model sharded with
    FSDP2 is gathered into an unsharded copy (:func:`expandfx.sharding.gathered_copy`, a
    collective: every rank must call)."""
    from .sharding import gathered_copy, is_sharded

    require_module(model, who)
    if is_sharded(model):
        return gathered_copy(model, who)
    memo: dict[int, Any] = {}
    for _, value in _attributes(model):
        for tensor in _non_leaf(value):
            memo.setdefault(id(tensor), tensor.detach().clone())
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # deepcopy raises many types; name the attribute
        where = _culprit(model)
        raise ConfigError(
            f"{who}: cannot copy {type(model).__name__}"
            f"{f': attribute {where!r}' if where else ''} fails to deep-copy "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Pass "
            f"inplace=True to {who} the model itself, or delete that attribute first."
        ) from exc


def _attributes(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(path.attr, value)`` for every non-module attribute of every module."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name != "_modules":
                yield (f"{path}.{name}" if path else name), value


def _non_leaf(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            yield from _non_leaf(v, depth + 1)
    elif depth < 4 and isinstance(value, (list, tuple, set)):
        for v in value:
            yield from _non_leaf(v, depth + 1)


def _culprit(model: nn.Module) -> str | None:
    """The first attribute (``path.name``, parameters and buffers included) that fails."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name == "_modules":
                continue
            entries = value.items() if name in ("_parameters", "_buffers") else [(name, value)]
            for key, item in entries:
                try:
                    copy.deepcopy(item)
                except Exception:
                    return f"{path}.{key}" if path else key
    return None


def parameter_free_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` whose tensors live on the meta device (no memory)."""
    memo = {id(t): t.detach().to("meta") for t in layer.parameters(recurse=False)}
    template = copy.deepcopy(layer, memo)
    for name, param in layer.named_parameters(recurse=False):
        setattr(template, name, nn.Parameter(param.detach().to("meta"), param.requires_grad))
    return template
