"""Tolerances of exactness: the error measure of ``docs/design.md §4`` and its limits.

- :func:`rel_error` — ``max |ref − got| / max |ref|`` over tensors or nested outputs;
- ``FOLD_TOLERANCES`` — the ``rel_error`` allowed between a model and its folded form;
- :func:`within` — ``error <= tolerance`` where NaN fails;
- :func:`model_dtype` — the dtype whose tolerance applies to a model.

Example::

    >>> import torch
    >>> rel_error(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -3.0]))
    0.25
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = ["FOLD_TOLERANCES", "model_dtype", "rel_error", "within"]

# rel_error allowed between a model and its folded form, per dtype (docs/design.md §4)
FOLD_TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3,
                   torch.bfloat16: 3e-2}


def rel_error(ref: Any, got: Any) -> float:
    """Largest ``max |ref − got| / max |ref|`` over the tensors of two (nested) outputs —
    any pytree: tuples, lists, dicts, transformers' ``ModelOutput``; numpy arrays are
    compared as tensors. A non-float tensor counts 1.0 if it differs at all; outputs of
    another structure or shape count ``inf``. NaN anywhere in either gives NaN (and inf in
    ``got`` where ``ref`` is finite gives inf), never a small number: compare the result with
    :func:`within`, for which NaN fails.

    >>> rel_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    nan
    """
    def tensors(tree: Any) -> list[torch.Tensor]:
        return [torch.as_tensor(t) for t in tree_leaves(tree)
                if isinstance(t, torch.Tensor) or hasattr(t, "__array__")]

    a, b = tensors(ref), tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not x.is_floating_point():
            err = float(not torch.equal(x, y))
        elif x.numel():
            x, y = x.detach().double(), y.detach().double()
            err = ((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item()
        else:
            continue
        if math.isnan(err) or math.isnan(worst):  # max() would drop a NaN (max(0.0, nan) == 0)
            worst = math.nan
        else:
            worst = max(worst, err)
    return worst


def within(error: float | None, tolerance: float) -> bool:
    """``error <= tolerance``, with NaN (and ``None``, never measured) failing.

    >>> within(1e-7, 1e-5), within(float("nan"), 1e-5), within(None, 1e-5)
    (True, False, False)
    """
    return error is not None and error <= tolerance


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
