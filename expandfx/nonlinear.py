"""Nonlinear-counterpart initialization (the ExpandNets paper's "+Init", supplement A.1).

Train the expanded model first *with* a nonlinearity between the layers of every block
(the nonlinear counterpart), then remove the nonlinearities keeping the weights, train on
as an ExpandNet, and contract. ``contract`` refuses a block that still has its
nonlinearity.

Example::

    >>> import expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.nonlinear_counterpart(efx.expand(smallnet_7x7(), "CK+FC", r=4))
    >>> type(big.features[0].act).__name__
    'ReLU'
    >>> # ... train big ...
    >>> big = efx.linearize(big)     # weights kept; now an ExpandNet again
    >>> small = efx.contract(big)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .block import ExpandedBlock
from .errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
}


def nonlinear_counterpart(model: nn.Module, act: str | Callable[[], nn.Module] = "relu"
                          ) -> nn.Module:
    """Put a fresh ``act`` between the layers of every expanded block (in place)."""
    make = ACTIVATIONS.get(act) if isinstance(act, str) else act
    hint = (f"act must be one of {sorted(ACTIVATIONS)} or a zero-argument callable returning "
            f"an nn.Module (pass nn.ReLU, not nn.ReLU())")
    if make is None or not callable(make) or isinstance(make, nn.Module):
        raise ConfigError(f"nonlinear_counterpart: {hint}; got {act!r}.")
    found = _blocks(model, "nonlinear_counterpart")
    for block in found:
        try:
            module = make()
        except Exception as exc:
            raise ConfigError(f"nonlinear_counterpart: calling {act!r} failed ({exc}); {hint}."
                              ) from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"nonlinear_counterpart: {act!r} returned "
                              f"{type(module).__name__}; {hint}.")
        ref = block.layers[0].weight
        block.act = module.to(device=ref.device, dtype=ref.dtype)
    return model


def linearize(model: nn.Module) -> nn.Module:
    """Remove the nonlinearities of :func:`nonlinear_counterpart` (in place); weights stay."""
    for block in _blocks(model, "linearize"):
        block.act = None
    return model


def _blocks(model: nn.Module, caller: str) -> list[ExpandedBlock]:
    found = [m for m in model.modules() if isinstance(m, ExpandedBlock)]
    if not found:
        raise ConfigError(f"{caller}: {type(model).__name__} has no expanded blocks; call "
                          f"expandfx.expand(model, ...) first.")
    return found
