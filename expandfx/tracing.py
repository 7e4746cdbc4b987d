"""The graph view of a model: how each conv/linear layer is used in ``forward``.

``torch.fx`` traces the model with every conv/linear (registered layer classes included,
and every ``torch.nn`` built-in, as FX does by default) as a leaf, and counts per layer its
call sites, any direct use of its parameters (``F.conv2d(x, self.conv.weight)``) and
whether its result is an output of the model. If FX cannot trace the model (``**kwargs``
in ``forward``, as in every Hugging Face model; data-dependent control flow) and
``example_inputs`` are given, the same facts are *recorded* from one real forward pass
(eval mode, ``no_grad``): module hooks count the calls of each layer, and a torch function
mode sees every op, so a layer weight passed to an op outside that layer's own call is a
direct use. Without example inputs the view says why FX failed and callers fall back to a
module walk. Tracing and recording never change the model (:mod:`expandfx.restoring`).

Example::

    >>> import torch, torch.nn as nn
    >>> view = graph_view(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> view.traced, view.call_sites[view.key(view.model[0])]
    (True, 1)
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import layer_types
from .block import ExpandedBlock
from .errors import ConfigError
from .restoring import preserved

__all__ = ["GraphView", "graph_view", "inputs_rejected", "positional", "record"]


_FUNCTIONAL = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose1d,
               F.conv_transpose2d, F.conv_transpose3d}
# Ops between a layer and the model's output that keep it "the output layer".
_PASS_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze,
                   torch.unsqueeze, F.dropout, torch.clone, torch.detach}
_PASS_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "float",
                 "to", "type_as", "clone", "detach"}
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Flatten)
# Tensor attributes whose reading is no use of the values (``self.fc.weight.dtype``).
_METADATA = {"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout",
             "is_leaf", "grad_fn", "is_sparse", "is_meta", "is_quantized", "names"}
_SIZE_METHODS = {"size", "dim", "numel", "is_floating_point", "element_size", "is_contiguous",
                 "__len__"}


class _LayerLeafTracer(fx.Tracer):
    """Default FX leaves plus every conv/linear (sub)class, registered layer and block."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (layer_types.is_layer(m) or isinstance(m, ExpandedBlock)
                or super().is_leaf_module(m, qualname))


@dataclass
class GraphView:
    """Per-layer facts from the traced graph or a recorded forward (keyed by identity)."""

    model: nn.Module
    traced: bool
    error: str | None = None
    call_sites: Counter[int] = field(default_factory=Counter)
    direct_uses: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    functional_calls: list[str] = field(default_factory=list)
    recorded: bool = False
    output_layers: set[int] = field(default_factory=set)
    # layer → the BatchNorm (running statistics) its result goes to, its only use (traced only)
    norm_after: dict[int, nn.Module] = field(default_factory=dict)
    # layer → the shape of its first input on example_inputs (when they were given)
    input_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def checked(self) -> bool:
        """Whether call sites and direct uses were seen (traced or recorded)."""
        return self.traced or self.recorded

    @staticmethod
    def key(module: nn.Module) -> int:
        return id(module)


def graph_view(model: nn.Module, example_inputs: Any = None) -> GraphView:
    """Trace ``model`` (or, failing that, record a forward on ``example_inputs``)."""
    try:
        with preserved(model):  # a forward that caches would keep FX proxies
            graph = _LayerLeafTracer().trace(model)
    except Exception as exc:  # FX raises many types; the message says what was lost
        error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        if example_inputs is None:
            return GraphView(model, traced=False, error=error)
        return record(model, example_inputs, error)
    view = GraphView(model, traced=True)
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            view.call_sites[id(module)] += 1
            bn = _sole_batchnorm_user(node, model)
            if bn is not None and (layer_types.is_layer(module)
                                   or isinstance(module, ExpandedBlock)):
                view.norm_after[id(module)] = bn
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if layer_types.is_layer(module):
                users = ", ".join(sorted(str(u.target.__name__ if callable(u.target)
                                               else u.target) for u in node.users))
                view.direct_uses[id(module)].append(f"'{attr}' read directly by {users}")
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            params = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
            view.functional_calls.append(
                f"{node.target.__name__} at node '{node.name}' on {params or 'computed tensors'}")
        elif node.op == "output":
            view.output_layers = _output_layers(node, model)
    return view


def _sole_batchnorm_user(node: fx.Node, model: nn.Module) -> nn.Module | None:
    """The BatchNorm module (tracking running statistics) that is ``node``'s only user, with
    ``node`` as its input; else ``None``."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) != 1 or user.kwargs:
        return None
    bn = model.get_submodule(user.target)
    tracked = isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
    return bn if tracked else None


def _output_layers(output: fx.Node, model: nn.Module) -> set[int]:
    """Linear layers whose result reaches ``output`` through shape/identity ops only."""
    found: set[int] = set()
    todo, seen = list(output.all_input_nodes), set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if layer_types.is_linear(module):
                found.add(id(module))
            elif isinstance(module, _PASS_MODULES) and source is not None:
                todo.append(source)
        elif source is not None and (
                (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
                or (node.op == "call_method" and node.target in _PASS_METHODS)):
            todo.append(source)
    return found


def positional(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors (the positional arguments of ``forward``)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    bad = [type(x).__name__ for x in inputs if not isinstance(x, torch.Tensor)]
    if bad:
        raise ConfigError(f"example_inputs must be a tensor or a tuple of tensors (the "
                          f"positional arguments of forward); got {bad}. Wrap keyword inputs "
                          f"in a small module or pass tensors.")
    return inputs


def inputs_rejected(model: nn.Module, inputs: tuple[torch.Tensor, ...], exc: BaseException
                    ) -> ConfigError:
    """The error for ``example_inputs`` the model's forward does not accept (cause, fix)."""
    shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                       for x in inputs)
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"{type(model).__name__} (eval mode) fails on example_inputs [{shapes}] "
                       f"({type(exc).__name__}: {cause}). Pass example_inputs of the shape and "
                       f"dtype its forward expects (the positional arguments of one call).",
                       code="bad_example_inputs", where="example_inputs")


class _WeightReads(TorchFunctionMode):
    """Notes every op that takes a layer's weight or bias while that layer is not running."""

    def __init__(self, owners: dict[int, tuple[int, str]], active: Counter[int],
                 view: GraphView) -> None:
        super().__init__()
        self.owners, self.active, self.view = owners, active, view

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not _reads_metadata_only(func):
            for t in tree_leaves((args, kwargs)):
                owner = self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None
                if owner is not None and not self.active[owner[0]]:
                    note = f"'{owner[1]}' read directly by {_func_name(func)}"
                    if note not in self.view.direct_uses[owner[0]]:
                        self.view.direct_uses[owner[0]].append(note)
            if func in _FUNCTIONAL and not any(self.active.values()):
                self.view.functional_calls.append(f"{func.__name__} outside any layer call")
        return func(*args, **kwargs)


def record(model: nn.Module, example_inputs: Any, error: str | None = None) -> GraphView:
    """The graph view from one recorded forward pass (see the module doc)."""
    inputs = positional(example_inputs)
    view = GraphView(model, traced=False, error=error, recorded=True)
    layers = {id(m): m for m in model.modules()
              if layer_types.is_layer(m) or isinstance(m, ExpandedBlock)}
    owners = {id(p): (key, name) for key, m in layers.items()
              for name, p in m._parameters.items() if name in ("weight", "bias") and p is not None}
    active: Counter[int] = Counter()
    results: dict[int, list[torch.Tensor]] = defaultdict(list)

    def enter(module: nn.Module, args: tuple) -> None:
        active[id(module)] += 1
        view.call_sites[id(module)] += 1

    def leave(module: nn.Module, args: tuple, out: Any) -> None:
        active[id(module)] -= 1
        if layer_types.is_linear(module) and isinstance(out, torch.Tensor):
            results[id(module)].append(out)

    handles = [h for m in layers.values() for h in (m.register_forward_pre_hook(enter),
                                                     m.register_forward_hook(leave))]
    try:
        with preserved(model), torch.no_grad(), _WeightReads(owners, active, view):
            model.eval()
            out = model(*inputs)
    except Exception as exc:  # the user's forward may raise anything
        raise inputs_rejected(model, inputs, exc) from exc
    finally:
        for h in handles:
            h.remove()
    leaves = _output_tensors(out)
    view.output_layers = {key for key, outs in results.items()
                          if any(_same_data(o, t) for o in outs for t in leaves)}
    return view


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # also transformers' ModelOutput
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` is ``a`` or a view of it (reshape, slice, dropout in eval)."""
    if a is b:
        return True
    ptr = a.untyped_storage().data_ptr()
    return ptr != 0 and a.device == b.device and ptr == b.untyped_storage().data_ptr()


def _reads_metadata_only(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA
    return name in _SIZE_METHODS


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return f"Tensor.{getattr(func.__self__, '__name__', '?')}"
    return name
