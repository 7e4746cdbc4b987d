"""The expand pass: swap every planned conv/linear layer for an :class:`ExpandedBlock`.

Requires: an ``nn.Module`` (any class) whose conv/linear layers are plain or registered
layer classes; a rule spec and r, or a :class:`~expandfx.planning.Plan` of this model.
Ensures: a model of the same class (a copy unless ``inplace=True``) in which every planned
layer is a block computing a linear map the layer's class can express, called at every site
the layer was (checked after the swap, undone and refused otherwise); the given model is
left exactly as it was. Recipe: decide (or take the plan), build each block with its rule,
swap it in at every path, check the call sites.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Any

from torch import nn

from expandfx import hub, layer_types
from expandfx.block import ExpandedBlock, check_mode
from expandfx.copying import as_module, copy_model
from expandfx.errors import ConfigError, ContractionError
from expandfx.planning import LayerPlan, Patterns, Plan, decide
from expandfx.planning import plan as make_plan
from expandfx.planning.layers import describe_layer
from expandfx.planning.legality import norm_for_shift, transposed_reason
from expandfx.rules import RULES, find
from expandfx.rules.config import RuleConfig
from expandfx.rules.spec import RuleSpec, Shorthand, from_call
from expandfx.surgery import replace
from expandfx.tracing import GraphView, graph_view

__all__ = ["expand"]

log = logging.getLogger("expandfx")


def expand(model: nn.Module, rule: RuleSpec | None = None, r: float | None = None, *,
           include: Patterns = None, exclude: Patterns = None, example_inputs: Any = None,
           mode: str = "auto", inplace: bool = False, strict: bool = False,
           plan: Plan | None = None, **deprecated: Any) -> nn.Module:
    """Over-parameterize ``model``: each conv/linear layer becomes a linear chain or branches.

    Args:
        model: any ``nn.Module``; it is copied unless ``inplace=True``.
        rule: a rule config — ``efx.CL(r=4)``, ``efx.CK(r=2)``, ``efx.FC(r=4,
            init="preserve")``, ``efx.RepVGG(norm="bn")`` (:mod:`expandfx.rules.config`) —
            a ``+`` combination (``efx.CK(r=2) + efx.FC(r=4)``), a mapping ``{glob: config
            or None}`` (first match wins; each layer gets its own settings) or a callable
            ``(name, module) -> config | None``. Rule strings are shorthand for configs:
            ``"CL"``, ``"CK+FC"``, in mappings too. Default ``"CL"``.
        r: the rate of rule strings (shorthand: ``expand(model, "CK+FC", r=2)`` is
            ``expand(model, efx.CK(r=2) + efx.FC(r=2))``), for the rules that use it
            (widths ``r·m``, ``r·n``, rounded to multiples of groups); default 4.
        include, exclude: module-name glob patterns. A layer named by its exact path in
            ``include`` (or as the pattern of a rule mapping) is an explicit request: FC
            then expands it even if it is the model's output layer, and a layer that
            cannot be expanded raises instead of being skipped.
        example_inputs: optional positional inputs of ``forward``: MACs in the log, and the
            call-site checks of a model that FX cannot trace (recorded on one forward).
        mode: how blocks run while training: ``"auto"`` (default: per block and input
            shape, whichever of the two below runs faster when timed once on the first such
            input, the MAC model where it cannot time, see
            :func:`expandfx.execution.resolve_mode`), ``"collapsed"`` (compose
            the factors, run one layer: the compact layer's cost, same gradients) or
            ``"sequential"`` (the layers one after another, as in the paper).
            ``expandfx.set_mode`` switches later.
        inplace: modify ``model`` itself.
        strict: raise a ConfigError when no layer is expanded (by default: a warning with
            the most common skip reasons).
        plan: a :class:`~expandfx.planning.Plan` of this model from ``efx.plan``: carry out
            its decisions (its rule, r and per-layer choices) instead of deciding again —
            no second trace. The plan's rows carry their configs: leave ``rule``, ``r``,
            ``include``, ``exclude`` and ``example_inputs`` unset; a plan of another model
            (or of this model before it changed) is refused.
        init, norm: deprecated (``DeprecationWarning``; removed in the next release): the
            settings of the rule config, ``efx.CL(r=4, init="preserve")``,
            ``efx.RepVGG(norm="bn")``. Given here they apply to the rule strings' rules that
            take them, as before.

    Example::

        >>> import torch, expandfx as efx
        >>> from expandfx.models import smallnet_7x7
        >>> big = efx.expand(smallnet_7x7(), rule="CK+FC", r=2)
        >>> type(big).__name__, type(big.features[0]).__name__
        ('SmallNet', 'ExpandedBlock')
        >>> big = efx.expand(smallnet_7x7(), {"features.0": efx.CL(r=2),
        ...                                   "*": efx.CK(r=3) + efx.FC(r=2)})
        >>> big.features[0].rule, big.features[0].r, big.features[4].rule, big.features[4].r
        ('CL', 2.0, 'CK', 3.0)
    """
    unknown = sorted(set(deprecated) - {"init", "norm"})
    if unknown:
        raise TypeError(f"expand() got an unexpected keyword argument {unknown[0]!r}")
    model = as_module(model, "expand")
    if layer_types.is_layer(model):
        raise ConfigError(f"expand: the model is a single layer ({type(model).__name__}); expand "
                          f"cannot return the same class for it. Wrap it in a module, e.g. "
                          f"nn.Sequential(layer), or build an ExpandedBlock with "
                          f"expandfx.rules.cl.build(layer, r).")
    check_mode(mode)
    if plan is not None:
        _check_plan(plan, model, rule=rule, r=r, include=include, exclude=exclude,
                    example_inputs=example_inputs, **deprecated)
        rule = plan.rule
    else:
        spec = from_call("expand", "CL" if rule is None else rule, r, deprecated)
        rule = spec.source
        if log.isEnabledFor(logging.INFO):
            plan = make_plan(model, spec, include=include, exclude=exclude,
                             example_inputs=example_inputs)
    if plan is not None:
        rows, view = plan.rows, plan.view
        configs = {id(row): _row_config(row, plan) for row in rows if row.rule}
    else:
        rows, view = decide(model, spec, include=include, exclude=exclude,
                            example_inputs=example_inputs)  # the given model
        configs = {id(row): row.config for row in rows if row.rule}
    if not view.traced:
        warnings.warn(_untraced_message(model, view), stacklevel=2)
    if not any(row.rule for row in rows):
        _nothing_expanded(model, rule, rows, strict)
    target = model if inplace else copy_model(model, "expand")
    built = [(row, *_build(target, row, configs[id(row)], mode)) for row in rows if row.rule]
    for row, _, block in built:  # a bias-free layer with norm='bn': its shift needs a BN
        if block.shift_to_next_norm:
            why = norm_for_shift(view, row.module, row.path)
            if isinstance(why, str):
                raise ConfigError(f"expand: {row.rule} with norm='bn' on the bias-free layer "
                                  f"'{row.path}': {why}.")
    swapped = []  # every block is built before any is swapped in: a failure changes nothing
    for row, layer, block in built:
        paths = [row.path, *row.aliases]
        replace(target, paths, block)
        swapped.append((paths, layer, block, row.call_sites))
    if view.checked and swapped:
        _check_calls(target, swapped, example_inputs if view.recorded else None)
    if swapped:
        hub.guard(target)  # save_pretrained of an expanded model would save wrong weights
    if plan is not None:
        log.info("expand(rule=%r):\n%s", rule, plan)
    return target


def _row_config(row: LayerPlan, plan: Plan) -> RuleConfig | None:
    """A plan row's config; a row whose ``rule`` was edited to another name gets that rule
    with its defaults and the plan's shorthand ``r``."""
    if row.config is not None and row.config.rule == row.rule:
        return row.config
    rule = find(row.rule) if isinstance(row.rule, str) else None
    return None if rule is None else Shorthand(r=plan.r).config(rule)


def _build(target: nn.Module, row: LayerPlan, config: RuleConfig | None, mode: str
           ) -> tuple[nn.Module, ExpandedBlock]:
    """(the layer, its block) for one planned row; errors name the layer's path."""
    layer = target.get_submodule(row.path)
    described = row.description or describe_layer(layer, [row.path])
    rule = RULES.get(config.rule) if config is not None else None
    why = ("it is not a registered rule" if rule is None else
           f"it applies to {rule.kind} layers" if rule.kind != described.kind else
           transposed_reason(rule.name, described) or rule.skip_reason(described.torch))
    if why:  # only an edited plan gets here: decide() checks every rule it picks
        raise ConfigError(f"expand: the plan gives '{row.path}' rule {row.rule!r}, but "
                          f"{why}. Set that row's rule to None or another rule.")
    torch_layer = layer_types.as_torch(layer, path=row.path)  # the copy's weights, torch layout
    try:
        block = config.build(torch_layer, path=row.path)
    except ContractionError as exc:  # the block's own check: the rule built a wrong block
        raise ConfigError(f"expand: rule {row.rule!r} could not build a block for "
                          f"'{row.path}': {exc} Fix the rule's build, or exclude the layer."
                          ) from None
    layer_types.attach(block, layer, torch_layer)
    block.mode = mode
    return layer, block


def _check_plan(plan: Plan, model: nn.Module, **settings: Any) -> None:
    """A plan is carried out only on the model it was made for, with no other settings (its
    rows carry their configs)."""
    if not isinstance(plan, Plan) or plan.view is None:
        raise ConfigError(f"expand: plan= takes the Plan that expandfx.plan(model, ...) "
                          f"returns, got {type(plan).__name__}.")
    given = [name for name, value in settings.items() if value is not None]
    if given:
        raise ConfigError(f"expand: plan= already fixes the rule, r and every layer's choice; "
                          f"{', '.join(given)} would be ignored. Pass them to expandfx.plan "
                          f"instead, or call expand without plan=.")
    for row in plan.rows:
        try:
            same = model.get_submodule(row.path) is row.module
        except AttributeError:
            same = False
        if not same:
            raise ConfigError(f"expand: the plan's layer '{row.path}' is not this model's (the "
                              f"plan was made for another model, or the model changed since). "
                              f"Make the plan from this model: expandfx.plan(model, ...).")


def _untraced_message(model: nn.Module, view: GraphView) -> str:
    head = f"expand: torch.fx could not trace {type(model).__name__} ({view.error}); "
    if view.recorded:
        return head + ("call sites were recorded from one forward pass on example_inputs "
                       "instead. Checked on that pass: each layer is called as a module, how "
                       "often (shared layers), and that no layer's weight or bias is read "
                       "outside its own call. Not seen: code paths those inputs do not take "
                       "(other branches, training-only code). The expansion itself is exact.")
    return head + ("its layers were expanded by a module walk instead. Lost: the check that "
                   "each layer is called as a module (a layer whose weight is read directly, "
                   "e.g. by F.conv2d(x, self.conv.weight), would break), and the call-site "
                   "counts of shared layers; pass example_inputs to check them on a recorded "
                   "forward pass. The expansion itself is exact.")


def _nothing_expanded(model: nn.Module, rule: RuleSpec, rows: list[LayerPlan],
                      strict: bool) -> None:
    """Warn (or raise with ``strict=True``) that no layer matched, naming the top reasons."""
    reasons = Counter(row.reason for row in rows)
    top = "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common(3))
    message = (f"expand: rule {rule!r} expanded no layer of {type(model).__name__} "
               f"({len(rows)} layer{'' if len(rows) == 1 else 's'} holding a linear map's "
               f"weight{': ' + top if top else ''})"
               f". Check the rule, "
               f"include= and exclude= (expandfx.plan lists every layer's reason)")
    if strict:
        raise ConfigError(message + ".")
    warnings.warn(message + "; pass strict=True to raise instead.", stacklevel=3)


def _check_calls(target: nn.Module, swapped: list, example_inputs: Any = None) -> None:
    """The recipe's check: every block is called where its layer was; else undo and raise.

    Catches layers also referenced outside the module tree (a plain Python list, a
    closure), whose old copy would keep running untrained while the block is ignored.
    """
    after = graph_view(target, example_inputs)
    wrong = [paths[0] for paths, _, block, sites in swapped
             if not after.checked or after.call_sites[id(block)] != sites]
    if not wrong:
        return
    for paths, layer, _, _ in swapped:  # leave an in-place model as it was
        replace(target, paths, layer)
    why = (f"FX can no longer trace the model ({after.error})" if not after.checked else
           "their blocks are not called where the layers were")
    raise ConfigError(
        f"expand: after swapping in the expanded blocks, {why}: {wrong[:5]}. A layer is "
        f"probably also used through a reference outside the module tree (a plain Python "
        f"list or dict, a closure). Register such containers as nn.ModuleList/nn.ModuleDict, "
        f"or exclude those layers.")
