"""Conformance table over the torchvision / timm model zoo (random init, input 2x3x64x64).

For every model and applicable rule (r = 2): layers expanded, layers skipped with their
reasons, parameters at train and test time, expand and contract wall time, and the largest
relative error, per layer and end to end, after randomizing the expanded factors.

    python benchmarks/conformance.py       # writes benchmarks/results/conformance.md (~2 min)
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import conftest  # noqa: E402,F401  (torchvision import workaround of this machine)

from expandfx.conformance import (  # noqa: E402
    ZOO,
    ZOO_INPUT,
    applicable_rules,
    build_zoo_model,
    roundtrip_record,  # noqa: E402
)

RESULTS = Path(__file__).parent / "results"


def short_reason(reason: str) -> str:
    for key in ("does not apply", "no odd size", "overrides", "inside", "tied",
                "never called", "used directly", "even size"):
        if key in reason:
            return key
    return reason[:40]


def main() -> int:
    torch.set_num_threads(2)
    rows = []
    for name in ZOO:
        torch.manual_seed(0)
        model = build_zoo_model(name).eval()
        x = torch.randn(ZOO_INPUT)
        for rule in applicable_rules(model):
            rec = roundtrip_record(model, rule, 2, x)
            reasons = Counter(short_reason(r) for r in rec["skipped"].values())
            rows.append({"model": name, "rule": rule, "expanded": rec["expanded"],
                         "skipped": dict(reasons), "params_train": rec["params_train"],
                         "params_test": rec["params_test"], "expand_s": rec["expand_s"],
                         "contract_s": rec["contract_s"], "layer_error": rec["layer_error"],
                         "output_error": rec["output_error"],
                         "exact": rec["layer_error"] <= 1e-5 and rec["output_error"] <= 1e-5
                         and rec["keys_equal"] and rec["class_equal"]})
            print(f"{name:28} {rule}  {rec['expanded']:4d} expanded  "
                  f"err {rec['layer_error']:.1e}/{rec['output_error']:.1e}", flush=True)
    lines = ["| model | rule | expanded | skipped (reason × count) | params train | params test "
             "| expand s | contract s | max layer err | output err | exact |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        skipped = ", ".join(f"{k} ×{v}" for k, v in r["skipped"].items()) or "—"
        lines.append(f"| {r['model']} | {r['rule']} | {r['expanded']} | {skipped} | "
                     f"{r['params_train'] / 1e6:.2f}M | {r['params_test'] / 1e6:.2f}M | "
                     f"{r['expand_s']:.2f} | {r['contract_s']:.2f} | {r['layer_error']:.1e} | "
                     f"{r['output_error']:.1e} | {'yes' if r['exact'] else 'NO'} |")
    RESULTS.mkdir(exist_ok=True)
    header = (f"# Conformance: torchvision and timm models\n\nMeasured "
              f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, r = 2, input "
              f"{list(ZOO_INPUT)}, eval mode, factors randomized after expansion "
              f"(`python benchmarks/conformance.py`). Errors are max |diff| / max |out|, per "
              f"expanded layer on its own input and end to end; exact means both ≤ 1e-5 and "
              f"the contracted model has the original class and state_dict keys. Skip "
              f"reasons: 'does not apply' = the rule is for the other layer type; 'no odd "
              f"size' = CK on k ≤ 3; 'overrides' = a subclass with its own forward.\n\n")
    (RESULTS / "conformance.md").write_text(header + "\n".join(lines) + "\n")
    (RESULTS / "conformance.json").write_text(json.dumps(rows, indent=1))
    print(f"{sum(r['exact'] for r in rows)}/{len(rows)} model×rule cases exact")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
