"""The plan as data and as a table: :class:`LayerPlan` (one layer), :class:`Plan` (all).

``str(plan)`` is a readable table of every conv/linear layer: the rule applied or the reason
it was skipped, parameters and MACs before → after.

Example::

    >>> import torch.nn as nn
    >>> row = LayerPlan(path="0", layer="Conv2d(3→8, k3)", rule="CL")
    >>> row.label
    'CL'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..formatting import human as _human
from ..formatting import text_table
from ..rules.config import RuleConfig
from ..rules.spec import RuleSpec
from ..tracing import GraphView
from .layers import LayerView

__all__ = ["LayerPlan", "Plan"]


@dataclass
class LayerPlan:
    """What happens to one conv/linear layer (one row of the plan).

    ``rule`` is the rule's name (``None``: left alone, with the ``reason``) and ``config``
    the :class:`~expandfx.rules.config.RuleConfig` it got (``CL(r=4)``). To edit a plan
    before ``expand(model, plan=p)``, set ``config`` to another config (or ``rule`` to
    ``None`` or another rule's name: that rule with its defaults and the plan's ``r``).
    ``description`` is the :class:`~expandfx.planning.layers.LayerView` every stage read.
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
    description: LayerView | None = field(default=None, repr=False, compare=False)

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


def _arrow(before: int | None, after: int | None) -> str:
    if before is None:
        return "?"
    return _human(before) if before == after else f"{_human(before)} → {_human(after)}"

