"""``save_pretrained`` of an expanded Hugging Face model warns: contract first for deployment.

An expanded model keeps its class, so ``save_pretrained`` / ``push_to_hub`` write
``<layer>.layers.<i>.weight`` keys. Loaded back into the *same expansion* (``expand`` a fresh
model, then ``load_state_dict``, or the Trainer resuming its own checkpoint) they are right;
``from_pretrained`` of the compact class reports them as unexpected and keeps fresh weights —
a model that loads without an error and computes something else. ``expand`` therefore wraps
both methods of the expanded model with an :class:`~expandfx.errors.ExpandFXWarning` that
says so and how to save the compact model; ``contract`` removes the wrapper. (Warned rather
than refused: the Trainer saves checkpoints with ``save_pretrained`` while it trains, and
those resume correctly.)

Example::

    >>> import warnings, torch.nn as nn
    >>> class Hub(nn.Sequential):
    ...     def save_pretrained(self, path): return f"saved {path}"
    >>> m = Hub(nn.Linear(2, 2))
    >>> guard(m)
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     print(m.save_pretrained("x"), "contract" in str(w[0].message))
    saved x True
    >>> unguard(m); m.save_pretrained("y")
    'saved y'
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .errors import ExpandFXWarning

__all__ = ["guard", "unguard"]

_METHODS = ("save_pretrained", "push_to_hub")


class _Warned:
    """Stands in for ``save_pretrained`` / ``push_to_hub`` on an expanded model: warns, then
    calls the class's method (picklable and deep-copyable with its model)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        self.model, self.method = model, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"{self.method}: {type(self.model).__name__} holds expanded blocks, saved as "
            f"<layer>.layers.<i>.weight keys: they load back only into the same expansion "
            f"(efx.expand(fresh_model, same rule, same r)); from_pretrained of the compact "
            f"class would drop them and keep fresh weights without an error. For deployment "
            f"contract first: efx.contract(model).{self.method}(...).", ExpandFXWarning,
            stacklevel=2)
        return getattr(type(self.model), self.method)(self.model, *args, **kwargs)


def guard(model: nn.Module) -> None:
    """Wrap the model's hub-saving methods (if its class has them) with the warning."""
    for method in _METHODS:
        if callable(getattr(type(model), method, None)):
            model.__dict__[method] = _Warned(model, method)


def unguard(model: nn.Module) -> None:
    """Remove :func:`guard`'s wrappers."""
    for method in _METHODS:
        if isinstance(model.__dict__.get(method), _Warned):
            del model.__dict__[method]
