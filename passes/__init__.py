"""Graph passes, one per module (installed as ``expandfx.passes``).

- :mod:`expandfx.passes.expand_cl` — expand a convolution into 1×1 · K · 1×1.
- :mod:`expandfx.passes.expand_ck` — expand a k×k convolution (k > 3) into 3×3 layers.
- :mod:`expandfx.passes.expand_fc` — expand a linear layer into three.
- :mod:`expandfx.passes.contract` — fold every expanded block back into its layer.

Each expand pass exposes ``skip_reason(layer) -> str | None`` and
``build(layer, r, init="default", device=None) -> ExpandedBlock``.
"""

from types import ModuleType

from . import expand_ck, expand_cl, expand_fc

PASSES: dict[str, ModuleType] = {"CL": expand_cl, "CK": expand_ck, "FC": expand_fc}
