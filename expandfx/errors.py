"""The exceptions expandfx raises. Every message names the module path and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "ContractionError", "ExpandFXError", "FoldError"]


class ExpandFXError(Exception):
    """Base class of every error expandfx raises on purpose."""


class ConfigError(ExpandFXError, ValueError):
    """A bad argument or an input model that cannot be handled as asked.

    Example: ``expand(model, r=0)`` raises ``ConfigError("expand: r must be ...")``.
    """


class ContractionError(ExpandFXError, RuntimeError):
    """An expanded block can no longer be folded exactly (e.g. it was edited)."""


class FoldError(ExpandFXError, ValueError):
    """A tree of linear maps that no single conv/linear layer computes (the reason says why).

    Example: a chain whose second convolution pads after a spatial first one cannot be one
    convolution (its border taps would read the first layer's zero-padded output).
    """
