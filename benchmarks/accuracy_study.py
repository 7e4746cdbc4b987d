"""Accuracy study at CPU scale: do expansion and the compander help compact nets train?

Two real data sets available offline — MNIST-1D (``mnist1d.make_dataset()``, 4000 train /
1000 test) with the in-repo 1D CNN (5-wide kernels, so CK applies), and scikit-learn's 8×8
digits with the paper's SmallNet shape adapted to 8×8 — and the variants compact, FC, CL,
CK, CL+FC, CK+FC, CK+FC+Init, compander, compander+CK (r = 4, compander arctan a = 1,
b = 0.7). Every variant uses the same optimizer, schedule and epochs, tuned for the compact
network (as the paper does): SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine, batch 64.
Seeds 0..4. Gradient confusion (min pairwise cosine of 8 mini-batch gradients) at the end
of training for compact, CL and CK.

    python benchmarks/accuracy_study.py            # full run (~10 min), writes results/
    python benchmarks/accuracy_study.py --quick    # 1 seed, 2 epochs, 512 images (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from variants import VARIANTS, build_variant  # noqa: E402

import expandfx as efx  # noqa: E402
from expandfx.analysis import gradient_confusion  # noqa: E402
from expandfx.demo import accuracy, digits, train  # noqa: E402
from expandfx.models import CNN1D, smallnet_digits  # noqa: E402

RESULTS = Path(__file__).parent / "results"
R, A, B = 4.0, 1.0, 0.7
# +Init as the paper runs it: train the nonlinear counterpart with the full schedule, then
# remove the nonlinearities and train the ExpandNet with the full schedule again (2x epochs).
PAPER_INIT = "CK+FC+Init(2x)"
STUDY_VARIANTS = [*VARIANTS, PAPER_INIT]


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
    "MNIST-1D (CNN1D)": (mnist1d, CNN1D, 30),
    "digits 8x8 (SmallNet)": (digits, smallnet_digits, 40),
}


def run(quick: bool, out: Path) -> dict:
    torch.set_num_threads(2)
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    results: dict = {}
    for dname, (load, factory, epochs) in DATASETS.items():
        epochs = 2 if quick else epochs
        data = load()
        if quick:  # a smoke run: a slice of the data
            data = (data[0][:512], data[1][:512], data[2][:256], data[3][:256])
        xtr, ytr, xte, yte = data
        results[dname] = {}
        for variant in STUDY_VARIANTS:
            runs = []
            for seed in seeds:
                torch.manual_seed(1000 + seed)
                t0 = time.perf_counter()
                if variant == PAPER_INIT:  # the paper's protocol: two full trainings
                    model, _ = build_variant("CK+FC+Init", factory, epochs, R, A, B)
                    curve = train(model, data, epochs, seed, f"{dname} {variant} s{seed} 1/2")
                    efx.linearize(model)
                    curve += train(model, data, epochs, seed + 100,
                                   f"{dname} {variant} s{seed} 2/2")
                else:
                    model, hook = build_variant(variant, factory, epochs, R, A, B)
                    curve = train(model, data, epochs, seed, f"{dname} {variant} s{seed}",
                                  on_epoch=hook)
                seconds = time.perf_counter() - t0
                train_acc = accuracy(model, xtr, ytr)
                deployed = efx.contract(model) if variant != "compact" else model
                run_rec = {"seed": seed, "curve": curve, "best": max(curve), "last": curve[-1],
                           "train": train_acc, "gap": train_acc - curve[-1],
                           "deployed": accuracy(deployed, xte, yte), "seconds": seconds}
                if variant in ("compact", "CL", "CK"):
                    gen = torch.Generator().manual_seed(seed)
                    idx = torch.randperm(len(ytr), generator=gen)[:8 * 64].split(64)
                    model.eval()
                    run_rec["confusion"] = gradient_confusion(
                        model, F.cross_entropy, [(xtr[i], ytr[i]) for i in idx])
                runs.append(run_rec)
            results[dname][variant] = runs
            best = statistics.fmean(r["best"] for r in runs)
            print(f"{dname:24} {variant:14} best {best:.4f}", flush=True)
    write(results, seeds, out, quick)
    return results


def _ms(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def write(results: dict, seeds: list[int], out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Accuracy study (CPU scale)\n\nMeasured {time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__}, seeds {seeds}{' (QUICK RUN)' if quick else ''} "
             f"(`python benchmarks/accuracy_study.py`). Test accuracy in % (mean ± std over "
             f"seeds) of the best and the last epoch; gap = train − test accuracy at the end; "
             f"'deployed' = the contracted compact model, which equals the trained one. "
             f"Gradient confusion = min pairwise cosine similarity of 8 mini-batch gradients "
             f"at the end of training, model in eval mode so batch-norm statistics are not "
             f"touched (higher is better). r = {R:g}; compander arctan a = {A:g}, b = {B:g}; "
             f"same SGD schedule and epochs for every variant. +Init: the nonlinear "
             f"counterpart (ReLU between the layers of every block) trains for the first "
             f"half of the epochs, then the ReLUs are removed (weights kept) and it trains "
             f"on as an ExpandNet, keeping the budget equal to the other variants; "
             f"{PAPER_INIT} follows the paper: the counterpart trains with the full schedule, "
             f"then the ExpandNet trains with the full schedule again (twice the epochs; its "
             f"curve is twice as long).\n"]
    for dname, variants in results.items():
        lines += [f"\n## {dname}\n", "| variant | best | last | gap | deployed | confusion "
                  "| s/run |", "|---|---:|---:|---:|---:|---:|---:|"]
        for variant, runs in variants.items():
            conf = (f"{statistics.fmean(r['confusion'] for r in runs):.3f}"
                    if "confusion" in runs[0] else "")
            lines.append(f"| {variant} | {_ms([r['best'] for r in runs])} | "
                         f"{_ms([r['last'] for r in runs])} | {_ms([r['gap'] for r in runs])} "
                         f"| {_ms([r['deployed'] for r in runs])} | {conf} | "
                         f"{statistics.fmean(r['seconds'] for r in runs):.1f} |")
    (out / "accuracy_study.md").write_text("\n".join(lines) + "\n")
    (out / "accuracy_study.json").write_text(json.dumps(results))
    plot(results, out / "accuracy_study.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, (dname, variants) in zip(axes, results.items(), strict=True):
        for variant, runs in variants.items():
            mean = [statistics.fmean(v) for v in zip(*(r["curve"] for r in runs), strict=True)]
            if len(mean) > len(next(iter(variants.values()))[0]["curve"]):
                mean = mean[len(mean) // 2:]  # 2x protocol: plot its second (linear) phase
            ax.plot(range(1, len(mean) + 1), mean, label=variant,
                    linestyle="-" if "compander" not in variant else "--")
        ax.set_title(dname)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (mean over seeds)")
        lows = [min(r["curve"][len(r["curve"]) // 2:]) for v in variants.values() for r in v]
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run(args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
