"""The plan as data and as a table: :class:`LayerPlan` (one layer), :class:`Plan` (all).

``str(plan)`` is a readable table of every conv/linear layer: the rule applied or the reason
it was skipped, parameters and MACs before → after.

Example::

    >>> import torch.nn as nn
    >>> describe(nn.Conv2d(3, 8, 3, stride=2, padding=1))
    'Conv2d(3→8, k3, s2, p1)'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import registry
from ..formatting import human as _human
from ..formatting import text_table
from ..registry import base_type
from ..rules.config import RuleConfig
from ..rules.spec import RuleSpec
from ..tracing import GraphView

__all__ = ["LayerPlan", "Plan", "describe"]


@dataclass
class LayerPlan:
    """What happens to one conv/linear layer (one row of the plan).

    ``rule`` is the rule's name (``None``: left alone, with the ``reason``) and ``config``
    the :class:`~expandfx.rules.config.RuleConfig` it got (``CL(r=4)``). To edit a plan
    before ``expand(model, plan=p)``, set ``config`` to another config (or ``rule`` to
    ``None`` or another rule's name: that rule with its defaults and the plan's ``r``).
    """

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
    config: RuleConfig | None = None

    @property
    def label(self) -> str:
        """What the plan's rule column shows: the config, or the (edited) rule name."""
        if self.config is not None and self.rule == self.config.rule:
            return repr(self.config)
        return self.rule or "-"


@dataclass
class Plan:
    """All rows, plus what the graph view found beyond them; ``rule`` and ``r`` are the
    spec and shorthand rate as given (``None``: each rule's default); the rows carry the
    configs."""

    rows: list[LayerPlan]
    traced: bool
    trace_error: str | None = None
    notes: list[str] = field(default_factory=list)
    recorded: bool = False
    rule: RuleSpec = "CL"
    r: float | None = None
    view: GraphView | None = field(default=None, repr=False, compare=False)

    @property
    def expanded(self) -> list[LayerPlan]:
        return [row for row in self.rows if row.rule]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [row for row in self.rows if not row.rule]

    def totals(self) -> dict[str, int | None]:
        """Sums over the rows; MACs over the rows that have them (:attr:`uncounted` lists the
        others), ``None`` when no row has them (no ``example_inputs``)."""
        def total(attr: str) -> int | None:
            values = [getattr(row, attr) for row in self.rows]
            known = [v for v in values if v is not None]
            return sum(known) if known or not values else None
        return {k: total(k) for k in ("params_before", "params_after", "macs_before",
                                      "macs_after")}

    @property
    def uncounted(self) -> list[LayerPlan]:
        """Rows whose MACs the totals leave out: never called on ``example_inputs``, or a
        module whose cost the plan does not model (RNNs, attention)."""
        return [row for row in self.rows if row.macs_before is None]

    def __str__(self) -> str:
        head = ("layer", "type", "rule", "params", "MACs", "note")
        lines = [head]
        for row in self.rows:
            note = row.reason or ""
            if row.aliases:
                note = (note + "; " if note else "") + f"also at {', '.join(row.aliases)}"
            if row.call_sites and row.call_sites > 1:
                note = (note + "; " if note else "") + f"called at {row.call_sites} sites"
            lines.append((row.path, row.layer, row.label,
                          _arrow(row.params_before, row.params_after),
                          _arrow(row.macs_before, row.macs_after), note))
        t = self.totals()
        lines.append(("total", "", f"{len(self.expanded)}/{len(self.rows)}",
                      _arrow(t["params_before"], t["params_after"]),
                      _arrow(t["macs_before"], t["macs_after"]), ""))
        out = text_table(lines, rule_after_header=True).split("\n")
        left = self.uncounted
        if left and t["macs_before"] is not None:
            out.append(f"MAC totals leave out {len(left)} layer(s) with no MAC count: "
                       + ", ".join(f"{row.path} ({row.layer.partition('(')[0]})"
                                   for row in left))
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


def describe(layer: nn.Module) -> str:
    """``Conv2d(3→8, k7, s1, p3)`` — a short one-line description."""
    if isinstance(layer, (nn.RNNBase, nn.RNNCellBase)):
        layers = f", {layer.num_layers} layers" if getattr(layer, "num_layers", 1) > 1 else ""
        return f"{type(layer).__name__}({layer.input_size}→{layer.hidden_size}{layers})"
    if isinstance(layer, nn.MultiheadAttention):
        return f"{type(layer).__name__}({layer.embed_dim}, {layer.num_heads} heads)"
    torch_layer = registry.as_torch(layer, device="meta")
    if torch_layer is not layer:  # a registered class: Conv1D(32→96)
        return type(layer).__name__ + "(" + describe(torch_layer).partition("(")[2]
    kind = base_type(layer)
    if issubclass(kind, nn.Linear):
        return f"Linear({layer.in_features}→{layer.out_features})"
    extras = [f"k{_short(layer.kernel_size)}"]
    for attr, tag, default in (("stride", "s", 1), ("padding", "p", 0),
                               ("output_padding", "op", 0), ("dilation", "d", 1),
                               ("groups", "g", 1)):
        value = getattr(layer, attr, default)
        if _short(value) != str(default):
            extras.append(f"{tag}{_short(value)}")
    if layer.padding_mode != "zeros":
        extras.append(layer.padding_mode)
    return f"{kind.__name__}({layer.in_channels}→{layer.out_channels}, {', '.join(extras)})"


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

