"""The expansion plan: per layer, the rule applied or the reason it was skipped.

- :mod:`~expandfx.planning.decide` — :func:`plan` and :func:`decide` (what ``expand``
  carries out);
- :mod:`~expandfx.planning.legality` — every per-layer check, each with its reason;
- :mod:`~expandfx.planning.report` — :class:`Plan` / :class:`LayerPlan` and the table.
"""

from __future__ import annotations

from .decide import INITS, Patterns, decide, input_shapes, plan
from .legality import check_r, requested_explicitly
from .report import LayerPlan, Plan, describe

__all__ = ["INITS", "LayerPlan", "Patterns", "Plan", "check_r", "decide", "describe",
           "input_shapes", "plan", "requested_explicitly"]
