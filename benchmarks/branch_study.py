"""Which reparameterization makes a compact net better? Branch rules × per-branch norms.

Variants: the compact net, the ExpandNets chains (CL, CK, FC, CK+FC at r = 4, as in
``benchmarks/variants.py``) and every branch rule (RepVGG, ACNet, DBB, MobileOne with k = 4)
with each norm (``None``, ``"scale"`` — OREPA, ``"bn"`` — per-branch BatchNorm as
published); written ``RULE`` / ``RULE/scale`` / ``RULE/bn``. Tasks: scikit-learn's 8×8
digits with SmallNet (as in ``accuracy_study.py``) and a deliberately narrow 1D CNN on
MNIST-1D (widths 8, 8, 8 — the compact net underfits). ACNet is 2-D only, so it runs on
digits only.

Protocol (``accuracy_study.py``'s ``sweep``): SGD momentum 0.9, weight decay 5e-4, cosine,
batch 64, ``expandfx.param_groups`` (lr/N per factor); the lr of every variant, the
compact net included, swept over ``LRS`` and chosen on a 20 % validation split by mean
final validation accuracy; final test accuracy at the chosen lr (best vs best); failed runs
(non-finite loss, or ≤ 15 % accuracy) counted; seeds 0..4; 1 torch thread per run,
deterministic kernels. Resumable: finished runs are appended to
``results/branch_study.partial.jsonl`` and skipped when the script runs again; the tables are
written from whatever has finished (cells with fewer than 5 seeds say so).

    python benchmarks/branch_study.py --jobs 2            # writes results/branch_study.*
    python benchmarks/branch_study.py --quick --out /tmp  # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_study as study  # noqa: E402
from variants import build_variant  # noqa: E402

import expandfx as efx  # noqa: E402
from expandfx.demo import accuracy, digits, fit, reproducible  # noqa: E402
from expandfx.linear.ir import explicit_padding, pairs_from_pad  # noqa: E402
from expandfx.models import CNN1D, smallnet_digits  # noqa: E402
from expandfx.rules import find  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LRS = (0.05, 0.1, 0.2)
SEEDS = (0, 1, 2, 3, 4)
EPOCHS = 10
BRANCH = ["RepVGG", "DBB", "MobileOne", "ACNet"]
CHAINS = ["CK+FC", "CK", "CL", "FC"]
# the control: one branch (the layer itself) with its own BatchNorm, folded at the end — is
# a gain the branches' or only the added normalization's?
VARIANTS = ["compact", "Single/bn",
            *[f"{rule}{suffix}" for rule in BRANCH for suffix in ("", "/scale", "/bn")],
            *CHAINS]


def _single(conv: nn.Module, r: float = 1.0, init: str = "default", *, path: str = "",
            device=None, norm: str | None = None) -> efx.ExpandedBlock:
    """One branch: a copy of the layer's geometry, then ``norm``."""
    from expandfx.rules.factors import conv_factor
    from expandfx.rules.norms import add_norms

    pads = tuple(a for a, _ in pairs_from_pad(explicit_padding(conv)))
    kxk = conv_factor(conv, conv.in_channels, conv.out_channels, conv.kernel_size,
                      stride=conv.stride, padding=pads, dilation=conv.dilation,
                      padding_mode=conv.padding_mode, device=device)
    branches = add_norms(conv, {"kxk": kxk}, norm, init, rule="Single", path=path,
                         device=device)
    return efx.ExpandedBlock(conv, branches, rule="Single", r=r)


if find("Single") is None:
    efx.register_rule(efx.Rule("Single", "conv", lambda conv: None, _single,
                               "the layer alone, with a per-branch norm (a control)",
                               options=frozenset({"norm"})))


def narrow_cnn1d() -> nn.Module:
    return CNN1D(widths=(8, 8, 8))


DATASETS = {
    "MNIST-1D (narrow CNN1D 8-8-8)": (study.mnist1d, narrow_cnn1d),
    "digits 8x8 (SmallNet)": (digits, smallnet_digits),
}
study.DATASETS.update({k: (*v, EPOCHS) for k, v in DATASETS.items()})  # for study.split


def applies(variant: str, dname: str) -> bool:
    return not (variant.startswith("ACNet") and "MNIST-1D" in dname)  # ACNet: 2-D only


def build(variant: str, factory) -> nn.Module:
    rule, _, norm = variant.partition("/")
    if rule == "compact" or rule in CHAINS:
        return build_variant(rule, factory, 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return efx.expand(factory(), find(rule)(norm=norm or None))


def one_run(task: tuple) -> dict:
    dname, variant, lr, seed, epochs, quick, threads = task
    with reproducible(threads):
        data, val = study.split(dname, quick)
        torch.manual_seed(1000 + seed)
        model = build(variant, DATASETS[dname][1])
        t0 = time.perf_counter()
        got = fit(model, data, epochs, seed, f"{dname[:8]} {variant} lr{lr} s{seed}", val=val,
                  lr=lr, **{k: v for k, v in study.PROTOCOLS["sweep"].items()})
        rec = {"protocol": "sweep", "data": dname, "variant": variant, "lr": lr, "seed": seed,
               "epochs": epochs, "quick": quick, "threads": threads, **got,
               "last": got["test"][-1], "val_last": got["val"][-1],
               "seconds": time.perf_counter() - t0}
        if not got["diverged"]:
            model.eval()
            rec["deployed"] = accuracy(efx.contract(model) if variant != "compact" else model,
                                       *data[2:])
    return rec


def tasks(quick: bool, threads: int, variants: list[str] | None, epochs: int) -> list[tuple]:
    seeds, lrs = ((0,), (0.1,)) if quick else (SEEDS, LRS)
    return [(dname, v, lr, seed, 1 if quick else epochs, quick, threads)
            for v in variants or VARIANTS for dname in DATASETS if applies(v, dname)
            for seed in seeds for lr in lrs]


def key(rec) -> tuple:
    if isinstance(rec, tuple):
        return rec
    return (rec["data"], rec["variant"], rec["lr"], rec["seed"], rec["epochs"], rec["quick"],
            rec["threads"])


def run(quick: bool, out: Path, jobs: int, threads: int, variants, epochs: int,
        report_only: bool = False) -> None:
    todo = tasks(quick, threads, variants, epochs)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "branch_study.partial.jsonl"
    done = [json.loads(line) for line in partial.read_text().splitlines()] \
        if partial.exists() else []
    wanted = {key(t) for t in todo}
    records = [r for r in done if key(r) in wanted]
    have = {key(r) for r in records}
    todo = [t for t in todo if key(t) not in have]
    if report_only:  # the tables from the runs finished so far
        print(f"report only: {len(records)} runs finished, {len(todo)} not run", flush=True)
        todo = []
    with reproducible(threads) as setup:
        print(f"{len(todo)} runs to go ({len(records)} done), {jobs} workers, each: {setup}",
              flush=True)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        runs = map(one_run, todo)
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn")))
            runs = pool.map(one_run, todo)
        for rec in runs:
            records.append(rec)
            with partial.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{len(records)} {rec['data'][:8]} {rec['variant']} lr {rec['lr']:g} "
                  f"seed {rec['seed']}: {rec['last']:.4f} ({rec['seconds']:.0f} s)"
                  f"{' DIVERGED' if rec['diverged'] else ''}", flush=True)
    meta = {"setup": setup, "jobs": jobs, "quick": quick, "epochs": epochs,
            "finished": len(records), "planned": len(wanted),
            "minutes_this_call": (time.perf_counter() - t0) / 60,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    write(records, meta, out, variants or VARIANTS)


def write(records: list[dict], meta: dict, out: Path, variants: list[str]) -> None:
    table = study.summarize(records)
    lines = [
        "# Branch reparameterization study (CPU scale)\n",
        f"Measured {meta['date']}, {meta['setup']}, {meta['jobs']} worker processes, "
        f"{meta['epochs']} epochs{' (QUICK RUN)' if meta['quick'] else ''} "
        f"(`python benchmarks/branch_study.py`). Protocol sweep of `accuracy_study.py`: SGD "
        f"momentum 0.9, wd 5e-4, cosine, `param_groups` lr/N; lr from {list(LRS)} chosen per "
        f"variant on a 20 % validation split (best vs best); seeds {list(SEEDS)}. Final-epoch "
        f"test accuracy in % (mean ± std over the seeds that finished, n); div = failed runs "
        f"at the chosen lr (non-finite loss or ≤ 15 %), 'div any lr' over the whole sweep; "
        f"Δ = mean difference to the compact net's chosen cell (points). Rules: RepVGG, ACNet, "
        f"DBB, MobileOne (k = 4) with norm None / `scale` (OREPA) / `bn` (per-branch "
        f"BatchNorm); `Single/bn` = the layer with one BatchNorm of its own, folded at the end "
        f"(the control: is a gain the branches' or the added normalization's?); chains at "
        f"r = 4. ACNet is 2-D only (digits only). Runs finished: "
        f"{meta['finished']} of {meta['planned']} planned (a cell with n < 5 is "
        f"incomplete; 'not run' rows were not reached).\n"]
    for dname in DATASETS:
        rows = {v: table.get(("sweep", dname, v)) for v in variants if applies(v, dname)}
        base = rows.get("compact")
        base_mean = statistics.fmean(r["last"] for r in base["runs"]) if base else None
        lines += [f"\n## {dname}\n", "| variant | lr | test acc | Δ vs compact | n | div | "
                  "div any lr | deployed | s/run |", "|---|" + "---:|" * 8]
        for v, cell in rows.items():
            if cell is None:
                lines.append(f"| {v} | not run | | | 0 | | | | |")
                continue
            runs = cell["runs"]
            accs = [r["last"] for r in runs]
            dep = [r["deployed"] for r in runs if "deployed" in r]
            delta = "" if base_mean is None else \
                f"{100 * (statistics.fmean(accs) - base_mean):+.2f}"
            lines.append(f"| {v} | {cell['lr']:g} | {study._ms(accs)} | {delta} | {len(runs)} | "
                         f"{cell['diverged']} | {cell['diverged_any_lr']} | "
                         f"{study._ms(dep) if dep else '—'} | "
                         f"{statistics.fmean(r['seconds'] for r in runs):.0f} |")
        lines += ["", "Every lr (test acc %, mean ± std (failed runs) [n]):", "",
                  "| variant | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |",
                  "|---|" + "---:|" * len(LRS)]
        for v, cell in rows.items():
            if cell is not None:
                lines.append(f"| {v} | " + " | ".join(
                    f"{study._ms(cell['grid'][lr][0])} ({cell['grid'][lr][1]}) "
                    f"[{len(cell['grid'][lr][0])}]" if lr in cell["grid"] else "—"
                    for lr in LRS) + " |")
    (out / "branch_study.md").write_text("\n".join(lines) + "\n")
    (out / "branch_study.json").write_text(json.dumps({"meta": meta, "runs": records}))
    plot(table, out / "branch_study.png", variants)


def plot(table: dict, path: Path, variants: list[str]) -> None:
    """Per task: each variant's chosen-lr test accuracy, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(7 * len(DATASETS), 5))
    for ax, dname in zip(axes, DATASETS, strict=True):
        names, means, stds = [], [], []
        for v in variants:
            cell = table.get(("sweep", dname, v))
            if cell is None:
                continue
            accs = [100 * r["last"] for r in cell["runs"]]
            names.append(v)
            means.append(statistics.fmean(accs))
            stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        colours = ["grey" if n == "compact" else "tab:blue" if "/scale" in n else
                   "tab:red" if "/bn" in n else "tab:green" for n in names]
        ax.barh(names, means, xerr=stds, color=colours)
        if "compact" in names:
            ax.axvline(means[names.index("compact")], color="grey", linestyle="--")
        lo = min((m - s for m, s in zip(means, stds, strict=True)), default=0)
        ax.set_xlim(max(0, lo - 2), 100)
        ax.invert_yaxis()
        ax.set_title(dname, fontsize=10)
        ax.set_xlabel("test accuracy % at the chosen lr (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, lr 0.1")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--variants", type=lambda t: t.split(","))
    parser.add_argument("--report", action="store_true",
                        help="only write the tables from the runs finished so far")
    args = parser.parse_args(argv)
    run(args.quick, args.out, args.jobs, args.threads, args.variants, args.epochs,
        report_only=args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
