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

import inspect
import math
import operator
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from expandfx import layer_types
from expandfx.block import CONV_TYPES, torch_layer_type
from expandfx.errors import ConfigError, FoldError
from expandfx.formatting import human
from expandfx.linear import Affine, Geometry, Identity, Par, Seq, batchnorm, fold
from expandfx.linear.ir import Node, leaves, map_leaves

__all__ = ["TRANSPOSED", "Analysis", "Group", "LeafTracer", "analyse", "describe", "leaf_count",
           "render"]

Tensor = torch.Tensor
Cost = tuple[int, int]  # (parameters, MACs at the example input's shapes)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EXACT = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
          nn.BatchNorm3d, *TRANSPOSED}
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
        return (layer_types.is_layer(m) or isinstance(m, (_BatchNorm, *self._timm_leaves))
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
    cost: Cost = (0, 0)  # (parameters, MACs) of the group as it would be deployed


@dataclass
class Analysis:
    """What :func:`analyse` found: the maximal ``groups``, the plain torch layer behind each
    leaf node, why a node was not folded with its neighbours (``why``), and the traced
    graph's output on the example run."""

    groups: list[Group]
    layers: dict[fx.Node, nn.Module]
    why: dict[fx.Node, str] = field(default_factory=dict)
    output: Any = None
    # x * gamma, x / c, -x: (x, the map, the parameters it holds), and constant nodes
    scales: dict[fx.Node, tuple[fx.Node, Affine, int]] = field(default_factory=dict)
    consts: set[fx.Node] = field(default_factory=set)

    def is_layer(self, node: fx.Node) -> bool:
        """A conv/linear leaf (not a BatchNorm)."""
        return node in self.layers and not isinstance(self.layers[node], _BatchNorm)


def analyse(gm: fx.GraphModule, inputs: tuple[Any, ...], allow_larger: bool = False
            ) -> Analysis:
    """Run ``gm`` on ``inputs`` (``no_grad``) to check leaves and record shapes, drop the
    no-op nodes, and group the linear subgraphs — merged only where that costs no more
    parameters and MACs than the parts, unless ``allow_larger``. Edits ``gm.graph``
    (no-ops removed only)."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        output = recorder.run(*inputs)
    _drop_no_ops(gm, recorder.shapes)
    found = Analysis([], recorder.layers, dict(recorder.why), output,
                     consts=set(recorder.consts))
    for node in gm.graph.nodes:
        scale = _scale(node, recorder.consts, recorder.shapes)
        if scale is not None:
            found.scales[node] = scale
    best = _grow(gm.graph, found, recorder.shapes, allow_larger)
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
        self.consts: dict[fx.Node, Any] = {}  # values that depend on no input: a gamma

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
        inputs = [a for a in _flat((n.args, n.kwargs)) if isinstance(a, fx.Node)]
        if n.op == "get_attr" or (n.op in ("call_function", "call_method") and inputs
                                  and all(a in self.consts for a in inputs)):
            self.consts[n] = out
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
    elif type(module) in TRANSPOSED:  # exactly torch's: subclasses may compute otherwise
        plain = module
    elif layer_types.is_transposed(module):  # a subclass: kept as an opaque module
        return None, None
    elif layer_types.is_layer(module):
        try:
            plain = layer_types.as_torch(module, path=path)
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
                x.dim() != len(plain.kernel_size) + 2 if isinstance(plain, (*CONV_TYPES,
                                                                            *TRANSPOSED)) else
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
            x = a if _is_zero(b) else b if _is_zero(a) and not _is_sub(node) else None
            if isinstance(x, fx.Node) and x in shapes and shapes[x][1].is_floating_point:
                same = x
        if isinstance(same, fx.Node):
            node.replace_all_uses_with(same)
            gm.graph.erase_node(node)


def _add_target(node: fx.Node) -> bool:
    return _of(node, _ADDS, "add") or _of(node, _SUBS, "sub")


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _is_sum(node: fx.Node, shapes: dict) -> bool:
    """``a + b`` of two graph values of one shape and dtype (no broadcasting, no alpha)."""
    if not _add_target(node) or len(node.args) != 2 or node.kwargs:
        return False
    found = {shapes.get(a) for a in node.args if isinstance(a, fx.Node)}
    return (all(isinstance(a, fx.Node) for a in node.args) and len(found) == 1
            and None not in found and found == {shapes.get(node)})


def _grow(graph: fx.Graph, found: Analysis, shapes: dict, allow_larger: bool
          ) -> dict[fx.Node, Group]:
    """The largest foldable expression ending at each leaf or sum, in graph order, merged
    only where the merged layer costs no more than its parts (unless ``allow_larger``)."""
    best: dict[fx.Node, Group] = {}
    affines: dict[fx.Node, Affine] = {}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    def affine(n: fx.Node) -> Affine:
        if n in found.scales:
            return found.scales[n][1]
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

    def leaf_cost(n: fx.Node) -> Cost:
        """A leaf's own cost; a module called from several places keeps its parameters
        whatever this call folds into, so they count for nothing here."""
        out = math.prod(shapes[n][0])
        if n in found.scales:
            return found.scales[n][2], out
        layer = found.layers[n]
        params = sum(p.numel() for p in layer.parameters()) if calls[n.target] == 1 else 0
        if isinstance(layer, _BatchNorm):
            return params, out
        return params, affine_cost(affine(n), shapes[n][0], shapes[n.args[0]][0])[1]

    def cheap(merged: Affine | str, parts: list[Group], root: fx.Node) -> Affine | str:
        """``merged`` if it costs no more than ``parts`` kept apart, else why not."""
        if not isinstance(merged, Affine) or allow_larger:
            return merged
        cost = affine_cost(merged, shapes[root][0], shapes[parts[0].source][0])
        apart = tuple(sum(c) for c in zip(*(p.cost for p in parts), strict=True))
        if cost[0] <= apart[0] and cost[1] <= apart[1]:
            return merged
        return (f"merging would cost {human(cost[0])} parameters and {human(cost[1])} MACs "
                f"instead of {human(apart[0])} and {human(apart[1])}; kept as "
                f"{len(parts)} layers (fold(..., allow_larger=True) merges regardless)")

    for node in graph.nodes:
        if node in found.layers or node in found.scales:
            src = found.scales[node][0] if node in found.scales else node.args[0]
            alone = Group(node, src, node, [node], affine(node).to(torch.float64),
                          leaf_cost(node))
            inner = below(src, node)
            if inner is not None:
                folded = _rank_mismatch(inner.folded, affine(node), shapes[src][0]) or \
                    cheap(attempt(Seq, [inner.folded, node]), [inner, alone], node)
                if isinstance(folded, Affine):
                    best[node] = Group(node, inner.source, _join(Seq, inner.tree, node),
                                       [*inner.members, node], folded,
                                       affine_cost(folded, shapes[node][0],
                                                   shapes[inner.source][0]))
                    continue
                found.why.setdefault(node, f"not folded with what computes its input "
                                           f"({render(inner.tree)}): {folded}")
            best[node] = alone
        elif _is_sum(node, shapes):
            parts = [below(a, node) or Group(a, a, Identity(), [], Identity()) for a in node.args]
            sources = {p.source for p in parts}
            if len(sources) == 1 and any(p.members for p in parts):
                maps = [p.folded for p in parts]
                if _is_sub(node):  # a − b = a + (−1)·b
                    maps[1] = Seq((maps[1], _negation(maps, shapes[node][0])))
                    parts[1] = replace(parts[1], tree=_join(Seq, parts[1].tree, NEGATED))
                tree = _join(Par, *(p.tree for p in parts))
                folded = cheap(attempt(Par, maps), parts, node)
                if isinstance(folded, Affine):
                    members = [m for p in parts for m in p.members]
                    source = sources.pop()
                    best[node] = Group(node, source, tree, [*members, node], folded,
                                       affine_cost(folded, shapes[node][0], shapes[source][0]))
                else:
                    found.why[node] = f"the sum {render(tree)} is not one layer: {folded}"
    return best


def affine_cost(a: Affine, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> Cost:
    """(parameters, MACs) of one layer computing ``a`` from ``in_shape`` to ``out_shape``:
    output elements × weight fan-in, the convention of :mod:`expandfx.linear.costs` (a
    transposed conv: input elements × its fan-out, ``out/groups × kernel``)."""
    params = a.weight.numel() + (0 if a.bias is None else a.bias.numel())
    elements = in_shape if a.geometry.transposed else out_shape
    return params, math.prod(elements) * _fan_in(a)


def _fan_in(a: Affine) -> int:
    return a.weight[0].numel()


class _Negated:
    """The ``−1`` of a subtraction, as a leaf of a group's tree (it has no graph node)."""

    target = "(−1)"


NEGATED = _Negated()
_SUBS = {operator.sub, torch.sub, torch.Tensor.sub}
_MULS = {operator.mul, torch.mul, torch.Tensor.mul}
_DIVS = {operator.truediv, torch.div, torch.Tensor.div}
_NEGS = {operator.neg, torch.neg, torch.Tensor.neg}


def _is_sub(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _SUBS)
            or (node.op == "call_method" and node.target == "sub"))


def _of(node: fx.Node, functions: set, method: str) -> bool:
    return ((node.op == "call_function" and node.target in functions)
            or (node.op == "call_method" and node.target == method))


def _scale(node: fx.Node, consts: dict[fx.Node, Any], shapes: dict
           ) -> tuple[fx.Node, Affine, int] | None:
    """``x * c``, ``c * x``, ``x / c`` or ``-x`` with ``c`` a number or a constant tensor that
    scales per channel (dim 1, or the last dim), as (x, the map, the parameters it holds)."""
    if node not in shapes:
        return None
    if node.op == "call_function" and node.target is F.batch_norm:
        return _functional_batchnorm(node, consts, shapes)
    if node.kwargs:
        return None
    args = node.args
    if _of(node, _NEGS, "neg") and len(args) == 1:
        x, c, inverse = args[0], -1.0, False
    elif _of(node, _MULS, "mul") and len(args) == 2:
        x, c = (args[1], args[0]) if _constant(args[0], consts) else args
        inverse = False
    elif _of(node, _DIVS, "div") and len(args) == 2:
        x, c, inverse = args[0], args[1], True
    else:
        return None
    if not isinstance(x, fx.Node) or x in consts or x not in shapes or \
            not _constant(c, consts) or shapes[x] != shapes[node]:
        return None
    value = consts[c] if isinstance(c, fx.Node) else torch.tensor(float(c))
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return None
    value = value.detach().to(torch.float64)
    value = 1 / value if inverse else value
    shape = shapes[x][0]
    owned = sum(consts[a].numel() for a in _attrs(c) if len(a.users) == 1)
    if value.numel() == 1 and len(shape) >= 2:
        n = shape[-1] if len(shape) == 2 else shape[1]
        value = value.reshape(1).expand(n)
    elif len(shape) >= 3 and tuple(value.shape) in _per_channel(shape, 1):
        value = value.reshape(-1)
    elif len(shape) >= 2 and tuple(value.shape) in _per_channel(shape, len(shape) - 1):
        return x, Affine(torch.diag(value.reshape(-1)), None, Geometry.linear()), owned
    else:
        return None
    if len(shape) == 2:
        return x, Affine(torch.diag(value), None, Geometry.linear()), owned
    dims = len(shape) - 2
    return x, Affine(value.reshape(-1, 1, *(1,) * dims), None,
                     Geometry.pointwise(dims, groups=value.numel())), owned


def _functional_batchnorm(node: fx.Node, consts: dict[fx.Node, Any], shapes: dict
                          ) -> tuple[fx.Node, Affine, int] | None:
    """``F.batch_norm(x, mean, var, w, b, training=False, …)`` on constant tensors (buffers
    and parameters read with ``get_attr``) as its per-channel affine map."""
    try:
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    x, tensors = a["input"], [a[k] for k in ("running_mean", "running_var", "weight", "bias")]
    if a["training"] is not False or not isinstance(x, fx.Node) or x not in shapes or \
            len(shapes[x][0]) < 2 or any(t is not None and t not in consts for t in tensors):
        return None
    mean, var, weight, bias = (None if t is None else consts[t].detach().double()
                               for t in tensors)
    if mean is None or var is None:
        return None
    stats = SimpleNamespace(running_mean=mean, running_var=var, weight=weight, bias=bias,
                            eps=float(a["eps"]))
    owned = sum(consts[t].numel() for t in tensors[2:] if t is not None and len(t.users) == 1)
    return x, batchnorm(stats, len(shapes[x][0]) - 2), owned


def _per_channel(shape: torch.Size, dim: int) -> set[tuple[int, ...]]:
    """The shapes of a tensor that broadcasts along every dim of ``shape`` but ``dim``."""
    full = tuple(n if i == dim else 1 for i, n in enumerate(shape))
    return {full[i:] for i in range(dim + 1)}


def _constant(value: Any, consts: dict[fx.Node, Any]) -> bool:
    if isinstance(value, fx.Node):
        return value in consts
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _attrs(value: Any) -> list[fx.Node]:
    """The ``get_attr`` nodes a constant is computed from, through single-use nodes."""
    if not isinstance(value, fx.Node):
        return []
    if value.op == "get_attr":
        return [value]
    return [a for arg in _flat((value.args, value.kwargs)) if isinstance(arg, fx.Node)
            and len(arg.users) == 1 for a in _attrs(arg)]


def _negation(maps: list[Affine | Identity], shape: torch.Size) -> Affine:
    """``−1`` in the layout of the other maps of a sum (dim 1, or the last dim)."""
    linear = len(shape) == 2 or any(isinstance(m, Affine) and m.geometry.dims == 0
                                    for m in maps)
    n = shape[-1] if linear else shape[1]
    ones = -torch.ones(n, dtype=torch.float64)
    if linear:
        return Affine(torch.diag(ones), None, Geometry.linear())
    dims = len(shape) - 2
    return Affine(ones.reshape(-1, 1, *(1,) * dims), None, Geometry.pointwise(dims, groups=n))


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
