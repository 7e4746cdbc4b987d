"""The FX view of a model: how each conv/linear layer is used in ``forward``.

``torch.fx`` traces the model with every conv/linear (and every ``torch.nn``
built-in, as FX does by default) as a leaf, and counts per layer its call sites
and any direct use of its parameters (``F.conv2d(x, self.conv.weight)``). If the
model cannot be traced (data-dependent control flow, …) the view says why and
callers fall back to a module walk.

Example::

    >>> import torch.nn as nn
    >>> view = inspect(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> view.traced, view.call_sites[view.key(view.model[0])]
    (True, 1)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from .block import LAYER_TYPES, ExpandedBlock
from .snapshot import preserved

_FUNCTIONAL = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose1d,
               F.conv_transpose2d, F.conv_transpose3d}


class _LayerLeafTracer(fx.Tracer):
    """Default FX leaves plus every conv/linear subclass and expanded block (not traced into)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*LAYER_TYPES, ExpandedBlock)) or super().is_leaf_module(m, qualname)


@dataclass
class GraphView:
    """Per-layer facts from the traced graph (keyed by module identity)."""

    model: nn.Module
    traced: bool
    error: str | None = None
    call_sites: Counter[int] = field(default_factory=Counter)
    direct_uses: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    functional_calls: list[str] = field(default_factory=list)

    @staticmethod
    def key(module: nn.Module) -> int:
        return id(module)


def inspect(model: nn.Module) -> GraphView:
    """Trace ``model`` and collect call sites, direct parameter uses and functional calls."""
    try:
        with preserved(model):  # a forward that caches would keep FX proxies
            graph = _LayerLeafTracer().trace(model)
    except Exception as exc:  # FX raises many types; the message says what was lost
        return GraphView(model, traced=False, error=f"{type(exc).__name__}: {exc}".strip())
    view = GraphView(model, traced=True)
    for node in graph.nodes:
        if node.op == "call_module":
            view.call_sites[id(model.get_submodule(node.target))] += 1
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if isinstance(module, LAYER_TYPES):
                users = ", ".join(sorted(str(u.target.__name__ if callable(u.target)
                                               else u.target) for u in node.users))
                view.direct_uses[id(module)].append(f"'{attr}' read directly by {users}")
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            params = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
            view.functional_calls.append(
                f"{node.target.__name__} at node '{node.name}' on {params or 'computed tensors'}")
    return view
