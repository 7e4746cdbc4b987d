"""Expansion rules, one per file, and the rule specs that pick them per layer.

- :mod:`~expandfx.rules.base` — the :class:`Rule` protocol and registry;
- :mod:`~expandfx.rules.config` — rule configs (``efx.CL(r=4)``), validated when built;
- :mod:`~expandfx.rules.spec` — configs, rule strings, mappings and callables → one config
  per layer;
- :mod:`~expandfx.rules.factors` — widths, factor constructors, function-preserving init;
- one module per rule: :mod:`cl`, :mod:`ck`, :mod:`fc` (ExpandNets' chains),
  :mod:`acnet`, :mod:`repvgg`, :mod:`dbb`, :mod:`mobileone`, :mod:`orepa` (parallel
  branches; per-branch norms in :mod:`norms`). Every module of this package that
  defines ``RULE`` is registered on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import RULES, Rule, find, register_rule, unregister_rule

__all__ = ["RULES", "Rule", "find", "register_rule", "unregister_rule"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if isinstance(getattr(_module, "RULE", None), Rule):
        register_rule(_module.RULE)
