"""Contract: fold every :class:`~expandfx.block.ExpandedBlock` back into its original layer.

Requires: a model whose expanded blocks are unedited linear topologies (no hooks, no
+Init nonlinearity). Ensures: a model of the same class (a copy unless ``inplace=True``)
with companded weights baked and every block replaced by its original layer class, weights
folded in float64 — the same function to ``docs/design.md §4``, the original
``state_dict`` keys. Recipe: find the blocks (at every path a shared block is registered under),
check each is still an unedited linear topology, fold its factors in float64
(``expandfx.linear.fold``), rebuild the original layer class with its exact
hyperparameters, swap it in. The result has the original ``state_dict`` keys. A bias-free
layer trained with per-branch BatchNorms (``norm="bn"``) has a shift and no bias: it moves
into the running mean of the BatchNorm that is the layer's only use
(:func:`~expandfx.planning.legality.norm_for_shift`).

Example::

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_3x3
    >>> model = smallnet_3x3()
    >>> small = contract(efx.expand(model, r=2))
    >>> list(small.state_dict()) == list(model.state_dict())
    True
"""

from __future__ import annotations

import warnings

from torch import nn

from expandfx import hub
from expandfx.compander import bake, companded
from expandfx.copying import as_module, copy_model
from expandfx.errors import ConfigError, ContractionError
from expandfx.finite import check_named
from expandfx.planning.legality import norm_for_shift
from expandfx.sharding import is_sharded
from expandfx.surgery import blocks, replace
from expandfx.tracing import graph_view

__all__ = ["contract", "deployable"]


def contract(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Bake companded weights, then fold every expanded block; a copy unless ``inplace=True``.

    A model sharded with FSDP2 (``fully_shard``, :func:`expandfx.shard`): call it on every
    rank. The full parameters are gathered collectively
    (``torch.distributed.checkpoint.state_dict``) into an unsharded copy, which is
    contracted; **every rank** gets the same compact model and the sharded model is left as
    it was. ``inplace=True`` is refused for a sharded model. NaN or inf in a block's
    parameters or buffers, or in any buffer of the model, raises
    :class:`~expandfx.errors.NonFiniteError` naming it.
    """
    model = as_module(model, "contract")
    if inplace and is_sharded(model):
        raise ConfigError(
            f"contract: the {type(model).__name__} is sharded with FSDP (fully_shard), so it "
            f"cannot be contracted in place. Call efx.contract(model) without inplace=True on "
            f"every rank: it gathers the full parameters and returns the compact model.")
    target = model if inplace else copy_model(model, "contract")
    baked = len(companded(target))
    bake(target, inplace=True)  # Ψ(v) → plain weights first, everywhere
    found = blocks(target)
    if not found:
        what = f"baked its {baked} companded weights" if baked else "changed nothing"
        warnings.warn(f"contract: {type(model).__name__} has no expanded blocks; {what} and "
                      f"returned {'it' if inplace else 'an equivalent copy'}.", stacklevel=2)
        return target
    # a NaN/inf factor (or BatchNorm statistic) would fold silently into a NaN compact weight
    check_named(target.named_buffers(), "contract", "buffer")
    view = graph_view(target) if any(b.shift_to_next_norm for b, _ in found.values()) else None
    for block, paths in found.values():
        if len(paths) == 1 and paths[0] == "":
            return block.contract("<root>")
        shift_into = None
        if view is not None and block.shift_to_next_norm:
            shift_into = norm_for_shift(view, block, paths[0])
            if isinstance(shift_into, str):
                raise ContractionError(f"contract: block '{paths[0]}' ({block.rule}, "
                                       f"norm='bn') on a bias-free layer: {shift_into}.")
        replace(target, paths, block.contract(paths[0], shift_into=shift_into))
    hub.unguard(target)
    return target


def deployable(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with Ψ baked and every expanded block contracted, and what was
    done (lines for a log or report)."""
    n_blocks, n_comp = len(blocks(model)), len(companded(model))
    done = []
    if n_blocks:
        out = contract(model)  # copies, bakes, folds
        done.append(f"contracted {n_blocks} expanded block(s) into their original layers")
    else:
        out = bake(model) if n_comp else copy_model(model, "deployable")
    if n_comp:
        done.append(f"baked {n_comp} companded weight(s)")
    return out, done
