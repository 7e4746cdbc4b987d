"""Accuracy study at CPU scale: does expansion (or the compander) help compact nets train?

Two real data sets available offline — MNIST-1D (``mnist1d.make_dataset()``, 4000 train /
1000 test) with the in-repo 1D CNN (5-wide kernels, so CK applies), and scikit-learn's 8×8
digits with the paper's SmallNet shape adapted to 8×8 — and the variants of
``benchmarks/variants.py`` (r = 4, compander arctan a = 1, b = 0.7, when asked for: the
committed runs have no compander row). Two protocols:

- ``sweep`` (the fair one): every variant, the compact net included, trains with SGD
  (momentum 0.9, weight decay 5e-4, cosine, batch 64) and the learning rates of
  ``expandfx.param_groups`` (lr/N per factor) at each lr of ``LRS``; 20 % of the training
  set is held out for validation, and each variant's lr is chosen by its mean final
  validation accuracy. Reported: final test accuracy at the chosen lr (best vs best),
  with the count of divergent runs, and the whole lr × variant grid.
- ``authors``: the ExpandNets authors' own recipe (their ``exp_cifar`` code): SGD lr 0.01
  ÷10 after each third of training, momentum 0.9, no weight decay, default init, plain
  SGD on every parameter (no per-factor rule), the same for every model; for the
  variants their code trains (compact and the expansions, no compander, no +Init).

Seeds 0..4; every run at a fixed torch thread count with deterministic kernels, runs
spread over worker processes (the result of a run does not depend on how many run beside
it). Gradient confusion (min pairwise cosine of 8 mini-batch gradients) at the end of
training for compact, CL and CK.

    python benchmarks/accuracy_study.py              # full run, writes results/
    python benchmarks/accuracy_study.py --quick      # 1 seed, 2 epochs, 1 lr (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from variants import VARIANTS, build_variant, phases  # noqa: E402

import expandfx as efx  # noqa: E402
from expandfx.demo import accuracy, digits, fit, reproducible  # noqa: E402
from expandfx.diagnostics import gradient_confusion  # noqa: E402
from expandfx.models import CNN1D, smallnet_digits  # noqa: E402
from expandfx.optim import step_gain  # noqa: E402

RESULTS = Path(__file__).parent / "results"
R, A, B = 4.0, 1.0, 0.7
LRS = (0.05, 0.1, 0.2)  # brackets the best lr of every variant here (0.01-0.02 undertrain)
AUTHORS_VARIANTS = ("compact", "FC", "CL", "CK", "CL+FC", "CK+FC")  # as in their code
SEEDS = (0, 1, 2, 3, 4)
PRIORITY = ["compact", "FC", "CK+FC", "CL+FC", "CK+FC+Init", "CK", "CL", "compander",
            "compander+CK"]
PROTOCOLS = {  # name -> fit() keyword arguments (lr comes from the sweep or is fixed)
    "sweep": {"weight_decay": 5e-4, "chain_lr": "1/N", "schedule": "cosine"},
    # the same sweep with each block's lr divided by its measured step gain, re-measured
    # every 10 steps by fit() through ParamGroups.rescale (issue 10's follow-up)
    "sweep-measured": {"weight_decay": 5e-4, "chain_lr": "measured", "schedule": "cosine",
                       "rescale_every": 10},
    # lr/N corrected for the factors' growth, re-applied every 10 steps (ParamGroups.rescale)
    "sweep-norm": {"weight_decay": 5e-4, "chain_lr": "norm", "schedule": "cosine",
                   "rescale_every": 10},
    "authors": {"lr": 0.01, "weight_decay": 0.0, "chain_lr": None, "schedule": "step"},
}


def mnist1d(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """MNIST-1D generated offline by the ``mnist1d`` package (its default arguments)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    xt = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(data["y"]).long(), xt, torch.tensor(data["y_test"]).long()


DATASETS: dict[str, tuple[Callable[[], tuple], Callable[[], nn.Module], int]] = {
    "MNIST-1D (CNN1D)": (mnist1d, CNN1D, 20),
    "digits 8x8 (SmallNet)": (digits, smallnet_digits, 40),
}
_DATA: dict[tuple[str, bool], tuple] = {}


def split(dname: str, quick: bool) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """(train, test) data and the validation split: the last 20 % of the training set."""
    if (dname, quick) not in _DATA:
        xtr, ytr, xte, yte = DATASETS[dname][0]()
        if quick:  # a smoke run: a slice of the data
            xtr, ytr, xte, yte = xtr[:640], ytr[:640], xte[:256], yte[:256]
        cut = int(0.8 * len(ytr))
        _DATA[(dname, quick)] = ((xtr[:cut], ytr[:cut], xte, yte), (xtr[cut:], ytr[cut:]))
    return _DATA[(dname, quick)]


def measured_scale(block: nn.Module) -> float:
    """``lr / step_gain``: the folded weight steps as the compact layer's would (first order)."""
    return 1.0 / step_gain(block)


def one_run(task: tuple) -> dict:
    """Train one (protocol, data set, variant, lr, seed); the unit of work of a worker."""
    protocol, dname, variant, lr, seed, epochs, quick, threads = task
    with reproducible(threads):
        data, val = split(dname, quick)
        kwargs = {**PROTOCOLS[protocol], "lr": lr}
        if kwargs["chain_lr"] == "measured":
            kwargs["chain_lr"] = measured_scale
        torch.manual_seed(1000 + seed)
        model = build_variant(variant, DATASETS[dname][1], R, A, B)
        t0 = time.perf_counter()
        out = {"test": [], "val": [], "diverged": False}
        for phase in range(phases(variant)):
            if phase == 1:  # +Init: linearize the trained counterpart, calibrated, and
                model = efx.linearize(model, calibrate=data[0][:512].split(64))
                if kwargs["chain_lr"] == "1/N":  # size the factors' steps to their trained norms
                    kwargs["chain_lr"] = "norm"
            got = fit(model, data, epochs, seed + 100 * phase, f"{dname} {variant} "
                      f"lr{lr} s{seed}", val=val, **kwargs)
            out = {k: out[k] + got[k] for k in ("test", "val")} | {
                "diverged": out["diverged"] or got["diverged"]}
        rec = {"protocol": protocol, "data": dname, "variant": variant, "lr": lr,
               "seed": seed, "epochs": epochs, "quick": quick, "threads": threads, **out,
               "last": out["test"][-1], "val_last": out["val"][-1],
               "seconds": time.perf_counter() - t0}
        if not out["diverged"]:
            deployed = efx.contract(model) if variant != "compact" else model
            rec["deployed"] = accuracy(deployed, *data[2:])
            if variant in ("compact", "CL", "CK") and protocol.startswith("sweep"):
                gen = torch.Generator().manual_seed(seed)
                idx = torch.randperm(len(data[1]), generator=gen)[:8 * 64].split(64)
                model.eval()
                rec["confusion"] = gradient_confusion(
                    model, F.cross_entropy, [(data[0][i], data[1][i]) for i in idx])
    return rec


def tasks(quick: bool, threads: int, variants: list[str] | None = None,
          lrs: list[float] | None = None, protocols: list[str] | None = None,
          datasets: list[str] | None = None, epochs: int | None = None) -> list[tuple]:
    seeds, lrs = ((0,), (0.05,)) if quick else (SEEDS, lrs or LRS)
    fixed_epochs = epochs
    protocols = protocols or ["sweep", "authors"]  # the others are follow-ups, on request
    out = []
    order = sorted(variants or VARIANTS, key=lambda v: PRIORITY.index(v))  # most needed first
    for variant in order:
        for dname, (_, _, epochs) in DATASETS.items():
            if datasets and not any(dname.startswith(d) for d in datasets):
                continue
            epochs = 2 if quick else fixed_epochs or epochs
            for seed in seeds:
                for protocol in (p for p in protocols if p.startswith("sweep")):
                    out += [(protocol, dname, variant, lr, seed, epochs, quick, threads)
                            for lr in lrs]
                if "authors" in protocols and variant in AUTHORS_VARIANTS:
                    out.append(("authors", dname, variant, PROTOCOLS["authors"]["lr"], seed,
                                epochs, quick, threads))
    return out


def run(quick: bool, out: Path, jobs: int = 1, threads: int = 1, **subset: Any) -> list[dict]:
    """Train every task (or the ``variants``/``lrs``/``protocols`` subset) and write results."""
    todo = tasks(quick, threads, **subset)
    with reproducible(threads) as setup:
        print(f"{len(todo)} runs, {jobs} worker processes, each: {setup}", flush=True)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "accuracy_study.partial.jsonl"  # one line per finished run: resumable
    done = [json.loads(line) for line in partial.read_text().splitlines()] \
        if partial.exists() else []
    total = len(todo)
    records = [r for r in done if _key(r) in {_task_key(t) for t in todo}]
    todo = [t for t in todo if _task_key(t) not in {_key(r) for r in records}]
    if records:
        print(f"resuming: {len(records)} runs already in {partial}", flush=True)
    with contextlib.ExitStack() as stack:
        runs = map(one_run, todo)
        if jobs > 1:
            spawn = multiprocessing.get_context("spawn")  # no fork of a threaded torch
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=spawn))
            runs = pool.map(one_run, todo)
        for rec in runs:
            records.append(rec)
            with partial.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{len(records)}/{total} {rec['protocol']} {rec['data']} {rec['variant']}"
                  f" lr {rec['lr']:g} seed {rec['seed']}: {rec['last']:.4f}"
                  f"{' DIVERGED' if rec['diverged'] else ''}", flush=True)
    with reproducible(threads) as setup:
        pass
    meta = {"setup": setup, "jobs": jobs, "quick": quick, "minutes":
            (time.perf_counter() - t0) / 60, "date": time.strftime("%Y-%m-%d")}
    write(records, meta, out)
    return records


def _task_key(task: tuple) -> tuple:
    protocol, dname, variant, lr, seed, epochs, quick, threads = task
    return (protocol, dname, variant, lr, seed, epochs, quick, threads)


def _key(rec: dict) -> tuple:
    return (rec["protocol"], rec["data"], rec["variant"], rec["lr"], rec["seed"],
            rec["epochs"], rec["quick"], rec["threads"])


def failed(run: dict) -> bool:
    """Diverged (non-finite loss) or collapsed: ended within 1.5x of chance accuracy."""
    return run["diverged"] or run["last"] <= 1.5 / 10  # both data sets have 10 classes


def summarize(records: list[dict]) -> dict:
    """Per protocol, data set and variant: the chosen lr and its test accuracy."""
    cells: dict = {}
    for r in records:
        cells.setdefault((r["protocol"], r["data"], r["variant"]), {}).setdefault(
            r["lr"], []).append(r)
    table = {}
    for key, by_lr in cells.items():
        chosen = max(by_lr, key=lambda lr: statistics.fmean(r["val_last"] for r in by_lr[lr]))
        runs = by_lr[chosen]
        table[key] = {"lr": chosen, "runs": runs,
                      "diverged": sum(map(failed, runs)),
                      "diverged_any_lr": sum(failed(r) for v in by_lr.values() for r in v),
                      "grid": {lr: ([r["last"] for r in v], sum(map(failed, v)))
                               for lr, v in sorted(by_lr.items())}}
    return table


def _ms(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def write(records: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(records)
    seeds = sorted({r["seed"] for r in records})
    compander = (f"compander arctan a = {A:g}, b = {B:g}"
                 if any("compander" in r["variant"] for r in records)
                 else "the compander was not run")
    lines = [f"# Accuracy study (CPU scale)\n\nMeasured {meta['date']}, {meta['setup']} per "
             f"run ({meta['jobs']} worker processes, {meta['minutes']:.0f} min), seeds "
             f"{seeds}{' (QUICK RUN)' if meta['quick'] else ''} "
             f"(`python benchmarks/accuracy_study.py`). r = {R:g}; {compander}. "
             "CPU scale (MNIST-1D / digits); final-epoch test accuracy in % (mean ± std over "
             "seeds, n runs); div = failed runs: loss became non-finite (counted at chance "
             "accuracy) or training collapsed (final accuracy ≤ 15 %, chance is 10 %); "
             "'deployed' = the contracted compact model (equals the trained one). "
             "CK+FC+Init trains twice (nonlinear counterpart with He init, then "
             "`linearize(calibrate=…)` and the ExpandNet with `chain_lr=\"norm\"` in the "
             "sweep protocol), as the paper does.\n"]
    for protocol, what in (("sweep", "**Protocol sweep** — SGD momentum 0.9, weight decay "
                            "5e-4, cosine, `expandfx.param_groups` (lr/N per factor); lr "
                            f"from {list(LRS)} chosen per variant on a 20 % validation split "
                            "(best vs best)."),
                           ("sweep-measured", "**Protocol sweep-measured** — as sweep, but "
                            "each block's factors get lr / (its measured step gain, "
                            "`expandfx.optim.step_gain`), re-measured every 10 steps "
                            "(`ParamGroups.rescale`)."),
                           ("sweep-norm", "**Protocol sweep-norm** — as sweep, but with "
                            "`chain_lr=\"norm\"` (lr/N corrected for the factors' growth), "
                            "re-applied every 10 steps (`ParamGroups.rescale`)."),
                           ("authors", "**Protocol authors** — the ExpandNets authors' recipe:"
                            " SGD lr 0.01 ÷10 at 1/3 and 2/3 of training, momentum 0.9, no "
                            "weight decay, plain SGD on every parameter.")):
        rows = {k: v for k, v in table.items() if k[0] == protocol}
        if not rows:
            continue
        lines.append(f"\n{what}\n")
        for dname in DATASETS:
            lines += [f"\n### {dname}\n", "| variant | lr | test acc | n | div | deployed "
                      "| confusion | div at any lr |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for (_, d, variant), cell in rows.items():
                if d != dname:
                    continue
                runs = cell["runs"]
                dep = [r["deployed"] for r in runs if "deployed" in r]
                conf = [r["confusion"] for r in runs if "confusion" in r]
                lines.append(
                    f"| {variant} | {cell['lr']:g} | {_ms([r['last'] for r in runs])} | "
                    f"{len(runs)} | {cell['diverged']} | {_ms(dep) if dep else '—'} | "
                    f"{f'{statistics.fmean(conf):.3f}' if conf else ''} | "
                    f"{cell['diverged_any_lr']} |")
            if protocol.startswith("sweep"):
                lrs = sorted({lr for (p, d, _), c in rows.items() if d == dname
                              for lr in c["grid"]})
                lines += ["", "Every lr (test acc % mean ± std, divergent runs):", "",
                          "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                          "|---|" + "---:|" * len(lrs)]
                for (_, d, variant), cell in rows.items():
                    if d == dname:
                        lines.append(f"| {variant} | " + " | ".join(
                            f"{_ms(cell['grid'][lr][0])} ({cell['grid'][lr][1]})"
                            for lr in lrs) + " |")
    (out / "accuracy_study.md").write_text("\n".join(lines) + "\n")
    (out / "accuracy_study.json").write_text(json.dumps({"meta": meta, "runs": records}))
    plot(table, out / "accuracy_study.png")


def plot(table: dict, path: Path) -> None:
    """Mean test-accuracy curves of each variant at its chosen lr (protocol sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(6 * len(DATASETS), 4.5))
    for ax, dname in zip(axes, DATASETS, strict=True):
        lows = []
        for (protocol, d, variant), cell in table.items():
            if protocol != "sweep" or d != dname:
                continue
            curves = [r["test"] for r in cell["runs"]]
            mean = [statistics.fmean(v) for v in zip(*curves, strict=True)]
            mean = mean[-len(mean) // phases(variant):]  # +Init: its linear phase
            lows.append(min(mean[len(mean) // 2:]))
            ax.plot(range(1, len(mean) + 1), mean, label=f"{variant} (lr {cell['lr']:g})",
                    linestyle="--" if "compander" in variant else "-")
        ax.set_title(dname)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, lr 0.05")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--variants", type=lambda t: t.split(","), help="e.g. FC,CK+FC")
    parser.add_argument("--lrs", type=lambda t: [float(v) for v in t.split(",")])
    parser.add_argument("--protocols", type=lambda t: t.split(","), help="sweep,authors")
    parser.add_argument("--datasets", type=lambda t: t.split(","), help="e.g. digits,MNIST")
    parser.add_argument("--epochs", type=int, help="override every data set's epochs")
    args = parser.parse_args(argv)
    run(args.quick, args.out, args.jobs, args.threads, variants=args.variants, lrs=args.lrs,
        protocols=args.protocols, datasets=args.datasets, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
