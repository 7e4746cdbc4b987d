"""The graph passes (installed as ``expandfx.passes``), each a recipe over a whole model.

- :mod:`expandfx.passes.contract` — fold every expanded block back into its layer.

The expansion rules themselves (CL, CK, FC, ACNet, RepVGG) live in :mod:`expandfx.rules`.
"""
