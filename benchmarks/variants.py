"""The training variants of the paper-reproduction scripts, in one place.

compact, FC, CL, CK, CL+FC, CK+FC, CK+FC+Init, compander, compander+CK. ``+Init`` is the
paper's protocol (supplement A.1): the nonlinear counterpart (ReLU between the factors,
He init) trains with the full recipe, then :func:`expandfx.linearize` removes the ReLUs,
rescales the blocks on a few calibration batches and re-estimates batch norm, and the
ExpandNet trains with the full recipe again (twice the epochs in all).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

import expandfx as efx

VARIANTS = ["compact", "FC", "CL", "CK", "CL+FC", "CK+FC", "CK+FC+Init", "compander",
            "compander+CK"]


def build_variant(variant: str, factory: Callable[[], nn.Module], r: float = 4.0,
                  a: float = 1.0, b: float = 0.7) -> nn.Module:
    """The model of ``variant`` (for ``+Init``: the nonlinear counterpart, phase 1)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    model = factory()
    if variant == "compander":
        return efx.compand(model, a=a, b=b)
    rule = variant.replace("+Init", "").replace("compander+", "")
    if rule != "compact":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = efx.expand(model, fc_rule(model, rule), r)
    if variant.startswith("compander+"):
        model = efx.compand(model, a=a, b=b)
    if variant.endswith("+Init"):
        model = efx.nonlinear_counterpart(model, "relu", init="he")
    return model


def fc_rule(model: nn.Module, rule: str) -> str | dict[str, str | None]:
    """``rule``, except where the net's only linear layer is its output layer.

    FC leaves the output (logit) layer alone by default, as the authors did. A net whose
    only linear layer is that one (the MNIST-1D CNN) would make every FC variant a copy of
    another variant, so there FC asks for the output layer explicitly: the hardest case
    for training stability (the logits come straight out of a linear chain).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if "FC" not in rule.split("+"):
        return rule
    rest = "+".join(p for p in rule.split("+") if p != "FC") or None
    return {linears[0]: "FC", "*": rest} if len(linears) == 1 else rule


def phases(variant: str) -> int:
    """How many trainings the variant runs: 2 for ``+Init`` (nonlinear, then linear)."""
    return 2 if variant.endswith("+Init") else 1
