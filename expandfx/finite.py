"""Non-finite values are errors: one home for finding NaN/inf in models, inputs and outputs.

- :func:`check_materialized` — no parameter or buffer on the meta device (it has no values);
- :func:`check_model` — every parameter *and buffer* (a NaN ``running_var`` after a diverged
  step is the common case), named in the error (:func:`check_named` for a chosen few);
- :func:`check_inputs` — the tensors of (nested) inputs;
- :func:`check_outputs` — a model's outputs; with ``allow=True`` non-finite outputs pass only
  where the reference has exactly the same non-finite values (masked log-probabilities);
- :func:`finite_rel_error` — :func:`~expandfx.tolerances.rel_error` over the positions where
  the reference is finite (inf where the non-finite values differ).

Each raises :class:`~expandfx.errors.NonFiniteError` whose message says "non-finite", names
the tensor and counts the values.

Example::

    >>> import torch, torch.nn as nn
    >>> m = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     m.weight[0, 0] = float("nan")
    >>> try:
    ...     check_model(m, "fold")
    ... except NonFiniteError as e:
    ...     print(e.where, e.numbers, "non-finite" in str(e))
    weight {'nan': 1, 'inf': 0} True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from .errors import ConfigError, NonFiniteError
from .tolerances import rel_error

__all__ = ["check_inputs", "check_materialized", "check_model", "check_named", "check_outputs",
           "count_nonfinite", "finite_rel_error"]


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, inf count)`` of a tensor (0, 0 for integer tensors and meta tensors)."""
    if not t.is_floating_point() and not t.is_complex() or t.device.type == "meta":
        return 0, 0
    t = t.detach()
    if bool(torch.isfinite(t).all()):  # one pass (and one sync) for the common case
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def _raise(verb: str, what: str, name: str, nan: int, inf: int, fix: str) -> None:
    raise NonFiniteError(f"{verb}: {what} '{name}' holds {nan + inf} non-finite value(s) "
                         f"({nan} NaN, {inf} inf). {fix}", where=name,
                         numbers={"nan": nan, "inf": inf})


def check_materialized(model: nn.Module, verb: str) -> None:
    """Raise :class:`ConfigError` if a parameter or buffer of ``model`` is on the meta device
    (shapes only, no values), naming the first and how to materialize the model.

    >>> with torch.device("meta"):
    ...     m = nn.Linear(2, 2)
    >>> try:
    ...     check_materialized(m, "fold")
    ... except ConfigError as e:
    ...     print(e.where, "to_empty" in str(e))
    weight True
    """
    meta = [(kind, name) for kind, items in (("parameter", model.named_parameters()),
                                             ("buffer", model.named_buffers()))
            for name, t in items if t.device.type == "meta"]
    if meta:
        (kind, name), more = meta[0], f" (and {len(meta) - 1} more)" if len(meta) > 1 else ""
        raise ConfigError(f"{verb}: {kind} '{name}'{more} is on the meta device and has no "
                          f"values to {verb}. Materialize the model first "
                          f"(model.to_empty(device='cpu') and load_state_dict).",
                          code="meta_device", where=name, numbers={"meta": len(meta)})


def check_named(items: Iterable[tuple[str, torch.Tensor]], verb: str,
                kind: str = "parameter") -> None:
    """Raise if a tensor of ``(name, tensor)`` pairs holds NaN or inf, naming the first."""
    for name, t in items:
        nan, inf = count_nonfinite(t)
        if nan or inf:
            fix = (f"Training diverged or the checkpoint is corrupt: restore a finite "
                   f"checkpoint (or lower the learning rate) before {verb}.")
            _raise(verb, kind, name, nan, inf, fix)


def check_model(model: nn.Module, verb: str, *, prefix: str = "") -> None:
    """Raise if any parameter or buffer of ``model`` holds NaN or inf, naming the first
    (``prefix.name``: ``model`` is the submodule at that path)."""
    dot = f"{prefix}." if prefix else ""
    check_named(((dot + n, t) for n, t in model.named_parameters()), verb, "parameter")
    check_named(((dot + n, t) for n, t in model.named_buffers()), verb, "buffer")


def _leaves(tree: Any) -> list[tuple[str, torch.Tensor]]:
    flat, _ = tree_flatten_with_path(tree)
    return [(keystr(path) or "[0]", t) for path, t in flat if isinstance(t, torch.Tensor)]


def check_inputs(inputs: Any, verb: str, what: str = "example_inputs") -> None:
    """Raise if a tensor of ``inputs`` (any pytree) holds NaN or inf, naming its position."""
    for key, t in _leaves(inputs):
        nan, inf = count_nonfinite(t)
        if nan or inf:
            _raise(verb, "input", f"{what}{key}", nan, inf,
                   "A check on non-finite inputs proves nothing: pass finite inputs.")


def check_outputs(reference: Any, got: Any | None, verb: str, *, allow: bool = False) -> None:
    """Raise if the reference outputs hold NaN or inf (unless ``allow``), or if ``got``'s
    non-finite values are not exactly the reference's (same positions, same values)."""
    ref = _leaves(reference)
    other = _leaves(got) if got is not None else [(k, None) for k, _ in ref]
    for (key, r), (_, g) in zip(ref, other, strict=False):
        nan, inf = count_nonfinite(r)
        if (nan or inf) and not allow:
            _raise(verb, "output", f"output{key}", nan, inf,
                   "The model computes NaN/inf on these inputs, so no comparison can verify "
                   "it; pass allow_nonfinite_outputs=True if that is intended (e.g. masked "
                   "log-probabilities), else fix the model or the inputs.")
        if g is None or not (r.is_floating_point() and g.is_floating_point()):
            continue
        if r.shape == g.shape and not _same_nonfinite(r, g):
            gn, gi = count_nonfinite(g)
            raise NonFiniteError(
                f"{verb}: output 'output{key}' has non-finite values at other positions than "
                f"the model's ({gn} NaN, {gi} inf against {nan} NaN, {inf} inf): the result "
                f"is wrong there.", where=f"output{key}",
                numbers={"nan": gn, "inf": gi, "reference_nan": nan, "reference_inf": inf})


def finite_rel_error(reference: Any, got: Any) -> float:
    """:func:`~expandfx.tolerances.rel_error` over the positions where ``reference`` is
    finite; ``inf`` where ``got``'s non-finite values are not exactly the reference's.

    >>> inf = float("inf")
    >>> finite_rel_error(torch.tensor([-inf, 4.0]), torch.tensor([-inf, 3.0]))
    0.25
    >>> finite_rel_error(torch.tensor([-inf, 4.0]), torch.tensor([0.0, 4.0]))
    inf
    """
    ref, other = _leaves(reference), _leaves(got)
    if len(ref) != len(other):
        return rel_error(reference, got)  # another structure: rel_error says inf
    masked_ref, masked_got = [], []
    for (_, r), (_, g) in zip(ref, other, strict=True):
        if r.is_floating_point() and g.is_floating_point() and r.shape == g.shape:
            if not _same_nonfinite(r, g):
                return float("inf")
            bad = ~torch.isfinite(r)
            r, g = r.masked_fill(bad, 0.0), g.masked_fill(bad, 0.0)
        masked_ref.append(r)
        masked_got.append(g)
    return rel_error(masked_ref, masked_got)


def _same_nonfinite(r: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether ``g`` is non-finite exactly where ``r`` is, with the same values there."""
    bad = ~torch.isfinite(r)
    return torch.equal(bad, ~torch.isfinite(g)) and torch.equal(
        r[bad].nan_to_num(0.0), g[bad].to(r.dtype).nan_to_num(0.0))
