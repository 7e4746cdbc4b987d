"""Fold: every linear subgraph of any model into one plain conv/linear layer, verified.

Requires: ``example_inputs`` for one forward. Ensures: the model's eval-mode form computing
the same function on those inputs (checked, else ``ContractionError``), never larger — no
more parameters, no more MACs at those shapes — in which every linear subgraph that is
cheaper as one layer is one plain layer; the given model is untouched. Recipe: copy the
model (baking companded weights, contracting expanded blocks); trace it with FX keeping
conv/linear/BatchNorm calls as leaves; run it on ``example_inputs`` to check each leaf and
learn the shapes; group the linear subgraphs (:mod:`expandfx.passes.linear_groups`:
conv/linear → eval-mode BatchNorm, chains, branches over one input summed — RepVGG, ACNet,
DBB, MobileOne, ``x + conv(x)`` — each merge made only where it costs no more); fold each
with :func:`expandfx.linear.fold` in float64; check every folded layer on the value it
replaces and swap it in; then fold the BatchNorms FX could not see (inside modules kept
whole, behind reshapes) from a recorded forward (:mod:`expandfx.passes.fold_norms`), which is
also the whole pass for a model FX cannot trace; compare the result with the model
(``docs/design.md §4``). ``result.meta["expandfx.fold"]`` (a :class:`FoldReport`) says what
became what, and why the rest was kept.

Example::

    >>> import torch, torch.nn as nn, expandfx as efx
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    >>> gm = efx.fold(model.eval(), (torch.randn(2, 3, 16, 16),))
    >>> [type(m).__name__ for m in gm.modules() if not list(m.children())]
    ['ReLU', 'Conv2d']
    >>> print(gm.meta["expandfx.fold"].folded[0]["formula"])
    0 → 1
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from expandfx.passes.contract import deployable
from expandfx.passes.fold_norms import fold_norms
from expandfx.passes.linear_groups import (
    TRANSPOSED,
    Analysis,
    Group,
    LeafTracer,
    analyse,
    describe,
    leaf_count,
    render,
)
from torch import nn
from torch.utils._pytree import tree_leaves

from expandfx.copying import as_module, copy_model
from expandfx.errors import ConfigError, ContractionError, NonFiniteError
from expandfx.finite import (
    check_inputs,
    check_materialized,
    check_model,
    check_outputs,
    finite_rel_error,
)
from expandfx.linear.ir import PAD_MODES, Affine, pad_from_pairs
from expandfx.tolerances import FOLD_TOLERANCES, model_dtype, rel_error, within

__all__ = ["FoldReport", "fold"]

Tensor = torch.Tensor
META_KEY = "expandfx.fold"
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class FoldReport:
    """What :func:`fold` did: each ``folded`` layer (its path, the module paths it replaces,
    their formula and the new layer), each ``kept`` node with the reason, and the folded
    model's error on ``example_inputs`` (max abs difference / max abs output, over the
    positions where the model's output is finite)."""

    folded: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    error: float | None = None
    tolerance: float = 1e-5
    graph: str = "torch.fx"  # how the data flow was seen: "torch.fx" or "recorded forward"

    def __str__(self) -> str:
        n_in = sum(len(f["modules"]) for f in self.folded)
        error = ("not measured" if self.error is None else f"{self.error:.1e}"
                 if math.isfinite(self.error) else f"{self.error} (non-finite)")
        lines = [f"fold: {n_in} modules in {len(self.folded)} linear subgraph(s) folded into "
                 f"{len(self.folded)} layer(s); max relative error {error} "
                 f"(tolerance {self.tolerance:g})"]
        lines += [f"  {f['layer']} = {f['formula']}\n      as {f['as']}" for f in self.folded]
        if self.kept:
            lines.append("  not folded:")
            lines += [f"    {k['node']}: {k['reason']}" for k in self.kept]
        return "\n".join(lines)


@dataclass
class _Folded:
    group: Group
    layer: nn.Module
    pad: tuple[list[int], str] | None
    first: str  # the path of the group's first conv/linear layer
    name: str = ""

    def __call__(self, x: Tensor) -> Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        return self.layer(x)


def fold(model: nn.Module, example_inputs: Any = None, *, allow_larger: bool = False,
         allow_nonfinite_outputs: bool = False) -> nn.Module:
    """``model``'s eval-mode form with every linear subgraph folded into one plain layer
    where that costs no more, verified on ``example_inputs``; the model is not changed.

    Returns a :class:`torch.fx.GraphModule` when FX can trace the model; otherwise a copy of
    the model in its own class with each BatchNorm folded into its layer and replaced by
    ``nn.Identity`` (found by a recorded forward, :mod:`expandfx.passes.fold_norms`; chains
    and sums need a graph and stay). Either way ``result.meta["expandfx.fold"]`` is the
    :class:`FoldReport`. A chain or sum is merged only if the merged layer has no more
    parameters and no more MACs at the example's shapes than its parts — a depthwise conv
    and the pointwise conv after it stay two layers; ``allow_larger=True`` merges anyway.
    ``example_inputs`` (a tensor or a tuple of ``forward``'s positional arguments) drive the
    checks: subclassed layers must compute the plain op on them, every folded layer must match
    what it replaces, and the result the model in eval mode. Raises :class:`ConfigError`
    without example inputs, for a model on the meta device, or when the model rejects the
    inputs; :class:`NonFiniteError` for NaN/inf in a parameter, buffer or input, or in the
    model's outputs unless ``allow_nonfinite_outputs=True`` (masked log-probabilities: the
    folded model must then have the same non-finite values at the same positions, and the
    error is measured over the finite ones); :class:`ContractionError` when the result
    would differ.
    """
    model = as_module(model, "fold")
    name = type(model).__name__
    if example_inputs is None:
        raise ConfigError(f"fold: pass example_inputs, a tensor or a tuple of {name}.forward's "
                          f"positional arguments (e.g. fold(model, (torch.randn(1, 3, 224, "
                          f"224),))): fold runs the model once to learn its shapes and to "
                          f"verify every folded layer.")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    check_materialized(model, "fold")
    check_model(model, "fold")  # a NaN weight would fold into a NaN layer "with error 0"
    check_inputs(inputs, "fold")
    if model.training or any(m.training for m in model.modules()):
        warnings.warn(f"fold: {name} is in training mode; folding its eval-mode form (BatchNorm "
                      f"with running statistics, no dropout). Call model.eval() first to "
                      f"silence this.", stacklevel=2)
    reference = copy_model(model, "fold").eval()
    try:
        with _seeded(inputs), torch.no_grad():
            want = reference(*inputs)
    except Exception as exc:  # the model's own error, whatever its type
        raise ConfigError(f"fold: {name} fails on example_inputs ({type(exc).__name__}: "
                          f"{_first_line(exc)}). fold needs inputs forward accepts: a tensor "
                          f"or a tuple of its positional arguments, of the shape and dtype "
                          f"the model is meant for.") from exc
    check_outputs(want, None, "fold", allow=allow_nonfinite_outputs)
    tol = FOLD_TOLERANCES.get(model_dtype(model), 1e-5)
    try:
        gm = _trace(deployable(model)[0].eval(), name)
        state = {k: b.detach().clone() for k, b in gm.named_buffers()}
        with _seeded(inputs), _restored(gm, state):
            found = analyse(gm, inputs, allow_larger)
        traced = finite_rel_error(want, found.output)
        if not within(traced, tol):
            raise ConfigError(f"the FX trace of {name} does not compute what the model does "
                              f"on example_inputs (relative difference {traced:.1e}): its "
                              f"forward has data-dependent behaviour FX cannot record")
    except NonFiniteError:  # the user's problem (an overflowing contraction), not FX's
        raise
    except Exception as exc:  # FX fails in many ways; the recorded forward needs none of them
        return _fold_recorded(model, inputs, want, tol, _first_line(exc))
    chosen = [_build(g, found) for g in found.groups if _eligible(g, found)]
    with _seeded(inputs), _restored(gm, state):
        chosen = _checked(gm, chosen, found, inputs, tol)
    report = FoldReport(kept=_kept(gm, found, chosen), tolerance=tol)
    _rewrite(gm, chosen, report, found.consts)
    with _seeded(inputs), torch.no_grad():  # the norms FX kept inside modules or behind reshapes
        inside, kept = fold_norms(gm, inputs, tol)
    if inside:
        _drop_identities(gm)
        gone = {f"'{m}' " for f in inside for m in f["modules"]}
        report.kept = [k for k in report.kept if not k["node"].startswith(tuple(gone))]
        report.folded += inside
    seen = {k["node"] for k in report.kept}
    report.kept += [k for k in kept if k["node"] not in seen]
    return _verified(gm, inputs, want, report)


def _fold_recorded(model: nn.Module, inputs: tuple[Any, ...], want: Any, tol: float,
                   why: str) -> nn.Module:
    """The model's own class with each provable layer → BatchNorm pair folded."""
    out = deployable(model)[0].eval()
    with _seeded(inputs), torch.no_grad():
        done, kept = fold_norms(out, inputs, tol)
    note = {"node": "the model's graph", "reason": (
        f"torch.fx cannot trace {type(model).__name__} ({why}); BatchNorms were folded into "
        f"their layers from a recorded forward (the model keeps its class), and chains or "
        f"sums of layers, which need a graph, were left as they are")}
    return _verified(out, inputs, want, FoldReport(done, [note, *kept], tolerance=tol,
                                                   graph="recorded forward"))


def _verified(out: nn.Module, inputs: tuple[Any, ...], want: Any, report: FoldReport
              ) -> nn.Module:
    with _seeded(inputs), torch.no_grad():
        report.error = finite_rel_error(want, out(*inputs))
    if not within(report.error, report.tolerance):
        by = (f"by {report.error:.1e} × max|output|" if math.isfinite(report.error) else
              "with non-finite values where the model's are finite (or other ones)")
        raise ContractionError(f"fold: the folded {type(out).__name__} differs from the model "
                               f"{by} on example_inputs "
                               f"(tolerance {report.tolerance:g}) although each folded layer "
                               f"matched what it replaces; this is a bug in expandfx.fold — "
                               f"please report it and use the model unfolded.\n{report}")
    meta = out.__dict__.get("meta")
    if not isinstance(meta, dict):
        meta = {}
        object.__setattr__(out, "meta", meta)
    meta[META_KEY] = report
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _drop_identities(gm: fx.GraphModule) -> None:
    """Remove the calls of the ``nn.Identity`` modules norm folding left in the graph."""
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity
                and len(node.args) == 1 and not node.kwargs):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _trace(root: nn.Module, name: str) -> fx.GraphModule:
    graph = LeafTracer().trace(root)
    gm = fx.GraphModule(root, graph, class_name=f"Folded{name}")
    gm.training = root.training
    return gm


def _eligible(group: Group, found: Analysis) -> bool:
    """At least one conv/linear layer and something to fold it with."""
    return (isinstance(group.folded, Affine) and leaf_count(group.tree) > 1
            and any(found.is_layer(m) for m in group.members))


def _build(group: Group, found: Analysis) -> _Folded:
    """The plain torch layer (and explicit padding, if asymmetric) of a folded group."""
    first = next(m for m in group.members if found.is_layer(m))
    like = found.layers[first]
    a: Affine = group.folded
    g, kw = a.geometry, {"bias": a.bias is not None, "dtype": like.weight.dtype,
                         "device": like.weight.device}
    pad = None
    if g.dims == 0:
        layer = nn.Linear(a.weight.shape[1], a.weight.shape[0], **kw)
    elif g.transposed:
        layer = TRANSPOSED[g.dims - 1](a.in_channels, a.out_channels, a.kernel, stride=g.stride,
                                       padding=tuple(p for p, _ in g.padding),
                                       output_padding=g.output_padding, groups=g.groups,
                                       dilation=g.dilation, **kw)
    else:
        sym = g.symmetric_padding
        if sym is None:
            pad = (pad_from_pairs(g.padding), PAD_MODES[g.padding_mode])
        layer = _CONV[g.dims](a.in_channels, a.out_channels, a.kernel, stride=g.stride,
                              padding=sym if sym is not None else 0, dilation=g.dilation,
                              groups=g.groups,
                              padding_mode=g.padding_mode if sym is not None else "zeros", **kw)
    with torch.no_grad():
        layer.weight.copy_(a.weight)
        if a.bias is not None:
            layer.bias.copy_(a.bias)
    return _Folded(group, layer.train(like.training), pad, str(first.target))


class _GroupCheck(fx.Interpreter):
    """Runs the unfolded graph and applies each folded layer to its group's input."""

    def __init__(self, gm: fx.GraphModule, chosen: list[_Folded]) -> None:
        super().__init__(gm)
        self.at_root = {f.group.root: f for f in chosen}
        self.pending: dict[fx.Node, int] = {}
        for f in chosen:
            self.pending[f.group.source] = self.pending.get(f.group.source, 0) + 1
        self.stash: dict[fx.Node, Any] = {}
        self.errors: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.pending:
            self.stash[n] = out
        folded = self.at_root.get(n)
        if folded is not None:
            source = folded.group.source
            self.errors[n] = rel_error(out, folded(self.stash[source]))
            self.pending[source] -= 1
            if not self.pending[source]:
                del self.stash[source]
        return out


def _checked(gm: fx.GraphModule, chosen: list[_Folded], found: Analysis,
             inputs: tuple[Any, ...], tol: float) -> list[_Folded]:
    """The folded groups whose layer matches their subgraph on the example run."""
    check = _GroupCheck(gm, chosen)
    with torch.no_grad():
        check.run(*inputs)
    good = []
    for f in chosen:
        err = check.errors[f.group.root]
        if within(err, tol):
            good.append(f)
            continue
        for m in f.group.members:
            found.why.setdefault(m, f"its group {render(f.group.tree)} folds to a layer that "
                                    f"differs by {err:.1e} × max|output| on the example input "
                                    f"(tolerance {tol:g}); kept unfolded. Likely causes: a layer "
                                    f"edited after construction, or an in-place op between the "
                                    f"branches; else please report it")
    return good


def _kept(gm: fx.GraphModule, found: Analysis, chosen: list[_Folded]) -> list[dict[str, str]]:
    """Every reason recorded, and why each conv/linear/BatchNorm left alone was not folded."""
    folded = {m for f in chosen for m in f.group.members}
    out = []
    for node in gm.graph.nodes:
        if node in found.why:
            out.append({"node": describe(node, gm), "reason": found.why[node]})
        elif node in found.layers and node not in folded:
            out.append({"node": describe(node, gm), "reason": _alone(node, found, gm)})
    return out


def _alone(node: fx.Node, found: Analysis, gm: fx.GraphModule) -> str:
    users, src = list(node.users), node.args[0]
    if len(users) > 1:
        return (f"its output has {len(users)} users ({', '.join(describe(u, gm) for u in users)})"
                f"; folding it into one would change what the others read")
    if isinstance(src, fx.Node) and src in found.layers and len(src.users) > 1:
        return (f"its input {describe(src, gm)} has {len(src.users)} users; folding them "
                f"together would change what the others read")
    what = "nothing linear to fold it with" if found.is_layer(node) else \
        "no conv/linear layer to fold it into"

    def near(n: fx.Node) -> str:
        return describe(n, gm) + (" (not foldable, see its entry)" if n in found.why else "")

    return (f"{what}: it reads {near(src)} and feeds "
            f"{', '.join(near(u) for u in users) or 'nothing'}")


def _rewrite(gm: fx.GraphModule, chosen: list[_Folded], report: FoldReport,
             consts: set[fx.Node]) -> None:
    """Swap each group for a call of its folded layer; drop the replaced nodes, modules and
    the constants (a layer-scale gamma) only they read."""
    graph, replaced, removable = gm.graph, {}, set()
    taken = {name for name, _ in gm.named_modules()}
    for f in chosen:
        members = [str(m.target) for m in f.group.members if m.op == "call_module"]
        f.name = _unique(f"{f.first}_folded", taken)
        gm.add_submodule(f.name, f.layer)
        with graph.inserting_before(f.group.root):
            x = replaced.get(f.group.source, f.group.source)
            if f.pad is not None:
                x = graph.call_function(F.pad, (x, f.pad[0]), {"mode": f.pad[1]})
            new = graph.call_module(f.name, (x,))
        f.group.root.replace_all_uses_with(new)
        replaced[f.group.root] = new
        removable.update(f.group.members)
        spec = repr(f.layer) + (f" after F.pad({f.pad[0]}, mode={f.pad[1]!r})" if f.pad else "")
        report.folded.append({"layer": f.name, "modules": members,
                              "formula": render(f.group.tree), "as": spec})
    attrs = {n.target for n in graph.nodes if n.op == "get_attr"}
    graph.eliminate_dead_code(is_impure_node=lambda n: n not in removable and n not in consts)
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    for target in attrs - {n.target for n in graph.nodes if n.op == "get_attr"}:
        owner, _, name = target.rpartition(".")  # a folded-in gamma: drop the parameter
        if not any(owner == t or owner.startswith(f"{t}.") for t in called):
            delattr(gm.get_submodule(owner), name)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}{i}", i + 1
    taken.add(out)
    return out


@contextlib.contextmanager
def _seeded(inputs: tuple[Any, ...]) -> Iterator[None]:
    """The same random stream for every run (dropout in training mode)."""
    devices = sorted({x.device.index or 0 for x in tree_leaves(inputs)
                      if isinstance(x, Tensor) and x.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


@contextlib.contextmanager
def _restored(gm: fx.GraphModule, state: dict[str, Tensor]) -> Iterator[None]:
    """Put the buffers back (a BatchNorm in training mode updates its statistics)."""
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in gm.named_buffers():
                if name in state:
                    buf.copy_(state[name])
