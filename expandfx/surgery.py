"""Module-tree surgery shared by the passes: find expanded blocks, swap modules in.

The model keeps its class: modules are replaced in place of their attributes (at every
path a shared module is registered under), so user methods keep working.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> replace(model, ["0"], nn.Identity())
    >>> type(model[0]).__name__
    'Identity'
"""

from __future__ import annotations

from torch import nn

from .block import ExpandedBlock

__all__ = ["blocks", "replace"]


def replace(root: nn.Module, paths: list[str], new: nn.Module) -> None:
    """Register ``new`` at each dotted module path of ``root``."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, name, new)


def blocks(model: nn.Module) -> dict[int, tuple[ExpandedBlock, list[str]]]:
    """Every expanded block of ``model`` with all the paths it is registered at."""
    found: dict[int, tuple[ExpandedBlock, list[str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ExpandedBlock):
            found.setdefault(id(module), (module, []))[1].append(path)
    return found
