"""Fold: every linear subgraph of any model into one plain conv/linear layer, verified.

Requires: a model FX can trace, and ``example_inputs`` for one forward. Ensures: a
``torch.fx.GraphModule`` computing the same function on those inputs (checked, else
``ContractionError``), in which every legal linear subgraph is one plain layer; the given
model is untouched. Recipe: copy the model (baking companded weights, contracting expanded
blocks); trace it with FX keeping conv/linear/BatchNorm calls as leaves; run it on
``example_inputs`` to check each leaf and learn the shapes; group the linear subgraphs
(:mod:`expandfx.passes.linear_groups`: conv/linear → eval-mode BatchNorm, chains, branches
over one input summed — RepVGG, ACNet, DBB, MobileOne, ``x + conv(x)``); fold each with
:func:`expandfx.linear.fold` in float64; check every folded layer on the value it replaces
and swap it in; compare the folded model with the given one (``docs/design.md §4``).
``gm.meta["expandfx.fold"]`` (a :class:`FoldReport`) says what became what, and why the rest
was kept.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from expandfx.passes.contract import deployable
from expandfx.passes.linear_groups import (
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

from expandfx.copying import copy_model
from expandfx.errors import ConfigError, ContractionError
from expandfx.helpers import FOLD_TOLERANCES, model_dtype, rel_error
from expandfx.linear.ir import PAD_MODES, Affine, pad_from_pairs

__all__ = ["FoldReport", "fold"]

Tensor = torch.Tensor
META_KEY = "expandfx.fold"
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class FoldReport:
    """What :func:`fold` did: each ``folded`` layer (its path, the module paths it replaces,
    their formula and the new layer), each ``kept`` node with the reason, and the folded
    model's error on ``example_inputs`` (max abs difference / max abs output)."""

    folded: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    error: float | None = None
    tolerance: float = 1e-5

    def __str__(self) -> str:
        n_in = sum(len(f["modules"]) for f in self.folded)
        lines = [f"fold: {n_in} modules in {len(self.folded)} linear subgraph(s) folded into "
                 f"{len(self.folded)} layer(s); max relative error {self.error or 0.0:.1e} "
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


def fold(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """``model`` with every maximal linear subgraph folded into one plain layer, as a
    verified :class:`torch.fx.GraphModule` (the model itself is not changed).

    ``example_inputs`` (a tensor or a tuple of ``forward``'s positional arguments) drive the
    checks: subclassed layers must compute the plain op on them, every folded layer must match
    its subgraph, and the folded model the given one, in the model's current mode. BatchNorms
    in training mode are kept (they are not linear). Raises :class:`ConfigError` when FX
    cannot trace the model, :class:`ContractionError` when the result would differ.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    reference = copy_model(model, "fold")
    gm = _trace(deployable(model)[0], type(model).__name__)
    tol = FOLD_TOLERANCES.get(model_dtype(gm), 1e-5)
    state = {k: b.detach().clone() for k, b in gm.named_buffers()}
    with _seeded(inputs), torch.no_grad():
        want = reference(*inputs)
    with _seeded(inputs), _restored(gm, state):
        found = analyse(gm, inputs)
    traced = rel_error(want, found.output)
    if traced > tol:
        raise ConfigError(f"fold: the FX trace of {type(model).__name__} does not compute what "
                          f"the model does on example_inputs (relative difference "
                          f"{traced:.1e}): its forward has data-dependent behaviour FX cannot "
                          f"record. Move that part into a submodule and pass a model whose "
                          f"forward traces faithfully.")
    chosen = [_build(g, found) for g in found.groups if _eligible(g, found)]
    with _seeded(inputs), _restored(gm, state):
        chosen = _checked(gm, chosen, found, inputs, tol)
    report = FoldReport(kept=_kept(gm, found, chosen), tolerance=tol)
    _rewrite(gm, chosen, report)
    with _seeded(inputs), _restored(gm, state), torch.no_grad():
        report.error = rel_error(want, gm(*inputs))
    if report.error > tol:
        raise ContractionError(f"fold: the folded {type(model).__name__} differs from the model "
                               f"by {report.error:.1e} × max|output| on example_inputs "
                               f"(tolerance {tol:g}) although each folded layer matched its "
                               f"subgraph; this is a bug in expandfx.fold — please report it "
                               f"and use the model unfolded.\n{report}")
    gm.meta[META_KEY] = report
    return gm


def _trace(root: nn.Module, name: str) -> fx.GraphModule:
    try:
        graph = LeafTracer().trace(root)
    except Exception as exc:  # FX raises many types; name the model and the fix
        raise ConfigError(f"fold: torch.fx cannot trace {name} "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}). fold "
                          f"needs a symbolically traceable forward: move data-dependent "
                          f"control flow into a submodule (or a function marked with "
                          f"torch.fx.wrap), which FX then keeps as one opaque call.") from exc
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
        if err <= tol:
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


def _rewrite(gm: fx.GraphModule, chosen: list[_Folded], report: FoldReport) -> None:
    """Swap each group for a call of its folded layer; drop the replaced nodes and modules."""
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
    graph.eliminate_dead_code(is_impure_node=lambda n: n not in removable)
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
