"""The expansion plan: per layer, the rule applied or the reason it was skipped.

:func:`plan` decides without changing the model; ``expand`` carries the same
decisions out. ``str(plan)`` is a readable table.

Example::

    >>> import torch, torch.nn as nn
    >>> p = plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)),
    ...          rule="CL", r=2, example_inputs=(torch.randn(1, 3, 32, 32),))
    >>> [(row.path, row.rule) for row in p.rows]
    [('0', 'CL'), ('2', None)]
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import registry
from .block import LAYER_TYPES, ExpandedBlock, base_type, torch_layer_type
from .counting import param_count
from .errors import ConfigError
from .helpers import first_match, text_table
from .linear.costs import layer_macs, sequential_macs
from .rules import RULES
from .rules.spec import RuleSpec, check_spec, pick
from .snapshot import preserved
from .tracing import GraphView, inspect, positional

__all__ = ["INITS", "LayerPlan", "Plan", "check_r", "decide", "describe", "input_shapes", "plan",
           "requested_explicitly"]


Patterns = str | Sequence[str] | None
INITS = ("default", "preserve")


@dataclass
class LayerPlan:
    """What happens to one conv/linear layer (one row of the plan)."""

    path: str
    layer: str
    rule: str | None
    reason: str | None = None
    aliases: list[str] = field(default_factory=list)
    call_sites: int | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    module: nn.Module | None = field(default=None, repr=False, compare=False)


@dataclass
class Plan:
    """All rows, plus what the graph view found beyond them."""

    rows: list[LayerPlan]
    traced: bool
    trace_error: str | None = None
    notes: list[str] = field(default_factory=list)
    recorded: bool = False
    rule: RuleSpec = "CL"
    r: float = 4.0
    view: GraphView | None = field(default=None, repr=False, compare=False)

    @property
    def expanded(self) -> list[LayerPlan]:
        return [row for row in self.rows if row.rule]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [row for row in self.rows if not row.rule]

    def totals(self) -> dict[str, int | None]:
        def total(attr: str) -> int | None:
            values = [getattr(row, attr) for row in self.rows]
            return None if any(v is None for v in values) else sum(values)
        return {k: total(k) for k in ("params_before", "params_after", "macs_before",
                                      "macs_after")}

    def __str__(self) -> str:
        head = ("layer", "type", "rule", "params", "MACs", "note")
        lines = [head]
        for row in self.rows:
            note = row.reason or ""
            if row.aliases:
                note = (note + "; " if note else "") + f"also at {', '.join(row.aliases)}"
            if row.call_sites and row.call_sites > 1:
                note = (note + "; " if note else "") + f"called at {row.call_sites} sites"
            lines.append((row.path, row.layer, row.rule or "-",
                          _arrow(row.params_before, row.params_after),
                          _arrow(row.macs_before, row.macs_after), note))
        t = self.totals()
        lines.append(("total", "", f"{len(self.expanded)}/{len(self.rows)}",
                      _arrow(t["params_before"], t["params_after"]),
                      _arrow(t["macs_before"], t["macs_after"]), ""))
        out = text_table(lines, rule_after_header=True).split("\n")
        if self.recorded:
            out.append(f"FX could not trace the model ({self.trace_error}); call sites and "
                       f"direct weight reads were recorded from one forward pass on "
                       f"example_inputs (code paths those inputs do not take were not seen).")
        elif not self.traced:
            out.append(f"FX could not trace the model ({self.trace_error}); layers were found "
                       f"by a module walk: call sites, shared calls and functional uses of "
                       f"weights were not checked (pass example_inputs to record them).")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


def plan(model: nn.Module, rule: RuleSpec = "CL", r: float = 4, *,
         include: Patterns = None, exclude: Patterns = None,
         example_inputs: Any = None) -> Plan:
    """Decide, layer by layer, what ``expand`` would do; never changes ``model``.

    MACs are those of one call per layer on ``example_inputs`` (a layer called at
    several sites costs that much per call). When FX cannot trace the model, call sites
    are recorded from a forward pass on ``example_inputs`` (see :mod:`expandfx.tracing`).
    """
    r = check_r(r)
    rows, view = decide(model, rule, r, include=include, exclude=exclude,
                        example_inputs=example_inputs)

    shapes = input_shapes(model, example_inputs, [row.module for row in rows])
    for row in rows:
        layer = registry.as_torch(row.module, device="meta", path=row.path)
        row.params_before = row.params_after = param_count(row.module)
        shape = shapes.get(id(row.module))
        if shape is not None:
            row.macs_before = row.macs_after = layer_macs(layer, list(shape))[1]
        if row.rule:
            meta_block = RULES[row.rule].build(layer, r, path=row.path, device="meta")
            row.params_after = param_count(meta_block)
            if shape is not None:
                row.macs_after = sequential_macs(meta_block, shape)
    notes = [f"functional call {c}: left alone" for c in view.functional_calls]
    return Plan(rows, view.traced, view.error, notes, recorded=view.recorded, rule=rule, r=r,
                view=view)


@dataclass
class _Context:
    """What every layer's decision needs to know about the whole model."""

    view: GraphView
    rule: RuleSpec
    include: list[str] | None
    exclude: list[str]
    inside_block: dict[int, str]
    opaque: dict[int, str]
    owners: dict[int, set[str]]
    output: set[int]


def decide(model: nn.Module, rule: RuleSpec, r: float, *, include: Patterns = None,
           exclude: Patterns = None, example_inputs: Any = None
           ) -> tuple[list[LayerPlan], GraphView]:
    """The rule or skip reason of every conv/linear layer, with its module paths."""
    check_r(r)
    check_spec(rule)
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    view = inspect(model, example_inputs)
    paths: dict[int, list[str]] = defaultdict(list)
    modules: dict[int, nn.Module] = {}
    owners: dict[int, set[str]] = defaultdict(set)
    for name, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(name)
        modules.setdefault(id(module), module)
        for pname, param in module._parameters.items():
            if param is not None:
                owners[id(param)].add(f"{name}.{pname}" if name else pname)
    inside_block = {id(m): path for path, b in model.named_modules()
                    if isinstance(b, ExpandedBlock) for m in b.modules()}
    layers = [(key, m) for key, m in modules.items()
              if registry.is_layer(m) or _is_parametrized_layer(m)]
    output = view.output_layers if view.checked else _last_linear(layers, inside_block)
    ctx = _Context(view, rule, include, exclude, inside_block, _opaque_children(model),
                   owners, output)
    rows = []
    for key, module in layers:
        path = paths[key][0]
        _reject_lazy(path, module)
        row = LayerPlan(path=path, layer=describe(module), rule=None,
                        aliases=sorted(set(paths[key][1:])), module=module,
                        call_sites=view.call_sites[key] if view.checked else None)
        row.rule, row.reason = _choose(paths[key], module, ctx)
        rows.append(row)
    return rows, view


def _choose(paths: list[str], module: nn.Module, ctx: _Context
            ) -> tuple[str | None, str | None]:
    """``(rule, None)`` or ``(None, reason)`` for one layer, in the order a user asks why."""
    path = paths[0]
    if id(module) in ctx.inside_block:
        return None, f"already part of the expanded block '{ctx.inside_block[id(module)]}'"
    if ctx.include is not None and first_match(path, ctx.include) is None:
        return None, "not matched by include"
    hit = first_match(path, ctx.exclude)
    if hit:
        return None, f"excluded by {hit!r}"
    rule, reason = pick(ctx.rule, path, module)
    if rule is None:
        return None, reason
    explicit = requested_explicitly(paths, ctx.include, ctx.rule)
    reason = (_unusable(path, module, explicit) or _not_plain(path, module)
              or _tied(module, paths, ctx.owners) or _graph_reason(module, ctx))
    if reason:
        return None, reason

    reason = RULES[rule].skip_reason(registry.as_torch(module, device="meta", path=path))
    if reason:
        return None, reason
    if rule == "FC" and id(module) in ctx.output and not explicit:
        return None, _output_reason(path, ctx.view)
    return rule, None


def requested_explicitly(paths: list[str], include: list[str] | None,
                         rule: RuleSpec) -> bool:
    """Whether the user named this very layer: its exact path in ``include=``, or as the
    pattern of the rule mapping that matches it (a glob that matches it is not a request).

    >>> requested_explicitly(["fc"], ["*", "fc"], "FC"), requested_explicitly(["fc"], ["*"], "FC")
    (True, False)
    >>> requested_explicitly(["fc"], None, {"fc": "FC"})
    True
    >>> requested_explicitly(["fc"], None, {"f*": "FC"})
    False
    """
    if include is not None and any(p in include for p in paths):
        return True
    spec = dict([rule]) if isinstance(rule, tuple) else rule
    if isinstance(spec, Mapping):
        matched = first_match(paths[0], spec)
        return matched is not None and matched in paths
    return False


def _output_reason(path: str, view: GraphView) -> str:
    how = ("its result is the model's output" if view.checked else
           "the last linear layer in module order, taken as the output layer because the "
           "model could not be traced")
    mapping = "{" + repr(path) + ": 'FC', ...}"
    return (f"the model's output layer ({how}); the FC rule leaves it alone, as the paper's "
            f"authors do. To expand it, name it exactly: include=['*', {path!r}] or a rule "
            f"mapping {mapping}")


def _last_linear(layers: list[tuple[int, nn.Module]], inside_block: dict[int, str]) -> set[int]:
    linear = [key for key, m in layers if registry.is_linear(m) and key not in inside_block]
    return set(linear[-1:])


def describe(layer: nn.Module) -> str:
    """``Conv2d(3→8, k7, s1, p3)`` — a short one-line description."""
    torch_layer = registry.as_torch(layer, device="meta")
    if torch_layer is not layer:  # a registered class: Conv1D(32→96)
        return type(layer).__name__ + "(" + describe(torch_layer).partition("(")[2]
    kind = base_type(layer)
    if issubclass(kind, nn.Linear):
        return f"Linear({layer.in_features}→{layer.out_features})"
    extras = [f"k{_short(layer.kernel_size)}"]
    for attr, tag, default in (("stride", "s", 1), ("padding", "p", 0),
                               ("dilation", "d", 1), ("groups", "g", 1)):
        value = getattr(layer, attr)
        if _short(value) != str(default):
            extras.append(f"{tag}{_short(value)}")
    if layer.padding_mode != "zeros":
        extras.append(layer.padding_mode)
    return f"{kind.__name__}({layer.in_channels}→{layer.out_channels}, {', '.join(extras)})"


def input_shapes(model: nn.Module, example_inputs: Any,
                 layers: Sequence[nn.Module]) -> dict[int, tuple[int, ...]]:
    """Shape of the first input of each layer's first call, from one forward pass.

    The forward runs under ``no_grad`` in eval mode (so batch-norm statistics do not
    move); every module's ``training`` flag is restored afterwards.
    """
    if example_inputs is None:
        return {}
    inputs = positional(example_inputs)
    shapes: dict[int, tuple[int, ...]] = {}

    def record(layer: nn.Module, args: tuple) -> None:
        shapes.setdefault(id(layer), tuple(args[0].shape))

    handles = [layer.register_forward_pre_hook(record) for layer in set(layers)]
    try:
        with preserved(model), torch.no_grad():  # restores training flags and any cache
            model.eval()
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def check_r(r: Any) -> float:
    """``r`` as a float, or a ConfigError (numbers, numpy scalars and 0-d tensors accepted)."""
    ok = not isinstance(r, (bool, str)) and (isinstance(r, numbers.Real) or (
        isinstance(r, torch.Tensor) and r.numel() == 1 and r.is_floating_point()))
    value = float(r) if ok else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"expand: r must be a positive number (the paper uses 0.25 to 8), "
                          f"got r={r!r}.")
    return value


def _not_plain(path: str, module: nn.Module) -> str | None:
    """Why a subclass or a hooked layer may compute something else (warned and reported)."""
    base = _plain_base(module)
    cls, torch_cls = _name(type(module)), _name(base)
    custom = _custom_methods(module, base)
    extra = sorted(set(module._parameters) - {"weight", "bias"} | set(module._buffers))
    hooked = any(getattr(module, h) for h in _HOOKS)
    reason = None
    if custom:
        reason = (f"{cls} subclasses {torch_cls} and overrides {', '.join(custom)}, so it is "
                  f"not a plain {torch_cls}: left alone")
        fix = (f"Expand it by hand, or use a plain {torch_cls} (or expandfx.register_layer "
               f"the class) if it computes the same")
    elif extra:
        reason = (f"{cls} has tensors besides weight and bias "
                  f"({', '.join(extra)}) that an expanded block would not carry: left alone")
        fix = "Move those tensors to a parent module to expand this layer"
    elif hooked:
        reason = "has forward hooks, which an expanded block would silently drop: left alone"
        fix = "Remove the hooks (handle.remove()) to expand it, and re-register them after"
    if reason:
        warnings.warn(f"expand: '{path}': {reason}. {fix}.", stacklevel=5)
    return reason


def _graph_reason(module: nn.Module, ctx: _Context) -> str | None:
    """Why the traced or recorded forward says the layer cannot be swapped."""
    view, key = ctx.view, id(module)
    if view.checked:
        if view.direct_uses.get(key):
            return (f"its parameters are used directly in forward "
                    f"({'; '.join(view.direct_uses[key])}): expanding would break that use")
        if view.call_sites[key] == 0:
            inside = ctx.opaque.get(key)
            where = "traced" if view.traced else "recorded"
            return (f"never called as a module in the {where} forward"
                    + (f" ({inside} reads its weights directly)" if inside else ""))
    elif key in ctx.opaque:
        return f"inside {ctx.opaque[key]}, which reads its weights directly"
    return None


def _reject_lazy(path: str, module: nn.Module) -> None:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ConfigError(f"expand: '{path}' ({type(module).__name__}) is a lazy module that has "
                          f"not been initialized. Run one forward pass with a real input first "
                          f"(or pass example_inputs and call the model once), then expand.")


def _unusable(path: str, module: nn.Module, explicit: bool) -> str | None:
    """A layer whose weight is computed (pruning, weight norm): skipped with the reason, or
    a ConfigError when the user asked for this very layer."""
    if _is_parametrized_layer(module):
        names = ", ".join(f"{name} ({', '.join(type(p).__name__ for p in plist)})"
                          for name, plist in module.parametrizations.items())
        what = f"already has parametrizations on {names}"
        fix = ("Make the weight plain first (torch.nn.utils.parametrize."
               "remove_parametrizations(layer, 'weight') keeps its current value), or, for "
               "expandfx.compand, expand before compand")
    elif not isinstance(module._parameters.get("weight"), nn.Parameter):
        what = ("has no weight parameter of its own (its weight is computed by a hook, as "
                "torch.nn.utils.prune and the old torch.nn.utils.weight_norm do)")
        fix = ("Make it permanent first (prune.remove(module, 'weight'), "
               "torch.nn.utils.remove_weight_norm), then expand")
    else:
        return None
    if explicit:
        raise ConfigError(f"expand: '{path}' {what}. {fix}.")
    return f"{what}: left alone. {fix} to expand it"


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# Methods a subclass may override without changing what the layer computes.
_HARMLESS = {"__init__", "extra_repr", "__repr__", "reset_parameters", "__setstate__",
             "__getstate__", "_get_name"}


def _plain_base(module: nn.Module) -> type[nn.Module]:
    """The class a layer must not override: its registered class, else the torch layer."""
    found = registry.lookup(module)
    return found[0] if found else torch_layer_type(module)


def _custom_methods(module: nn.Module, base: type[nn.Module]) -> list[str]:
    """Methods of the torch base class that the module's class (or a mixin) overrides."""
    names = set()
    for cls in type(module).__mro__:
        if cls is base:
            break
        if cls is nn.Module or cls is object:
            continue
        names |= {n for n, v in vars(cls).items() if callable(v) and hasattr(base, n)}
    return sorted(names - _HARMLESS)


def _name(cls: type) -> str:
    """``Conv2dSame``, or ``timm.layers.linear.Linear`` where the short name is ambiguous."""
    torch_names = {c.__name__ for c in LAYER_TYPES}
    ours = cls.__module__.startswith("torch.nn")
    return cls.__name__ if ours or cls.__name__ not in torch_names else \
        f"{cls.__module__}.{cls.__qualname__}"


def _tied(module: nn.Module, paths: list[str], owners: dict[int, set[str]]) -> str | None:
    own = {f"{p}.{n}" if p else n for p in paths for n in ("weight", "bias")}
    for name in ("weight", "bias"):
        param = module._parameters.get(name)
        others = sorted(owners.get(id(param), set()) - own) if param is not None else []
        if others:
            return (f"its {name} is tied to {', '.join(others)}; expanding would untie them: "
                    f"left alone")
    return None


def _is_parametrized_layer(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) and (
        issubclass(base_type(module), LAYER_TYPES) or registry.lookup(module) is not None)


def _opaque_children(model: nn.Module) -> dict[int, str]:
    """Layers inside built-in torch.nn modules that FX keeps opaque (MultiheadAttention, …)."""
    opaque: dict[int, str] = {}
    for path, module in model.named_modules():
        builtin = type(module).__module__.startswith("torch.nn")
        container = isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        if builtin and not container and not registry.is_layer(module):
            for child in module.modules():
                if child is not module:
                    opaque.setdefault(id(child), f"'{path}' ({type(module).__name__})")
    return opaque


def _patterns(value: Patterns, name: str) -> list[str] | None:
    if value is None:
        return None if name == "include" else []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(p, str) for p in value):
        raise ConfigError(f"expand: {name} must be a glob pattern or a list of them, "
                          f"got {value!r}")
    return list(value)


def _short(value: Any) -> str:
    if isinstance(value, tuple) and len(set(value)) == 1:
        return str(value[0])
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def _arrow(before: int | None, after: int | None) -> str:
    if before is None:
        return "?"
    return _human(before) if before == after else f"{_human(before)} → {_human(after)}"


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)

