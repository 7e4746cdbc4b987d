"""The training variants of the paper-reproduction scripts, in one place.

compact, FC, CL, CK, CL+FC, CK+FC, CK+FC+Init (nonlinear counterpart for the first half
of training), compander, compander+CK.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

import expandfx as efx

VARIANTS = ["compact", "FC", "CL", "CK", "CL+FC", "CK+FC", "CK+FC+Init", "compander",
            "compander+CK"]


def build_variant(variant: str, factory: Callable[[], nn.Module], epochs: int, r: float = 4.0,
                  a: float = 1.0, b: float = 0.7
                  ) -> tuple[nn.Module, Callable[[int], None] | None]:
    """The model of ``variant`` and a hook to call before each epoch (or None)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    model = factory()
    if variant == "compander":
        return efx.compand(model, a=a, b=b), None
    rule = variant.replace("+Init", "").replace("compander+", "")
    if rule != "compact":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = efx.expand(model, rule, r)
    if variant.startswith("compander+"):
        efx.compand(model, a=a, b=b)
    if not variant.endswith("+Init"):
        return model, None
    efx.nonlinear_counterpart(model)  # the paper's +Init: nonlinear first, then linear

    def hook(epoch: int) -> None:
        if epoch == epochs // 2:
            efx.linearize(model)
    return model, hook
