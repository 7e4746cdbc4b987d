"""The graph passes (installed as ``expandfx.passes``), each a recipe over a whole model.

- :mod:`expandfx.passes.expand` — ``expandfx.expand``: swap planned layers for expanded blocks.
- :mod:`expandfx.passes.contract` — fold every expanded block back into its layer.
- :mod:`expandfx.passes.fold` — ``expandfx.fold``: fold every linear subgraph of *any* traced
  model (conv/linear → eval BatchNorm, chains, summed branches: RepVGG, ACNet, DBB,
  MobileOne) into one plain layer, verified; the groups come from
  :mod:`expandfx.passes.linear_groups`.

Each module's docstring states what the pass requires and ensures. The expansion rules
themselves (CL, CK, FC, ACNet, RepVGG) live in :mod:`expandfx.rules`.
"""

__all__ = ["contract", "expand", "fold", "linear_groups"]
