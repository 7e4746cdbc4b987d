"""The exceptions and warnings expandfx raises. Every message names the module path and the fix.

Each error also carries what a program needs to act on it without parsing the message:
``code`` (a stable identifier, e.g. ``"non_finite"``), ``where`` (the module path, parameter,
argument or file it is about) and ``numbers`` (the measured values it rests on);
``error.to_dict()`` is the JSON form reports embed.

Example::

    >>> err = NonFiniteError("fold: parameter '0.weight' holds 1 non-finite value (nan).",
    ...                      where="0.weight", numbers={"nan": 1, "inf": 0})
    >>> err.to_dict()["code"], err.to_dict()["where"], isinstance(err, ConfigError)
    ('non_finite', '0.weight', True)
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "ContractionError", "ExpandFXError", "ExpandFXWarning", "FoldError",
           "NonFiniteError", "failure"]


class ExpandFXError(Exception):
    """Base class of every error expandfx raises on purpose."""

    code = "expandfx_error"

    def __init__(self, message: str = "", *, code: str | None = None, where: str | None = None,
                 numbers: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.where = where
        self.numbers = dict(numbers or {})

    def to_dict(self) -> dict[str, Any]:
        """``{"error", "code", "where", "numbers", "message"}``: the machine-readable form."""
        return failure(self.code, str(self).split("\n")[0], where=self.where,
                       numbers=self.numbers, error=type(self).__name__)


class ConfigError(ExpandFXError, ValueError):
    """A bad argument or an input model that cannot be handled as asked.

    Example: ``expand(model, r=0)`` raises ``ConfigError("expand: r must be ...")``.
    """

    code = "bad_input"


class NonFiniteError(ConfigError):
    """NaN or inf in a parameter, buffer, input or output that a check was asked to trust.

    Example: ``fold`` of a model whose ``running_var`` diverged to NaN raises it, naming
    the buffer; it is never reported as "error 0".
    """

    code = "non_finite"


class ContractionError(ExpandFXError, RuntimeError):
    """An expanded block can no longer be folded exactly (e.g. it was edited)."""

    code = "not_exact"


class FoldError(ExpandFXError, ValueError):
    """A tree of linear maps that no single conv/linear layer computes (the reason says why).

    Example: a chain whose second convolution pads after a spatial first one cannot be one
    convolution (its border taps would read the first layer's zero-padded output).
    """

    code = "not_foldable"


class ExpandFXWarning(UserWarning):
    """What expandfx warns about (a glob that matches no layer, a pattern another one
    shadows, ...). Turn them into errors with
    ``warnings.simplefilter("error", expandfx.ExpandFXWarning)``."""


def failure(code: str, message: str, *, where: str | None = None,
            numbers: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One failure as reports record it: ``{"code", "where", "numbers", "message", ...}``.

    >>> failure("sqnr", "SQNR 3.1 dB < 20 dB", where="held-out", numbers={"db": 3.1})
    {'code': 'sqnr', 'where': 'held-out', 'numbers': {'db': 3.1}, 'message': 'SQNR 3.1 dB < 20 dB'}
    """
    return {"code": code, "where": where, "numbers": dict(numbers or {}), "message": message,
            **extra}
