"""The main job: train a compact net directly and expanded, contract, export, verify, compare.

Data: scikit-learn's 8×8 handwritten digits (shipped with the package, no download).
Model: the paper's SmallNet shape adapted to 8×8 inputs (5×5 kernels, so CK applies).
Same recipe for both (SGD lr 0.05, momentum 0.9, cosine, several seeds), with the
learning rates of :func:`expandfx.param_groups` (``lr/N`` for the factors of an N-factor
block), one thread and deterministic kernels. The lr is the same for both and not tuned, so
the comparison shows the workflow, not whether expansion helps (that is the job of
``benchmarks/does_it_help.py``, lr chosen on validation, paired seeds). Writes the ONNX
file, a JSON report and a PNG of the curves. The deployed model is also exported in int8
(folded, static QDQ, calibrated on 256 training images) and compared with fp32 on the test
set.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import expandfx as efx
from expandfx.block import MEASURE_ENV
from expandfx.linear.costs import param_count
from expandfx.models import smallnet_digits
from expandfx.optim import ChainLR
from expandfx.quantize import split_samples
from expandfx.tolerances import rel_error

__all__ = ["accuracy", "digits", "fit", "reproducible", "run_demo", "train"]


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of scikit-learn's digits, a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@contextlib.contextmanager
def reproducible(threads: int = 1) -> Iterator[str]:
    """Inside: a fixed torch thread count, deterministic kernels and ``auto`` blocks that
    decide by the MAC model rather than by timing (all restored after).

    Timing-based choices can differ between runs; both executions compute the same
    function, but not with the same float rounding. Yields a one-line record to print
    beside the results. Seeds are set per run by the callers. CPU float sums can differ in
    the last bits between thread counts, so results are reported at one fixed count.
    """
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              os.environ.get(MEASURE_ENV))
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    os.environ[MEASURE_ENV] = "0"
    try:
        yield (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
               f"deterministic algorithms on, auto mode by MAC model ({MEASURE_ENV}=0)")
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        if before[2] is None:
            os.environ.pop(MEASURE_ENV, None)
        else:
            os.environ[MEASURE_ENV] = before[2]


def fit(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int, desc: str,
        *, lr: float = 0.05, weight_decay: float = 5e-4, chain_lr: ChainLR = "1/N",
        schedule: str = "cosine", momentum: float = 0.9,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        on_epoch: Callable[[int], None] | None = None,
        rescale_every: int | None = None) -> dict[str, Any]:
    """SGD (batch 64) with :func:`expandfx.param_groups`; accuracy after every epoch.

    ``schedule="cosine"`` anneals ``lr`` to 0; ``"step"`` is the ExpandNets authors'
    recipe (÷10 after each third of the epochs). A run whose loss becomes non-finite
    stops and is marked ``diverged`` (its remaining epochs score chance accuracy).
    Returns ``{"test": [...], "val": [...], "diverged": bool}``; ``on_epoch(e)`` runs
    before epoch ``e``. ``rescale_every=k`` calls ``groups.rescale(opt)`` every k steps, which
    re-applies a learning-rate rule that depends on the weights (``chain_lr="norm"``, a
    callable; a no-op for ``"1/N"``).
    """
    from tqdm import tqdm

    xtr, ytr, xte, yte = data
    gen = torch.Generator().manual_seed(seed)
    # every parameter decays, as when the recorded demo and study results were made
    groups = efx.param_groups(model, lr, weight_decay, chain_lr=chain_lr,
                              decay_bias_and_norm=True)
    opt = torch.optim.SGD(groups, momentum=momentum)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 3, 2 * epochs // 3], 0.1)
    out: dict[str, Any] = {"test": [], "val": [], "diverged": False}
    chance = 1.0 / int(ytr.max() + 1)
    # disable=None: a bar only on a terminal; logs (CI, files) get no carriage-return updates
    bar = tqdm(range(epochs), desc=desc, leave=False, file=sys.stderr, ncols=80, disable=None)
    for epoch in bar:
        if on_epoch is not None:
            on_epoch(epoch)
        model.train()
        for step, idx in enumerate(torch.randperm(len(ytr), generator=gen).split(64)):
            if rescale_every and step % rescale_every == rescale_every - 1:
                groups.rescale(opt)
            opt.zero_grad()
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + groups.penalty()
            if not torch.isfinite(loss):
                out["diverged"] = True
                break
            loss.backward()
            opt.step()
        if out["diverged"]:
            left = epochs - epoch
            out["test"] += [chance] * left
            out["val"] += [chance] * left if val is not None else []
            break
        sched.step()
        out["test"].append(accuracy(model, xte, yte))
        if val is not None:
            out["val"].append(accuracy(model, *val))
        bar.set_postfix(acc=f"{out['test'][-1]:.3f}")
    return out


def train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int,
          desc: str, **kwargs: Any) -> list[float]:
    """:func:`fit`'s test accuracy per epoch."""
    return fit(model, data, epochs, seed, desc, **kwargs)["test"]


def run_demo(out: Path, rule: str = "CK", r: float = 4.0, epochs: int = 40, seeds: int = 5,
             quick: bool = False) -> int:
    with reproducible(threads=1) as setup:
        return _demo(out, rule, r, epochs, seeds, quick, setup)


def _demo(out: Path, rule: str, r: float, epochs: int, seeds: int, quick: bool,
          setup: str) -> int:
    if quick:
        epochs, seeds = min(epochs, 3), 1
    out.mkdir(parents=True, exist_ok=True)
    print(f"setup: {setup}; seeds {list(range(seeds))}; SGD lr 0.05 for both (same lr, "
          f"not tuned) with expandfx.param_groups (lr/N per factor of an N-factor block)")
    torch.manual_seed(0)
    data = digits()
    xtr, _, xte, yte = data
    print(f"data: scikit-learn digits, {len(xtr)} train / {len(xte)} test images of 8x8")
    plan = efx.plan(smallnet_digits(), rule, r, example_inputs=(xtr[:1],))
    print(plan)

    label = rule if r is None else f"{rule} r={r:g}"
    curves: dict[str, list[list[float]]] = {"compact": [], label: []}
    seconds = {k: 0.0 for k in curves}
    last_big = None
    for seed in range(seeds):
        for name in curves:
            torch.manual_seed(100 + seed)
            model = smallnet_digits()
            if name != "compact":
                model = efx.expand(model, rule, r)
            t0 = time.perf_counter()
            curves[name].append(train(model, data, epochs, seed, f"{name} seed {seed}"))
            seconds[name] += time.perf_counter() - t0
            if name != "compact":
                last_big = model

    big = last_big.eval()
    small = efx.contract(big)
    with torch.no_grad():
        ref, got = big(xte), small(xte)
    fold_err = rel_error(ref, got)
    deployed = smallnet_digits()
    deployed.load_state_dict(small.state_dict())  # same class, same keys
    onnx_path = out / "smallnet_digits.onnx"
    report = efx.export_onnx(big, (xte[:4],), onnx_path)
    # int8: folded (BN absorbed), calibrated on 256 training images, verified on the test set
    batches, labels, held = split_samples(torch.cat([xtr[:256], xte]),
                                          torch.cat([data[1][:256], yte]), calibrate=256)
    int8 = efx.export_onnx(deployed, (xte[:4],), out / "smallnet_digits_folded.onnx",
                           quantize=efx.Int8Config(holdout=held), calibration=batches,
                           labels=labels).int8

    totals = plan.totals()
    summary = {
        "rule": rule, "r": r, "epochs": epochs, "seeds": seeds,
        "params_train": param_count(big), "params_test": param_count(deployed),
        "macs_train": totals["macs_after"], "macs_test": totals["macs_before"],
        "accuracy": {k: _stats([c[-1] for c in v]) for k, v in curves.items()},
        "best_accuracy": {k: _stats([max(c) for c in v]) for k, v in curves.items()},
        "train_seconds": seconds,
        "contract_rel_error": fold_err,
        "deployed_accuracy": accuracy(deployed, xte, yte),
        "onnx": json.loads(report.to_json()),
        "int8": int8.to_dict(),
        "curves": curves,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    _plot(curves, out / "curves.png")

    print()
    print(f"compact vs expanded at the same lr (0.05, not tuned), {seeds} seed(s), {epochs} "
          f"epochs, CPU scale (digits 8x8):")
    print(f"{'':28}{'params':>10}{'MACs':>10}{'test acc (last)':>20}{'train s':>9}")
    for name in curves:
        acc = summary["accuracy"][name]
        params = summary["params_train"] if name != "compact" else summary["params_test"]
        macs = summary["macs_train"] if name != "compact" else summary["macs_test"]
        label = "trained compact" if name == "compact" else f"trained expanded {name}"
        print(f"{label:28}{params:>10,}{macs:>10,}{acc['mean']:>13.4f} ± {acc['std']:.4f}"
              f"{seconds[name]:>9.1f}")
    print(f"{'deployed (contracted)':28}{summary['params_test']:>10,}"
          f"{summary['macs_test']:>10,}{summary['deployed_accuracy']:>13.4f}")
    print("same lr, not tuned: a gap here (either way) is not evidence that expansion helps; "
          "the tuned,\npaired comparisons are in benchmarks/results/README.md (\"does it "
          "help?\")")
    print(f"\ncontract(big) vs big: max |diff| / max |out| = {fold_err:.2e} (limit 1e-5)")
    for level, outputs in report.errors.items():
        for name, e in outputs.items():
            print(f"onnxruntime ({level} optimizations) vs torch, {name}: max abs "
                  f"{e['max_abs']:.2e}, max rel {e['max_rel']:.2e}")
    print(f"structure of the ONNX graph = compact architecture: {report.structure_matches}")
    size, ms = int8.size_bytes, int8.latency_ms
    print(f"\n{'deployed, onnxruntime':28}{'test acc':>10}{'file bytes':>12}{'latency':>10}"
          f"  (batch {int8.latency_batch}, {int8.config['threads']} thread)")
    for name in ("fp32", "int8"):
        print(f"{name + (' (folded)' if name == 'fp32' else ' (QDQ, per-channel)'):28}"
              f"{int8.accuracy[name]:>10.4f}{size[name]:>12,}{ms[name]:>8.3f}ms")
    print(f"int8 vs fp32 on the test set: SQNR {int8.sqnr_db['held-out']:.1f} dB, top-1 "
          f"agreement {int8.agreement['held-out']:.4f}; int8/fp32 size "
          f"{size['int8'] / size['fp32']:.2f}×, latency {int8.latency_ratio:.2f}×")
    print(f"wrote {onnx_path}, {int8.path}, {out / 'report.json'}, {out / 'curves.png'}")
    ok = fold_err <= 1e-5 and report.passed and int8.passed
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        epochs = range(1, len(runs[0]) + 1)
        mean = [statistics.fmean(v) for v in zip(*runs, strict=True)]
        ax.plot(epochs, mean, label=f"{name} (mean of {len(runs)})")
        for run in runs:
            ax.plot(epochs, run, alpha=0.2, color=ax.lines[-1].get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.8, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmallNet on 8x8 digits: compact vs expanded, same lr (not tuned)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
