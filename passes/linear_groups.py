"""The linear subgraphs of a traced model: what :func:`expandfx.passes.fold.fold` folds.

A *leaf* is a call of a conv/linear layer or an eval-mode BatchNorm that computes exactly the
plain torch op — checked on the example run for subclasses and registered classes. An *add*
sums two values of one shape. Walking the graph in order, a leaf absorbs the linear expression
that produced its input when that value has no other user, and an add absorbs its operands
when they all read one input (an operand that is that input is an ``Identity`` branch) — as
long as :func:`expandfx.linear.fold` accepts the tree; a :class:`~expandfx.errors.FoldError`
keeps the pieces apart and its reason. The groups are the maximal expressions.

Example::

    >>> import torch, torch.nn as nn, torch.fx as fx
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> gm = fx.GraphModule(model, LeafTracer().trace(model))
    >>> found = analyse(gm, (torch.randn(1, 3, 8, 8),))
    >>> [render(g.tree) for g in found.groups]
    ['0 → 1']
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from expandfx import registry
from expandfx.block import CONV_TYPES, torch_layer_type
from expandfx.errors import ConfigError, FoldError
from expandfx.linear import Affine, Identity, Par, Seq, batchnorm, fold
from expandfx.linear.ir import Node, leaves, map_leaves

__all__ = ["Analysis", "Group", "LeafTracer", "analyse", "describe", "leaf_count", "render"]

Tensor = torch.Tensor
_EXACT = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
          nn.BatchNorm3d}
_DROPOUTS = {nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout}
_ADDS = {operator.add, torch.add, torch.Tensor.add}
PLAIN_RTOL = 1e-6  # a subclass must compute the plain op this closely on its example input


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's own FX leaves and wrapped functions, when timm is loaded (never imported)."""
    found = sys.modules.get("timm.layers._fx")
    if found is None:
        return (), ()
    return tuple(found.get_notrace_modules()), tuple(found.get_notrace_functions())


class LeafTracer(fx.Tracer):
    """FX's default leaves, every conv/linear layer (subclasses and registered classes too),
    every BatchNorm, and timm's own untraceable modules and functions when timm is loaded."""

    def __init__(self) -> None:
        self._timm_leaves, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (registry.is_layer(m) or isinstance(m, (_BatchNorm, *self._timm_leaves))
                or super().is_leaf_module(m, qualname))


@dataclass
class Group:
    """One linear expression: ``tree`` (leaves are graph nodes, or ``Identity`` for
    ``source`` itself) reads ``source``; ``root`` gives its value; ``members`` are the nodes
    it replaces; ``folded`` is its single map, in float64 (``Identity`` for ``source``)."""

    root: fx.Node
    source: fx.Node
    tree: Node
    members: list[fx.Node]
    folded: Affine | Identity


@dataclass
class Analysis:
    """What :func:`analyse` found: the maximal ``groups``, the plain torch layer behind each
    leaf node, why a node was not folded with its neighbours (``why``), and the traced
    graph's output on the example run."""

    groups: list[Group]
    layers: dict[fx.Node, nn.Module]
    why: dict[fx.Node, str] = field(default_factory=dict)
    output: Any = None

    def is_layer(self, node: fx.Node) -> bool:
        """A conv/linear leaf (not a BatchNorm)."""
        return node in self.layers and not isinstance(self.layers[node], _BatchNorm)


def analyse(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Analysis:
    """Run ``gm`` on ``inputs`` (``no_grad``) to check leaves and record shapes, drop the
    no-op nodes, and group the linear subgraphs. Edits ``gm.graph`` (no-ops removed only)."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        output = recorder.run(*inputs)
    _drop_no_ops(gm, recorder.shapes)
    found = Analysis([], recorder.layers, dict(recorder.why), output)
    best = _grow(gm.graph, found, recorder.shapes)
    claimed: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        group = best.get(node)
        if group is not None and node not in claimed:
            claimed.update(group.members)
            found.groups.append(group)
    found.groups.reverse()
    return found


def render(tree: Node, name: Callable[[Any], str] | None = None) -> str:
    """A tree as a formula: ``→`` for a chain, ``+`` for a sum, ``x`` for the input."""
    name = name or (lambda n: str(n.target))
    if isinstance(tree, Identity):
        return "x"
    if isinstance(tree, (Seq, Par)):
        inner = [render(p, name) for p in tree.parts]
        nested = [f"({s})" if isinstance(p, (Seq, Par)) else s
                  for p, s in zip(tree.parts, inner, strict=True)]
        return (" → " if isinstance(tree, Seq) else " + ").join(nested)
    return name(tree)


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """A node for a message: ``'stem.act' (ReLU)``, ``'add_3' (add)``, ``the input 'x'``."""
    if node.op == "placeholder":
        return f"the input '{node.target}'"
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
    return f"'{node.name}' ({what})"


class _Recorder(fx.Interpreter):
    """Records output shapes and checks each conv/linear/BatchNorm call against the plain op."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[torch.Size, torch.dtype]] = {}
        self.layers: dict[fx.Node, nn.Module] = {}
        self.why: dict[fx.Node, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        plain, check = None, None
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            plain, reason = _plain_layer(module, n.target)
            if plain is not None:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                plain, check = _reference(module, plain, n.target, args, kwargs)
            if plain is None and (reason or check):
                self.why[n] = reason or check
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n] = (out.shape, out.dtype)
        if plain is not None:
            problem = check(out) if callable(check) else None
            if problem:
                self.why[n] = problem
            else:
                self.layers[n] = plain
        return out


def _plain_layer(module: nn.Module, path: str) -> tuple[nn.Module | None, str | None]:
    """The torch layer (or BatchNorm) a module stands for, or why it cannot be one."""
    if isinstance(module, _BatchNorm):
        if module.training:
            return None, (f"'{path}' is a BatchNorm in training mode: it normalises with batch "
                          f"statistics, which is not a linear map; call model.eval() to fold "
                          f"it")
        if module.running_mean is None or module.running_var is None:
            return None, (f"'{path}' keeps no running statistics (track_running_stats=False),"
                          f" so it normalises with batch statistics even in eval mode; it "
                          f"cannot be folded")
        plain = module
    elif registry.is_layer(module):
        try:
            plain = registry.as_torch(module, path=path)
        except ConfigError as exc:
            return None, str(exc)
    else:
        return None, None
    if module._forward_hooks or module._forward_pre_hooks:
        return None, (f"'{path}' has forward hooks, which a folded layer would drop; remove "
                      f"them to fold it")
    return plain, None


def _reference(module: nn.Module, plain: nn.Module, path: str, args: tuple, kwargs: dict
               ) -> tuple[nn.Module | None, Any]:
    """(plain, a check of the module's output) — or (None, why) when the call does not fit."""
    x = args[0] if len(args) == 1 and not kwargs else None
    kind = type(module).__name__
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None, (f"'{path}' ({kind}) is not called on one floating-point tensor; only "
                      f"such calls fold")
    bad_rank = (x.dim() < 2 or x.shape[1] != plain.num_features
                if isinstance(plain, _BatchNorm) else
                x.dim() != len(plain.kernel_size) + 2 if isinstance(plain, CONV_TYPES) else
                x.dim() < 1)
    if bad_rank:
        return None, (f"'{path}' ({kind}) gets an input of shape {tuple(x.shape)}, which is "
                      f"not a batch its folded form would see alike (e.g. an unbatched "
                      f"convolution); it is kept")
    if type(module) in _EXACT and plain is module:
        return plain, None
    try:
        with torch.no_grad():
            want = _plain_call(plain, x)
    except Exception as exc:  # e.g. a lazy layer not yet materialised, a wrong layout
        return None, (f"'{path}' ({kind}): the plain op on its parameters fails "
                      f"({type(exc).__name__}); it is kept as an opaque module")

    def check(out: Any) -> str | None:
        if isinstance(out, Tensor) and out.shape == want.shape:
            diff = (out.double() - want.double()).abs().max().item()
            scale = want.abs().max().item()
            if diff <= PLAIN_RTOL * scale:
                return None
            detail = f"max relative difference {diff / max(scale, 1e-30):.1e}"
        else:
            detail = "a different output"
        return (f"'{path}' ({kind}) does not compute plain {_op_name(plain)} with its "
                f"parameters on the example input ({detail}); it is kept as an opaque module")

    return plain, check


def _plain_call(layer: nn.Module, x: Tensor) -> Tensor:
    if isinstance(layer, _BatchNorm):
        return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                            False, 0.0, layer.eps)
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    return torch_layer_type(layer)._conv_forward(layer, x, layer.weight, layer.bias)


def _op_name(layer: nn.Module) -> str:
    if isinstance(layer, _BatchNorm):
        return "F.batch_norm (eval)"
    return "F.linear" if isinstance(layer, nn.Linear) else f"F.conv{len(layer.kernel_size)}d"


def _drop_no_ops(gm: fx.GraphModule, shapes: dict) -> None:
    """Remove ``nn.Identity``, eval-mode dropout and ``x + 0`` nodes (``x`` a float tensor)."""
    for node in list(gm.graph.nodes):
        same = None
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            module = gm.get_submodule(node.target)
            if type(module) is nn.Identity or (type(module) in _DROPOUTS
                                               and not module.training):
                same = node.args[0]
        elif _add_target(node) and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            x = b if _is_zero(a) else a if _is_zero(b) else None
            if isinstance(x, fx.Node) and x in shapes and shapes[x][1].is_floating_point:
                same = x
        if isinstance(same, fx.Node):
            node.replace_all_uses_with(same)
            gm.graph.erase_node(node)


def _add_target(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target == "add"))


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _is_sum(node: fx.Node, shapes: dict) -> bool:
    """``a + b`` of two graph values of one shape and dtype (no broadcasting, no alpha)."""
    if not _add_target(node) or len(node.args) != 2 or node.kwargs:
        return False
    found = {shapes.get(a) for a in node.args if isinstance(a, fx.Node)}
    return (all(isinstance(a, fx.Node) for a in node.args) and len(found) == 1
            and None not in found and found == {shapes.get(node)})


def _grow(graph: fx.Graph, found: Analysis, shapes: dict) -> dict[fx.Node, Group]:
    """The largest foldable expression ending at each leaf or sum, in graph order."""
    best: dict[fx.Node, Group] = {}
    affines: dict[fx.Node, Affine] = {}

    def affine(n: fx.Node) -> Affine:
        if n not in affines:
            layer = found.layers[n]
            affines[n] = (batchnorm(layer, len(shapes[n][0]) - 2)
                          if isinstance(layer, _BatchNorm) else Affine.of(layer))
        return affines[n]

    def attempt(kind: type, parts: list[Node]) -> Affine | str:
        """Fold ``kind(parts)``; parts are already-folded maps, leaves or ``Identity``."""
        try:
            return fold(kind(tuple(map_leaves(p, _as_affine(affine)) for p in parts)),
                        torch.float64)
        except FoldError as exc:
            return str(exc)

    def below(value: Any, user: fx.Node) -> Group | None:
        """The expression that made ``value``, if ``user`` is its only use."""
        ok = (isinstance(value, fx.Node) and value in best and len(value.users) == 1
              and _count(user.args, value) == 1)
        return best[value] if ok else None

    for node in graph.nodes:
        if node in found.layers:
            src = node.args[0]
            inner = below(src, node)
            if inner is not None:
                folded = _rank_mismatch(inner.folded, affine(node), shapes[src][0]) or \
                    attempt(Seq, [inner.folded, node])
                if isinstance(folded, Affine):
                    best[node] = Group(node, inner.source, _join(Seq, inner.tree, node),
                                       [*inner.members, node], folded)
                    continue
                found.why.setdefault(node, f"not folded with what computes its input "
                                           f"({render(inner.tree)}): {folded}")
            best[node] = Group(node, src, node, [node], affine(node).to(torch.float64))
        elif _is_sum(node, shapes):
            parts = [below(a, node) or Group(a, a, Identity(), [], Identity()) for a in node.args]
            sources = {p.source for p in parts}
            if len(sources) == 1 and any(p.members for p in parts):
                tree = _join(Par, *(p.tree for p in parts))
                folded = attempt(Par, [p.folded for p in parts])
                if isinstance(folded, Affine):
                    members = [m for p in parts for m in p.members]
                    best[node] = Group(node, sources.pop(), tree, [*members, node], folded)
                else:
                    found.why[node] = f"the sum {render(tree)} is not one layer: {folded}"
    return best


def _rank_mismatch(first: Affine, then: Affine, shape: torch.Size) -> str | None:
    """Why a Linear and a BatchNorm/conv cannot chain on a tensor of this rank, if so."""
    if (first.geometry.dims == 0) == (then.geometry.dims == 0):
        return None
    return (f"a Linear maps the last dim and a BatchNorm or conv dim 1; they fold together "
            f"only on a rank-2 [N, C] tensor, this one has shape {tuple(shape)}")


def _as_affine(affine: Callable[[fx.Node], Affine]) -> Callable[[Any], Affine]:
    return lambda leaf: leaf if isinstance(leaf, Affine) else affine(leaf)


def _join(kind: type, *parts: Node) -> Node:
    """``Seq``/``Par`` of ``parts``, flattening nested nodes of the same kind."""
    flat: list[Node] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, kind) else (p,))
    return kind(tuple(flat))


def _count(args: Any, value: fx.Node) -> int:
    return sum(1 for a in _flat(args) if a is value)


def _flat(args: Any) -> list[Any]:
    if isinstance(args, (tuple, list)):
        return [x for a in args for x in _flat(a)]
    if isinstance(args, dict):
        return [x for a in args.values() for x in _flat(a)]
    return [args]


def leaf_count(tree: Node) -> int:
    """Leaves of a tree, ``Identity`` branches included."""
    return sum(1 for _ in leaves(tree))
