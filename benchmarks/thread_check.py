"""Do the accuracy study's conclusions depend on the torch thread count?

CPU kernels sum in a different order with another thread count, so single runs differ in
the last bits and, in an unstable recipe, a seed can diverge at one count and not at the
other. This script reruns a subset of the study at another thread count and compares it
cell by cell (data set × variant × lr: mean final test accuracy and divergent runs).

    python benchmarks/accuracy_study.py --threads 2 --jobs 1 --protocols sweep \\
        --variants compact,FC,CK,CK+FC,CL+FC --lrs 0.05,0.1 --out /tmp/threads2
    python benchmarks/thread_check.py results/accuracy_study.json \
        /tmp/threads2/accuracy_study.json [results/thread_check.md]   # output (default shown)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cells(path: Path) -> tuple[str, dict]:
    """``{(data set, variant, lr): {seed: run}}`` of the sweep protocol, from a results JSON
    or a (possibly unfinished) ``accuracy_study.partial.jsonl``."""
    if path.suffix == ".jsonl":
        runs = [json.loads(line) for line in path.read_text().splitlines()]
        setup = f"{runs[0]['threads']} thread(s) per run" if runs else "no runs"
    else:
        data = json.loads(path.read_text())
        runs, setup = data["runs"], data["meta"]["setup"]
    out: dict = {}
    for r in runs:
        if r["protocol"] == "sweep":
            out.setdefault((r["data"], r["variant"], r["lr"]), {})[r["seed"]] = r
    return setup, out


def main(argv: list[str]) -> int:
    (setup_a, a_all), (setup_b, b_all) = cells(Path(argv[0])), cells(Path(argv[1]))
    a, b = {}, {}  # the same seeds on both sides
    for key in set(a_all) & set(b_all):
        seeds = sorted(set(a_all[key]) & set(b_all[key]))
        a[key] = [a_all[key][s] for s in seeds]
        b[key] = [b_all[key][s] for s in seeds]
    lines = ["# Thread-count check of the accuracy study\n",
             f"A: {setup_a}. B: {setup_b}. Final test accuracy in % (mean over the same "
             f"seeds), divergent runs in brackets; Δ = B − A.\n",
             "| data set | variant | lr | seeds | A | B | Δ |",
             "|---|---|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for key in sorted(set(a) & set(b)):
        ma, mb = (statistics.fmean(r["last"] for r in x[key]) for x in (a, b))
        n = len(a[key])
        da, db = (sum(r["diverged"] for r in x[key]) for x in (a, b))
        worst = max(worst, abs(mb - ma))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {n} | {100 * ma:.2f} ({da}) | "
                     f"{100 * mb:.2f} ({db}) | {100 * (mb - ma):+.2f} |")
    lines.append(f"\nLargest |Δ|: {100 * worst:.2f} points over {len(set(a) & set(b))} cells.")
    out = Path(argv[2]) if len(argv) > 2 else RESULTS / "thread_check.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
