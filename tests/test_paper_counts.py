"""Parameter counts of the expanded SmallNet 7x7 equal the ExpandNets paper's Table 6.

The published figures live in ``benchmarks/param_counts.py`` (imported by path:
``benchmarks/`` is not a package). Each figure is rounded to its printed digits,
so ours must lie within half a unit of the last digit (339.40K: ±5; 2.17M: ±5,000).
FC leaves the logit layer ``classifier.2`` unexpanded by default, as the paper does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "param_counts.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("param_counts_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
CELLS = [key for key in bench.PAPER if key[0] != "baseline"]


def test_baseline_is_exact():
    assert bench.count_params("baseline", 1) == bench.BASELINE_PARAMS == 150_346


def test_table_covers_every_rule_and_rate():
    assert sorted(CELLS) == sorted((rule, r) for rule in ("FC", "CL", "CK") for r in (2, 4, 8))



def test_default_fc_plan_leaves_the_logit_layer_alone():
    """docs/design.md §3: the default FC plan is the paper's (the output layer stays compact)."""
    import expandfx as efx
    from expandfx.models import smallnet_7x7_ablation

    rows = {row.path: row for row in efx.plan(smallnet_7x7_ablation(), "FC", 2).rows}
    assert rows["classifier.0"].rule == "FC" and rows["classifier.2"].rule is None
    assert "the model's output layer" in rows[bench.LOGIT_LAYER].reason
    assert "include=['*', 'classifier.2']" in rows[bench.LOGIT_LAYER].reason


@pytest.mark.parametrize(("text", "value", "tol"), [
    ("339.40K", 339_400, 5), ("2.17M", 2_170_000, 5_000), ("141.10 M", 141_100_000, 5_000),
    ("150.35K", 150_350, 5),
])
def test_parse_figure(text, value, tol):
    assert bench.parse_figure(text) == pytest.approx((value, tol))


@pytest.mark.parametrize(("rule", "r"), [("baseline", 1), *CELLS],
                         ids=lambda v: str(v))
def test_params_match_paper_to_its_rounding(rule, r):
    paper, tol = bench.parse_figure(bench.PAPER[rule, r][0])
    ours = bench.count_params(rule, r)
    assert abs(ours - paper) <= tol, (
        f"{rule} r={r}: {ours:,} params, paper {bench.PAPER[rule, r][0]} (±{tol:g})")


def test_fc_with_logit_layer_expanded_does_not_match():
    """Why FC excludes classifier.2: expanding the logit layer too misses the paper."""
    paper, tol = bench.parse_figure(bench.PAPER["FC", 2][0])
    assert abs(bench.count_params_fc_all(2) - paper) > tol
