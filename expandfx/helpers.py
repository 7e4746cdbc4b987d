"""The small helpers every part of expandfx shares, each in one place.

- :func:`rel_error` — ``max |ref − got| / max |ref|``, the measure of ``docs/design.md §4``,
  over tensors or nested outputs, and ``FOLD_TOLERANCES``, its limits for folding;
- :func:`randomize_factors` — trained-like factor weights, for checks that must not pass
  only because the factors are at init;
- :func:`first_match` — the first glob pattern a module path matches (include, exclude,
  rule mappings);
- :func:`text_table` — aligned plain-text columns (plans, compander summaries);
- :func:`human` — a parameter or MAC count for a message (``21.70M``).

Example::

    >>> import torch
    >>> rel_error(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -3.0]))
    0.25
    >>> first_match("features.0", ["classifier.*", "features.*"])
    'features.*'
    >>> print(text_table([("a", "bb"), ("ccc", "d")]))
    a    bb
    ccc  d
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .block import ExpandedBlock

__all__ = ["FOLD_TOLERANCES", "first_match", "human", "model_dtype", "randomize_factors",
           "rel_error", "text_table"]

# rel_error allowed between a model and its folded form, per dtype (docs/design.md §4)
FOLD_TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3,
                   torch.bfloat16: 3e-2}


def rel_error(ref: Any, got: Any) -> float:
    """Largest ``max |ref − got| / max |ref|`` over the tensors of two (nested) outputs —
    any pytree: tuples, lists, dicts, transformers' ``ModelOutput``; numpy arrays are
    compared as tensors. A non-float tensor counts 1.0 if it differs at all; outputs of
    another structure or shape count ``inf``."""
    def tensors(tree: Any) -> list[torch.Tensor]:
        return [torch.as_tensor(t) for t in tree_leaves(tree)
                if isinstance(t, torch.Tensor) or hasattr(t, "__array__")]

    a, b = tensors(ref), tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not x.is_floating_point():
            worst = max(worst, float(not torch.equal(x, y)))
        elif x.numel():
            x, y = x.detach().double(), y.detach().double()
            worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item())
    return worst


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def randomize_factors(model: nn.Module, seed: int = 0) -> None:
    """Fresh weights of a trained-like scale (``1/√fan-in``; 0.1 for vectors) in every
    expanded block of ``model``, from a seeded generator (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, ExpandedBlock)):
            for p in block.parameters():
                scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * scale)


def first_match(path: str, patterns: Iterable[str] | None) -> str | None:
    """The first glob pattern (``fnmatch``, case-sensitive) that ``path`` matches."""
    return next((p for p in patterns or () if fnmatchcase(path, p)), None)


def text_table(rows: Sequence[Sequence[Any]], rule_after_header: bool = False) -> str:
    """Rows as left-aligned columns two spaces apart (trailing spaces stripped); with
    ``rule_after_header`` a line of dashes under the first row."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    if rule_after_header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human(n: int) -> str:
    """A count for a message: ``21.70M``, ``512``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
