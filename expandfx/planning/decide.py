"""Deciding, layer by layer, what ``expand`` does: :func:`plan` and :func:`decide`.

:func:`plan` decides without changing the model (and counts parameters and MACs);
``expand`` carries the same decisions out, or a plan given to it.

Example::

    >>> import torch, torch.nn as nn
    >>> p = plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)),
    ...          rule="CL", r=2, example_inputs=(torch.randn(1, 3, 32, 32),))
    >>> [(row.path, row.rule, row.config) for row in p.rows]
    [('0', 'CL', CL(r=2)), ('2', None, None)]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import layer_types
from ..block import ExpandedBlock
from ..copying import as_module, require_module
from ..errors import ConfigError, ContractionError
from ..execution import sequential_macs
from ..linear.costs import layer_macs, param_count
from ..patterns import check_names, first_match
from ..restoring import preserved
from ..rules import RULES
from ..rules.config import INITS, RuleConfig
from ..rules.spec import RuleSpec, Spec, from_call
from ..tracing import GraphView, graph_view, inputs_rejected, positional
from .layers import LayerView, describe_layer, unhandled_reason
from .legality import (
    _graph_reason,
    _is_parametrized_layer,
    _last_linear,
    _not_plain,
    _opaque_children,
    _output_reason,
    _reject_lazy,
    _tied,
    _unusable,
    capacity_reason,
    how_requested,
    requested_explicitly,
    shift_reason,
    transposed_reason,
)
from .report import LayerPlan, Plan

__all__ = ["INITS", "Patterns", "decide", "input_shapes", "plan"]


Patterns = str | Sequence[str] | None


def plan(model: nn.Module, rule: RuleSpec = "CL", r: float | None = None, *,
         include: Patterns = None, exclude: Patterns = None,
         example_inputs: Any = None, **deprecated: Any) -> Plan:
    """Decide, layer by layer, what ``expand`` would do; never changes ``model``.

    ``rule``, ``r``, ``include``, ``exclude`` and ``example_inputs`` as for ``expand``.
    Every row carries the :class:`~expandfx.rules.config.RuleConfig` it got (its ``r``,
    ``init`` and options such as ``norm``), and its parameter and MAC counts are those of
    the block that config builds. MACs are those of one call per layer on
    ``example_inputs`` (a layer called at several sites costs that much per call). When FX
    cannot trace the model, call sites are recorded from a forward pass on
    ``example_inputs`` (see :mod:`expandfx.tracing`).
    """
    model = as_module(model, "plan")
    spec = from_call("plan", rule, r, deprecated)
    rows, view = decide(model, spec, include=include, exclude=exclude,
                        example_inputs=example_inputs)

    shapes = view.input_shapes
    for row in rows:
        layer = row.description
        if layer.unhandled:  # its own weights only (MultiheadAttention.out_proj has its own
            row.params_before = row.params_after = sum(  # row); no MAC model
                p.numel() for p in row.module.parameters(recurse=False))
            continue
        row.params_before = row.params_after = param_count(row.module)
        shape = shapes.get(id(row.module))
        if shape is not None:
            row.macs_before = row.macs_after = layer_macs(layer.torch, list(shape))[1]
        if row.config is not None:
            meta_block = _meta_builder(row.config, layer)(row.config.r)
            row.params_after = param_count(meta_block)
            if shape is not None:
                row.macs_after = sequential_macs(meta_block, shape)
    notes = [f"functional call {c}: left alone" for c in view.functional_calls]
    return Plan(rows, view.traced, view.error, notes, recorded=view.recorded, rule=spec.source,
                r=spec.short.r, view=view)


@dataclass
class _Context:
    """What every layer's decision needs to know about the whole model."""

    view: GraphView
    spec: Spec
    include: list[str] | None
    exclude: list[str]
    inside_block: dict[int, str]
    opaque: dict[int, str]
    owners: dict[int, set[str]]
    output: set[int]

    @property
    def rule(self) -> Any:
        """The spec as :func:`~expandfx.planning.legality.how_requested` reads it (the
        pattern mapping, whose exact keys are requests)."""
        return self.spec.table


def decide(model: nn.Module, rule: RuleSpec | Spec, r: float | None = None, *,
           include: Patterns = None, exclude: Patterns = None, example_inputs: Any = None
           ) -> tuple[list[LayerPlan], GraphView]:
    """The config (rule and settings) or skip reason of every conv/linear layer, with its
    module paths; ``rule`` and ``r`` as for ``expand`` (or a resolved
    :class:`~expandfx.rules.spec.Spec`)."""
    require_module(model, "expand")
    spec = rule if isinstance(rule, Spec) else from_call("decide", rule, r, {})
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    view = graph_view(model, example_inputs)
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
    layers = [key for key, m in modules.items()
              if layer_types.is_layer(m) or _is_parametrized_layer(m)]
    handled = set(layers)
    described = [describe_layer(m, paths[key], view.call_sites[key] if view.checked else None)
                 for key, m in modules.items()  # every holder of a linear map's weight
                 if key in handled or unhandled_reason(m) is not None]
    for layer in described:
        _reject_lazy(layer.path, layer.module)
    _check_names(spec, include, exclude, described, [p for ps in paths.values() for p in ps])
    view.input_shapes = input_shapes(model, example_inputs, [v.module for v in described])
    output = view.output_layers if view.checked else _last_linear(
        [v for v in described if not v.unhandled], inside_block)
    ctx = _Context(view, spec, include, exclude, inside_block, _opaque_children(model),
                   owners, output)
    rows = []
    for layer in described:
        row = LayerPlan(path=layer.path, layer=layer.text, rule=None,
                        aliases=list(layer.aliases), module=layer.module,
                        call_sites=layer.call_sites, description=layer)
        row.config, row.reason = _choose(layer, ctx)
        row.rule = row.config.rule if row.config is not None else None
        rows.append(row)
    _check_rate_reached(spec, rows)
    return rows, view


def _check_names(spec: Spec, include: list[str] | None, exclude: list[str],
                 described: list[LayerView], modules: list[str]) -> None:
    """Exact names are requests (:func:`~expandfx.patterns.check_names`): in ``include=``,
    ``exclude=`` and the keys of a rule mapping, on every call."""
    layers = [p for v in described for p in (v.path, *v.aliases)]
    check_names(include, layers, "expand", "include=", modules=modules, stacklevel=5)
    check_names(exclude, layers, "expand", "exclude=", modules=modules, stacklevel=5)
    if isinstance(spec.table, dict):
        check_names(list(spec.table), layers, "expand", "rule mapping", modules=modules,
                    ordered=True, stacklevel=5)


def _check_rate_reached(spec: Spec, rows: list[LayerPlan]) -> None:
    """A rule callable given ``r=`` that picked only rules without a rate: ``r`` would be
    ignored (for strings and mappings :func:`~expandfx.rules.spec.from_call` says so up
    front; a callable's picks are known only now)."""
    chosen = {row.config.rule for row in rows if row.config is not None}
    if callable(spec.table) and spec.short.r is not None and chosen and not any(
            RULES[name].uses_r for name in chosen):
        users = sorted(n for n, x in RULES.items() if x.uses_r)
        raise ConfigError(f"expand: r={spec.short.r:g} would be ignored: the rule callable "
                          f"picked only rules that use no expansion rate ({sorted(chosen)}). "
                          f"Drop r=, or return a rule that uses it: {users}.")


def _choose(layer: LayerView, ctx: _Context) -> tuple[RuleConfig | None, str | None]:
    """``(config, None)`` or ``(None, reason)`` for one layer; a ConfigError when the user
    named this very layer (:func:`requested_explicitly`) and it cannot be expanded."""
    paths = [layer.path, *layer.aliases]
    rule, reason = _decide_layer(layer, ctx)
    how = how_requested(paths, ctx.include, ctx.rule)
    if reason is not None and how is not None and not _declined_by_user(reason):
        undo = ("drop it from include=" if how.startswith("include") else
                "map it to None or drop that key")
        raise ConfigError(f"expand: '{paths[0]}' was requested exactly ({how}) but cannot be "
                          f"expanded: {reason}. To leave it alone, {undo}.")
    return rule, reason


def _declined_by_user(reason: str) -> bool:
    """Reasons that are the user's own choice (exclude=, a mapping value of None), which an
    exact name does not override."""
    return reason.startswith("excluded by ") or reason.endswith(" gives None")


def _decide_layer(layer: LayerView, ctx: _Context) -> tuple[RuleConfig | None, str | None]:
    """``(config, None)`` or ``(None, reason)`` for one layer, in the order a user asks why."""
    path, module, paths = layer.path, layer.module, [layer.path, *layer.aliases]
    if id(module) in ctx.inside_block:
        return None, f"already part of the expanded block '{ctx.inside_block[id(module)]}'"
    if ctx.include is not None and first_match(path, ctx.include) is None:
        return None, "not matched by include"
    hit = first_match(path, ctx.exclude)
    if hit:
        return None, f"excluded by {hit!r}"
    if layer.unhandled:  # whatever the rule spec says: a pattern may match, the type is why
        return None, layer.unhandled
    config, reason = ctx.spec.pick(path, module, layer.kind)
    if config is None:
        return None, reason
    explicit = requested_explicitly(paths, ctx.include, ctx.rule)
    reason = (_unusable(path, module, explicit) or _not_plain(layer)
              or _tied(module, paths, ctx.owners) or _graph_reason(module, ctx))
    if reason:
        return None, reason

    build = _meta_builder(config, layer)
    reason = (transposed_reason(config.rule, layer)
              or RULES[config.rule].skip_reason(layer.torch)
              or capacity_reason(path, config.rule, layer.torch, config.r or 1.0, build)
              or shift_reason(layer, config, ctx.view, build))
    if reason:
        return None, reason
    if config.rule == "FC" and id(module) in ctx.output and not explicit:
        return None, _output_reason(path, ctx.view)
    return config, None


def _meta_builder(config: RuleConfig, layer: LayerView
                  ) -> Callable[[float | None], ExpandedBlock]:
    """``r -> block`` of ``config`` on ``layer`` (meta tensors; the rule's options, default
    init: shapes only); a rule that builds a wrong block is refused naming the layer."""
    shape_only = config.replace(init="default")

    def build(rate: float | None) -> ExpandedBlock:
        chosen = shape_only.replace(r=rate) if shape_only.r is not None else shape_only
        try:
            return chosen.build(layer.torch, path=layer.path, device="meta")
        except ContractionError as exc:  # the block's own check: the rule built a wrong block
            raise ConfigError(f"expand: rule {config.rule!r} could not build a block for "
                              f"'{layer.path}': {exc} Fix the rule's build, or exclude the "
                              f"layer.") from None
    return build


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
    except Exception as exc:  # the user's forward may raise anything
        raise inputs_rejected(model, inputs, exc) from exc
    finally:
        for h in handles:
            h.remove()
    return shapes


def _patterns(value: Patterns, name: str) -> list[str] | None:
    if value is None:
        return None if name == "include" else []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(p, str) for p in value):
        raise ConfigError(f"expand: {name} must be a glob pattern or a list of them, "
                          f"got {value!r}")
    return list(value)
