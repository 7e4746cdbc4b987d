"""Sharded training (FSDP2) of expanded models, and getting the compact model back.

Expanded models hold 4–36× the compact parameters, so they outgrow one device sooner.
:func:`shard` applies PyTorch's ``fully_shard`` (FSDP2) **per expanded block**, then to the
root. Why per block, never finer and rarely coarser:

- a block is the unit that needs all of its factors at once: ``collapsed`` mode composes
  every factor's weight into one kernel inside the block's forward without calling the
  factors' own forwards, so FSDP's all-gather hooks must sit on the block (hooks on a
  factor would never fire and its weight would stay a shard);
- a block is where the expansion's extra parameters live (the rest of the network is the
  compact one), so one all-gather per block brings in exactly one layer's factors and frees
  them after its backward — the peak holds one block's full factors, not a stage's;
- the root ``fully_shard`` covers what is left (norms, the compact layers) in one group.

Sharding per stage (``fully_shard`` on a ``layer1``-like module holding several blocks)
is also correct — the blocks' factors are gathered with the stage — and can be chosen with
``shard(model, modules=[...])`` when per-block collectives are too small to be efficient.

Leaving training: :func:`expandfx.contract` and :func:`expandfx.export_onnx` accept a
sharded model. They gather the full parameters collectively through
``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True)`` —
**every rank must call them** — into an unsharded copy (:func:`gathered_copy`); the model
being trained is not changed. ``contract`` returns the compact model on every rank;
``export_onnx`` writes and verifies the file on rank 0 only and returns its report there
(``None`` on the other ranks, which wait for rank 0).

Example (on every rank of an initialized process group)::

    big = efx.expand(model, "CL+FC", r=4)
    efx.shard(big)                                  # fully_shard per block, then the root
    train(big)
    small = efx.contract(big)                       # every rank: the compact model
    efx.export_onnx(big, (x,), "small.onnx")        # every rank calls; rank 0 writes
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["gathered_copy", "is_sharded", "shard"]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or any of its submodules."""
    fsdp = _fsdp_module_type()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return True
    return any(_is_dtensor(p) for p in model.parameters())


def shard(model: nn.Module, modules: Iterable[nn.Module] | None = None,
          **fully_shard_kwargs: Any) -> nn.Module:
    """In place, like ``torch.distributed.fsdp.fully_shard``: shards every expanded block of
    ``model`` (or each of ``modules``), then ``model`` itself, and returns ``model`` (a copy
    would hold the full model twice, which sharding exists to avoid). ``fully_shard_kwargs``
    (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to every call. Needs an
    initialized process group."""
    from torch.distributed.fsdp import fully_shard

    from .block import ExpandedBlock

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ConfigError("shard: no process group; call torch.distributed.init_process_group "
                          "(e.g. under torchrun) on every rank before sharding.")
    units = list(modules) if modules is not None else [
        m for m in model.modules() if isinstance(m, ExpandedBlock)]
    for unit in units:
        if unit is not model:
            fully_shard(unit, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def gathered_copy(model: nn.Module, who: str = "contract") -> nn.Module:
    """An unsharded copy of a sharded ``model`` with its full parameters, on every rank.

    A collective: every rank of the model's process group must call it. The copy has the
    modules' own classes (not ``FSDP<Class>``), no FSDP hooks or state, and plain
    parameters on the device the shards live on; ``model`` is not changed.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    try:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    except Exception as exc:  # the collective's errors come in many types
        raise ConfigError(
            f"{who}: could not gather the full parameters of the sharded "
            f"{_plain_type(model).__name__} ({type(exc).__name__}: {exc}). Call {who} on "
            f"every rank of the process group, while it is still initialized.") from exc
    fsdp = _fsdp_module_type()
    memo: dict[int, Any] = {}

    def plain(module: nn.Module, prefix: str) -> nn.Module:
        cls = _plain_type(module)
        sharded = fsdp is not None and isinstance(module, fsdp)
        out = cls.__new__(cls)
        state = {}
        for key, value in vars(module).items():
            if key.startswith("__composable_api"):  # FSDP's state and registry
                continue
            if key == "_modules":
                state[key] = {name: None if child is None else plain(child, f"{prefix}{name}.")
                              for name, child in value.items()}
            elif key == "_parameters":
                state[key] = {name: None if p is None else _full_parameter(
                    full, f"{prefix}{name}", p) for name, p in value.items()}
            elif key == "_buffers":
                state[key] = {name: None if b is None else b.detach().clone()
                              for name, b in value.items()}
            elif sharded and key in _HOOK_DICTS:
                state[key] = OrderedDict()  # FSDP's own hooks stay on the sharded model
            else:
                state[key] = copy.deepcopy(value, memo)
        out.__dict__.update(state)
        return out

    return plain(model, "")


def _plain_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class: ``fully_shard`` swaps in a subclass ``FSDP<Class>``."""
    fsdp = _fsdp_module_type()
    cls = type(module)
    if fsdp is None or not isinstance(module, fsdp):
        return cls
    return next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp))


def _full_parameter(full: dict[str, Any], key: str, shard: nn.Parameter) -> nn.Parameter:
    if key not in full:
        raise ConfigError(f"gathered_copy: the gathered state dict has no '{key}'; the sharded "
                          f"model's parameter names changed. Please report this as a bug.")
    value = full[key]
    if _is_dtensor(value):
        value = value.full_tensor()
    return nn.Parameter(value.detach().clone(), requires_grad=shard.requires_grad)
