"""The expansion plan: per layer, the rule applied or the reason it was skipped.

- :mod:`~expandfx.planning.layers` — each layer described once (:class:`LayerView`);
- :mod:`~expandfx.planning.decide` — :func:`plan` and :func:`decide` (what ``expand``
  carries out);
- :mod:`~expandfx.planning.legality` — every per-layer check, each with its reason;
- :mod:`~expandfx.planning.report` — :class:`Plan` / :class:`LayerPlan` and the table.
"""

from __future__ import annotations

from .decide import INITS, Patterns, decide, input_shapes, plan
from .layers import LayerView, describe, describe_layer
from .legality import check_r, requested_explicitly
from .report import LayerPlan, Plan

__all__ = ["INITS", "LayerPlan", "LayerView", "Patterns", "Plan", "check_r", "decide",
           "describe", "describe_layer", "input_shapes", "plan", "requested_explicitly"]
