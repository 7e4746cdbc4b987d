"""The exceptions expandfx raises. Every message names the module path and the fix."""

from __future__ import annotations


class ExpandFXError(Exception):
    """Base class of every error expandfx raises on purpose."""


class ConfigError(ExpandFXError, ValueError):
    """A bad argument or an input model that cannot be handled as asked.

    Example: ``expand(model, r=0)`` raises ``ConfigError("expand: r must be ...")``.
    """


class ContractionError(ExpandFXError, RuntimeError):
    """An expanded block can no longer be folded exactly (e.g. it was edited)."""
