"""Does it help? The converged, paired, pre-registered study of expansion and the compander.

The plan — hypotheses, primary comparisons, Holm families, the rule for stating a gain, the
smallest detectable effect, the pruning order and the pilot's projection — is
``benchmarks/results/does_it_help_plan.md``, committed before any run. This script is its
pipeline; docs/design.md §8 (the evidence contract) is what it implements:

- regimes: (a) underfitting (ExpandNets: narrow 1D CNNs on MNIST-1D whose training accuracy
  stays ≤ 97 %) and (b) overfitting (the compander: a wide 1D CNN on 1,000 MNIST-1D samples,
  train − test ≥ 5 points); both checked on the runs and reported;
- lr on a ×√2 grid, tuned for every variant (the compact net included) in two stages: 3
  tuning seeds × the grid, chosen by the mean final-epoch *validation* accuracy (a diverged
  run counts at chance), the chosen lr strictly inside the grid (at most 2 widenings of two
  ×√2 steps, else reported as an edge); in regime (b) the weight decay too (a ×4 grid with
  0, then the lr again at the chosen decay); then 10 fresh seeds at the chosen point;
- convergence: every chosen point re-run at twice the epochs (same seeds); a task is
  converged when every variant's mean test accuracy moves by < 0.3 points;
- per run (one JSON line, appended when it finishes: the study resumes where it stopped):
  task, regime, variant, protocol, lr, weight decay, seed, epochs, train/val/test accuracy
  in percent, per-epoch train loss and validation accuracy, wall-clock, load, the contracted
  model's test accuracy (checked equal to the trained one's), gradient confusion on the
  folded weights (mean, 5th percentile, min over mini-batch pairs), and in regime (b) the
  folded weights' distribution (the compander paper's claims);
- comparisons: paired by seed (the seed drives the data order, from its own generator, and
  the init), the paired t 95 % CI with the Wilcoxon signed-rank p beside it, Holm-adjusted
  within each (regime, family); a gain is stated only if it survives Holm;
- the authors' protocol (every variant at the compact net's chosen lr, ``chain_lr=None``)
  as a second column for five variants of regime (a).

Accuracy is in percentage points everywhere (runs, comparisons, tables). One torch thread
per run, deterministic kernels (``expandfx.demo.reproducible``), up to 2 worker processes.

    python benchmarks/does_it_help.py --pilot       # ~5 min: step times, paired SD, projection
    python benchmarks/does_it_help.py --prune N --max-minutes 90   # the study, resumable pieces
    python benchmarks/does_it_help.py --report      # the tables and figure from the runs so far
    python benchmarks/does_it_help.py --quick --out /tmp/dih   # the whole pipeline in seconds
"""


import argparse
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from variants import build_variant, fc_rule  # noqa: E402,F401

import expandfx as efx  # noqa: E402
from expandfx.demo import reproducible  # noqa: E402
from expandfx.diagnostics import minibatch_gradients  # noqa: E402
from expandfx.models import CNN1D  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "does_it_help"
CHANCE = 10.0  # percent: every task has 10 classes
FAILED_AT = 15.0  # a run ending at or below this test accuracy failed (collapsed)
COMPANDER = {"a": 1.0, "b": 0.7}  # fixed a, b (variants.py); not tuned here
LR_BASE, WD_BASE = 0.1, 5e-4  # lr(k) = LR_BASE · √2^k ; wd(j) = WD_BASE · 4^j, j=None: 0
MOVE_LIMIT = 0.3  # points: the doubling check
BATCH = 64


def lr_of(k: int) -> float:
    return float(f"{LR_BASE * 2 ** (k / 2):.6g}")


def wd_of(j: int | None) -> float:
    return 0.0 if j is None else float(f"{WD_BASE * 4 ** j:.6g}")


# --------------------------------------------------------------------------- the models

class CNN1DBN(nn.Module):
    """The ExpandNets papers' layer pattern in 1-D: ``Conv1d → BatchNorm1d → ReLU`` stages
    (first stride 1, later stride 2, "same" padding) and a linear head."""

    def __init__(self, widths: tuple[int, ...] = (4, 4, 4), kernel_size: int = 7,
                 length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        pad, layers, channels = (kernel_size - 1) // 2, [], 1
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv1d(channels, width, kernel_size, stride=stride, padding=pad),
                       nn.BatchNorm1d(width), nn.ReLU()]
            channels, length = width, (length + 2 * pad - kernel_size) // stride + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


MODELS = {"bn": CNN1DBN, "plain": CNN1D}


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Task:
    name: str
    regime: str  # "a" underfitting (ExpandNets) or "b" overfitting (compander)
    title: str
    model: str  # key of MODELS
    widths: tuple[int, ...]
    kernel: int
    samples: int  # mnist1d num_samples (80 % train, 20 % test)
    epochs: int
    variants: tuple[str, ...]
    n_train: int | None = None  # None: the first 80 % of the training split
    tune_wd: bool = False
    authors: tuple[str, ...] = ()  # variants also run with the authors' protocol
    comparisons: tuple[tuple[str, str, str], ...] = ()  # (variant, baseline, family)
    lr_ks: tuple[int, ...] = (-2, -1, 0, 1, 2)  # 0.05 … 0.2
    wd_js: tuple[int | None, ...] = (None, -1, 0, 1, 2)  # 0, 1.25e-4 … 8e-3


UNDERFIT_VARIANTS = ("compact", "CK", "CL", "CK+FC", "CK+FC+Init", "CK r=2", "CK r=8")
UNDERFIT_COMPARISONS = (
    ("CK", "compact", "primary"), ("CL", "compact", "primary"),
    ("CK+FC", "compact", "primary"), ("CK+FC+Init", "CK+FC", "primary"),
    ("CK r=2", "compact", "primary"), ("CK r=8", "compact", "primary"),
    ("CK r=2", "CK", "secondary"), ("CK r=8", "CK", "secondary"))
AUTHORS_VARIANTS = ("CK", "CL", "CK+FC", "CK+FC+Init")  # + compact: five

TASKS = (
    Task("a1-w4", "a", "MNIST-1D (20,000 samples), 1D CNN conv→BN→ReLU ×3, widths 4-4-4, "
         "kernel 7", "bn", (4, 4, 4), 7, 20000, 60, UNDERFIT_VARIANTS,
         authors=AUTHORS_VARIANTS, comparisons=UNDERFIT_COMPARISONS),
    Task("a0-branch", "c", "MNIST-1D (5,000 samples), CNN1D without normalization, widths "
         "8-8-8, kernel 5 (the branch study's cell)", "plain", (8, 8, 8), 5, 5000, 150,
         ("compact", "Single/bn", "DBB/bn", "DBB"),
         comparisons=(("DBB/bn", "Single/bn", "primary"), ("DBB", "compact", "secondary"),
                      ("Single/bn", "compact", "secondary"),
                      ("DBB/bn", "compact", "secondary"))),
    Task("b1-wide", "b", "MNIST-1D (5,000 samples) with 1,000 training samples, CNN1D "
         "without normalization, widths 32-32-32, kernel 5", "plain", (32, 32, 32), 5, 5000,
         150, ("compact", "compander", "CK", "compander+CK"), n_train=1000, tune_wd=True,
         comparisons=(("compander", "compact", "primary"),
                      ("compander+CK", "CK", "primary"), ("CK", "compact", "secondary"))),
    Task("a2-w3", "a", "MNIST-1D (20,000 samples), 1D CNN conv→BN→ReLU ×3, widths 3-3-3, "
         "kernel 7", "bn", (3, 3, 3), 7, 20000, 60, UNDERFIT_VARIANTS,
         comparisons=UNDERFIT_COMPARISONS),
)


@dataclass(frozen=True)
class Config:
    tasks: tuple[Task, ...] = TASKS
    tune_seeds: tuple[int, ...] = (0, 1, 2)
    eval_seeds: tuple[int, ...] = tuple(range(10, 20))
    double_seeds: int = 10  # how many of the eval seeds the doubling check re-runs
    authors_seeds: int = 10
    widenings: int = 2
    confusion_batches: int = 16  # 120 pairs
    quick: bool = False


# The pruning order (first item pruned first) to fit the budget; `--prune N` applies the
# first N. Each is a function Config -> Config.
def _drop_task(name):
    return lambda c: replace(c, tasks=tuple(t for t in c.tasks if t.name != name))


def _drop_variant(task_name, variant):
    def f(c):
        out = []
        for t in c.tasks:
            if t.name == task_name:
                t = replace(t, variants=tuple(v for v in t.variants if v != variant),
                            authors=tuple(v for v in t.authors if v != variant),
                            comparisons=tuple(x for x in t.comparisons
                                              if variant not in x[:2]))
            out.append(t)
        return replace(c, tasks=tuple(out))
    return f


PRUNING = [
    ("drop task a2-w3 (the second, narrower width)", _drop_task("a2-w3")),
    ("doubling check on 5 of the 10 evaluation seeds", lambda c: replace(c, double_seeds=5)),
    ("authors' column on 5 seeds", lambda c: replace(c, authors_seeds=5)),
    ("drop plain DBB from a0-branch (secondary only)", _drop_variant("a0-branch", "DBB")),
    ("drop CK r=8 from a1-w4", _drop_variant("a1-w4", "CK r=8")),
    ("drop CK r=2 from a1-w4", _drop_variant("a1-w4", "CK r=2")),
    ("drop CK+FC+Init from a1-w4 (twice the epochs)", _drop_variant("a1-w4", "CK+FC+Init")),
    ("drop task a0-branch (the branch study's cell)", _drop_task("a0-branch")),
]

QUICK = Config(
    tasks=(
        Task("a1-w4", "a", "QUICK: MNIST-1D slice, 1D CNN + BN 4-4-4 k7", "bn", (4, 4, 4), 7,
             5000, 2, ("compact", "CK"), authors=("CK",),
             comparisons=(("CK", "compact", "primary"),), lr_ks=(-1, 0, 1)),
        Task("b1-wide", "b", "QUICK: MNIST-1D slice, CNN1D 8-8-8 k5", "plain", (8, 8, 8), 5,
             5000, 2, ("compact", "compander"), n_train=320, tune_wd=True,
             comparisons=(("compander", "compact", "primary"),), lr_ks=(-1, 0, 1),
             wd_js=(None, 0, 1)),
    ),
    tune_seeds=(0, 1), eval_seeds=(10, 11), double_seeds=2, authors_seeds=2, widenings=1,
    confusion_batches=4, quick=True)


def pruned(config: Config, n: int) -> Config:
    for _, f in PRUNING[:n]:
        config = f(config)
    return config


def task_of(config: Config, name: str) -> Task:
    return next(t for t in config.tasks if t.name == name)


# --------------------------------------------------------------------------- data

_DATA: dict = {}


def data_for(task: Task, quick: bool) -> tuple[tuple[torch.Tensor, ...], ...]:
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)); the data set is fixed
    (mnist1d seed 0), the validation split is the last 20 % of its training split."""
    key = (task.samples, task.n_train, quick)
    if key not in _DATA:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = task.samples, 0
        d = make_dataset(args)
        x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d["y"]).long()
        xt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
        yt = torch.tensor(d["y_test"]).long()
        cut = int(0.8 * len(y))
        train, val = (x[:cut], y[:cut]), (x[cut:], y[cut:])
        if task.n_train is not None:
            train = (x[:task.n_train], y[:task.n_train])
        if quick:  # a slice: the pipeline, not the numbers
            train = (train[0][:640], train[1][:640]) if task.n_train is None else train
            val, (xt, yt) = (val[0][:160], val[1][:160]), (xt[:256], yt[:256])
        _DATA[key] = (train, val, (xt, yt))
    return _DATA[key]


# --------------------------------------------------------------------------- one run

def build(task: Task, variant: str) -> nn.Module:
    """The model of ``variant`` (for ``+Init``: the nonlinear counterpart, phase 1)."""
    def factory():
        return MODELS[task.model](widths=task.widths, kernel_size=task.kernel)

    rule, _, rate = variant.partition(" r=")
    if "/" in rule or rule in ("DBB", "RepVGG", "MobileOne"):
        import branch_study  # registers the "Single" control rule

        return branch_study.build(rule, factory)
    return build_variant(rule, factory, float(rate) if rate else 4.0, **COMPANDER)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, data, epochs: int, lr: float, wd: float, chain_lr, gen,
          out: dict) -> nn.Module:
    (xtr, ytr), val, _ = data
    groups = efx.param_groups(model, lr, wd, chain_lr=chain_lr)
    opt = torch.optim.SGD(groups, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(len(ytr), generator=gen).split(BATCH):
            opt.zero_grad()
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + groups.penalty()
            if not torch.isfinite(loss):
                out["diverged"] = True
                break
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        if out["diverged"]:  # the remaining epochs score chance
            out["train_loss"] += [None] * (epochs - epoch)
            out["val_curve"] += [CHANCE] * (epochs - epoch)
            break
        sched.step()
        out["train_loss"].append(total / seen)
        out["val_curve"].append(accuracy(model, *val))
    return model


def confusion(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, batches: int
              ) -> dict[str, float]:
    """Pairwise cosine similarity of mini-batch gradients (ExpandNets §5.1): its mean, 5th
    percentile and minimum over all pairs of ``batches`` training batches of 64 (eval mode)."""
    gen = torch.Generator().manual_seed(5000 + seed)
    idx = torch.randperm(len(y), generator=gen)[:batches * BATCH].split(BATCH)
    model.eval()
    g = minibatch_gradients(model, F.cross_entropy, [(x[i], y[i]) for i in idx]).double()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    i, j = torch.triu_indices(len(g), len(g), offset=1)
    cos = (g @ g.T)[i, j]
    return {"mean": cos.mean().item(), "p5": torch.quantile(cos, 0.05).item(),
            "min": cos.min().item(), "pairs": len(cos)}


def weight_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per conv/linear layer of the folded model: the compander paper's two claims, measured.

    ``max_abs`` (claim i: magnitudes restricted), ``near_zero`` = fraction with |w| below
    0.1 × the layer's default-init std (1/√(3·fan_in)) and ``p16_p84`` = the 16th–84th
    percentile width (claim ii: fewer weights at zero, a greater range around it)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            w = m.weight.detach().double().flatten()
            fan_in = m.weight[0].numel()
            tau = 0.1 / math.sqrt(3 * fan_in)
            q = torch.quantile(w, torch.tensor([0.16, 0.84], dtype=torch.float64))
            out[name] = {"max_abs": w.abs().max().item(), "std": w.std().item(),
                         "near_zero": (w.abs() < tau).double().mean().item(), "tau": tau,
                         "p16_p84": (q[1] - q[0]).item()}
    return out


def one_run(spec: tuple) -> dict:
    """Train one (task, variant, protocol, lr, wd, seed, epochs); the unit of work."""
    quick, tname, variant, protocol, lr, wd, seed, epochs = spec
    config = QUICK if quick else Config()
    task = task_of(config, tname)
    load0 = os.getloadavg()[0]
    with reproducible(1) as setup, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = data_for(task, quick)
        torch.manual_seed(1000 + seed)
        model = build(task, variant)
        gen = torch.Generator().manual_seed(seed)  # the data order: its own generator
        chain_lr = None if protocol == "authors" else "1/N"
        out: dict[str, Any] = {"train_loss": [], "val_curve": [], "diverged": False}
        t0 = time.perf_counter()
        phases = 2 if variant.endswith("+Init") else 1
        for phase in range(phases):
            if phase == 1:  # +Init: linearize the counterpart (calibrated), train on
                model = efx.linearize(model, calibrate=data[0][0][:512].split(64))
                chain_lr = None if protocol == "authors" else "norm"
            model = train(model, data, epochs, lr, wd, chain_lr, gen, out)
            if out["diverged"]:
                break
        seconds = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "task": tname, "regime": task.regime, "variant": variant, "protocol": protocol,
            "lr": lr, "wd": wd, "seed": seed, "epochs": epochs, "quick": quick,
            "phases": phases, "seconds": seconds, "load_1min": [load0, os.getloadavg()[0]],
            "setup": setup, **out}
        if out["diverged"]:
            rec |= {"train_acc": CHANCE, "val_acc": CHANCE, "test_acc": CHANCE,
                    "failed": True, "deployed_test_acc": None, "contract_ok": None}
            return rec
        (xtr, ytr), val, test = data
        rec["train_acc"] = accuracy(model, xtr, ytr)
        rec["val_acc"] = accuracy(model, *val)
        rec["test_acc"] = accuracy(model, *test)
        rec["failed"] = rec["test_acc"] <= FAILED_AT
        try:
            folded = efx.contract(model) if variant != "compact" else model
            rec["deployed_test_acc"] = accuracy(folded, *test)
            rec["contract_ok"] = abs(rec["deployed_test_acc"] - rec["test_acc"]) \
                <= 100.0 / len(test[1]) + 1e-9  # within one test sample
        except Exception as e:  # recorded, not hidden: the report counts these
            rec |= {"deployed_test_acc": None, "contract_ok": False, "contract_error": repr(e)}
            return rec
        n = config.confusion_batches
        rec["confusion_folded"] = confusion(folded, xtr, ytr, seed, n)
        if variant != "compact":
            rec["confusion_trained"] = confusion(model, xtr, ytr, seed, n)
        if task.regime == "b":
            rec["weights"] = weight_stats(folded)
    return rec


def key(x: dict | tuple) -> tuple:
    """(task, regime, variant, protocol, lr, wd, seed, epochs): what makes a run unique."""
    if isinstance(x, tuple):
        return x
    return (x["task"], x["regime"], x["variant"], x["protocol"], x["lr"], x["wd"], x["seed"],
            x["epochs"])


# --------------------------------------------------------------------------- the search

@dataclass
class Need:
    specs: list = field(default_factory=list)


def _val(runs: dict, task: Task, variant: str, lr: float, wd: float, seeds, epochs: int,
         protocol: str = "sweep") -> list | None:
    got = [runs.get((task.name, task.regime, variant, protocol, lr, wd, s, epochs))
           for s in seeds]
    return None if any(r is None for r in got) else [r["val_acc"] for r in got]


def _spec(config, task, variant, lr, wd, seed, epochs, protocol="sweep") -> tuple:
    return (config.quick, task.name, variant, protocol, lr, wd, seed, epochs)


def search(config: Config, task: Task, variant: str, runs: dict, values: list, at, need: Need,
           lower_bound: bool = False) -> dict | None:
    """A grid search over ``values`` (ints: grid indices) with the widening rule: the best
    mean validation accuracy over the tuning seeds, strictly inside the grid, at most
    ``config.widenings`` widenings by two steps; ``at(v) -> (lr, wd)``. ``lower_bound``:
    ``None`` (weight decay 0) is the lowest value and no edge."""
    grid, widened = list(values), 0
    while True:
        scores, missing = {}, []
        for v in grid:
            lr, wd = at(v)
            got = _val(runs, task, variant, lr, wd, config.tune_seeds, task.epochs)
            if got is None:
                missing += [_spec(config, task, variant, lr, wd, s, task.epochs)
                            for s in config.tune_seeds
                            if (task.name, task.regime, variant, "sweep", lr, wd, s,
                                task.epochs) not in runs]
            else:
                scores[v] = statistics.fmean(got)
        if missing:
            need.specs += missing
            return None
        order = sorted(grid, key=lambda v: -math.inf if v is None else v)
        best = max(order, key=lambda v: scores[v])  # ties: the lower value (first in order)
        low = best == order[0] and not (lower_bound and best is None)
        high = best == order[-1]
        if (low or high) and widened < config.widenings:
            ints = [v for v in order if v is not None]
            grid += [ints[0] - 1, ints[0] - 2] if low else [ints[-1] + 1, ints[-1] + 2]
            widened += 1
            continue
        return {"best": best, "edge": "low" if low else "high" if high else None,
                "grid": order, "scores": {str(k): v for k, v in scores.items()},
                "widenings": widened}


def choose(config: Config, task: Task, variant: str, runs: dict, need: Need) -> dict | None:
    """The chosen (lr, wd) of ``variant`` on ``task``, or None while runs are missing."""
    s1 = search(config, task, variant, runs, list(task.lr_ks),
                lambda k: (lr_of(k), WD_BASE), need)
    if s1 is None:
        return None
    out = {"lr": lr_of(s1["best"]), "wd": WD_BASE, "lr_search": s1, "edge": s1["edge"]}
    if not task.tune_wd:
        return out
    k = s1["best"]
    s2 = search(config, task, variant, runs, list(task.wd_js), lambda j: (lr_of(k), wd_of(j)),
                need, lower_bound=True)
    if s2 is None:
        return None
    out |= {"wd": wd_of(s2["best"]), "wd_search": s2}
    if s2["best"] != 0:  # the decay moved: the lr again, at that decay, around k
        s3 = search(config, task, variant, runs, [k - 2, k - 1, k, k + 1, k + 2] if not
                    config.quick else [k - 1, k, k + 1],
                    lambda kk: (lr_of(kk), wd_of(s2["best"])), need)
        if s3 is None:
            return None
        out |= {"lr": lr_of(s3["best"]), "lr_search_2": s3, "edge": s3["edge"]}
    out["wd_edge"] = s2["edge"]
    return out


def plan_round(config: Config, runs: dict) -> tuple[list, dict]:
    """Every run the plan needs now (given the runs so far), and the choices made so far."""
    need, choices = Need(), {}
    for task in config.tasks:
        for variant in task.variants:
            c = choose(config, task, variant, runs, need)
            if c is None:
                continue
            choices[(task.name, variant)] = c
            for s in config.eval_seeds:
                need.specs.append(_spec(config, task, variant, c["lr"], c["wd"], s,
                                        task.epochs))
            for s in config.eval_seeds[:config.double_seeds]:
                need.specs.append(_spec(config, task, variant, c["lr"], c["wd"], s,
                                        2 * task.epochs))
        base = choices.get((task.name, "compact"))
        if base is not None:
            for variant in task.authors:
                for s in config.eval_seeds[:config.authors_seeds]:
                    need.specs.append(_spec(config, task, variant, base["lr"], base["wd"], s,
                                            task.epochs, "authors"))
    todo = [s for s in dict.fromkeys(need.specs) if _key_of_spec(s) not in runs]
    return todo, choices


def _key_of_spec(spec: tuple) -> tuple:
    quick, tname, variant, protocol, lr, wd, seed, epochs = spec
    regime = next(t.regime for t in (*TASKS, *QUICK.tasks) if t.name == tname)
    return (tname, regime, variant, protocol, lr, wd, seed, epochs)


# --------------------------------------------------------------------------- statistics

def t_quantile(q: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired difference ``a - b`` (same seeds, in points): n, mean, sd, the paired t 95 % CI
    and two-sided p, and the Wilcoxon signed-rank two-sided p beside it."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else float("nan")
    out: dict[str, Any] = {"n": n, "delta": mean, "sd": sd}
    if n < 2:
        return out | {"ci95": [float("nan")] * 2, "p_t": float("nan"),
                      "p_wilcoxon": float("nan")}
    se = sd / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    if se == 0:
        p_t = 1.0 if mean == 0 else 0.0
    else:
        p_t = float(2 * stats.t.sf(abs(mean / se), n - 1))
    if all(x == 0 for x in d):
        p_w = 1.0
    else:
        p_w = float(stats.wilcoxon(d).pvalue)
    return out | {"ci95": [mean - half, mean + half], "p_t": p_t, "p_wilcoxon": p_w}


def holm(ps: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given (NaN stays NaN, not counted)."""
    idx = [i for i, p in enumerate(ps) if not math.isnan(p)]
    m = len(idx)
    out = [float("nan")] * len(ps)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def mde(sd: float, n: int = 10, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true paired difference a two-sided paired t test at ``alpha`` detects with
    ``power``: (t_{1-α/2,n-1} + t_{power,n-1}) · sd / √n."""
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


# --------------------------------------------------------------------------- analysis

def _cell(runs: dict, task: Task, variant: str, c: dict, seeds, epochs: int,
          protocol: str = "sweep") -> dict[int, dict] | None:
    got = {s: runs.get((task.name, task.regime, variant, protocol, c["lr"], c["wd"], s,
                        epochs)) for s in seeds}
    return None if any(v is None for v in got.values()) else got


def analyse(config: Config, runs: dict, choices: dict) -> dict[str, Any]:
    comparisons, mechanisms, convergence, checks, cells = [], [], [], [], []
    for task in config.tasks:
        base = choices.get((task.name, "compact"))
        task_moves = []
        for variant in task.variants:
            c = choices.get((task.name, variant))
            if c is None:
                continue
            ev = _cell(runs, task, variant, c, config.eval_seeds, task.epochs)
            seeds2 = config.eval_seeds[:config.double_seeds]
            db = _cell(runs, task, variant, c, seeds2, 2 * task.epochs)
            row = {"task": task.name, "regime": task.regime, "variant": variant,
                   "lr": c["lr"], "wd": c["wd"], "edge": c.get("edge"),
                   "wd_edge": c.get("wd_edge"), "epochs": task.epochs,
                   "lr_grid": [lr_of(k) for k in c["lr_search"]["grid"]],
                   "widenings": c["lr_search"]["widenings"]}
            if ev is not None:
                rs = list(ev.values())
                row |= {f"{m}_mean": statistics.fmean(r[m] for r in rs)
                        for m in ("train_acc", "val_acc", "test_acc", "seconds")}
                row |= {"test_sd": statistics.stdev([r["test_acc"] for r in rs])
                        if len(rs) > 1 else 0.0, "n": len(rs),
                        "failed": sum(bool(r["failed"]) for r in rs),
                        "contract_ok": sum(r.get("contract_ok") is True for r in rs)}
            if ev is not None and db is not None:
                a = [db[s]["test_acc"] for s in seeds2]
                b = [ev[s]["test_acc"] for s in seeds2]
                p = paired(a, b)
                conv = {"task": task.name, "regime": task.regime, "variant": variant,
                        "epochs": task.epochs, "doubled": 2 * task.epochs, "n": p["n"],
                        "mean_E": statistics.fmean(b), "mean_2E": statistics.fmean(a),
                        "move": p["delta"], "ci95": p["ci95"],
                        "converged": abs(p["delta"]) < MOVE_LIMIT}
                convergence.append(conv)
                task_moves.append(conv["converged"])
                row["test_mean_2E"] = conv["mean_2E"]
            cells.append(row)
        converged = bool(task_moves) and len(task_moves) == len(task.variants) and \
            all(task_moves)
        # regime checks, on the compact net at its chosen point
        if base is not None:
            ev = _cell(runs, task, "compact", base, config.eval_seeds, task.epochs)
            if ev is not None:
                tr = statistics.fmean(r["train_acc"] for r in ev.values())
                te = statistics.fmean(r["test_acc"] for r in ev.values())
                rule, ok = {"a": ("train ≤ 97 %", tr <= 97.0),
                            "b": ("train − test ≥ 5 points", tr - te >= 5.0),
                            "c": ("none (reported: underfitting if train ≤ 97 %, "
                                  "overfitting if train − test ≥ 5)", True)}[task.regime]
                checks.append({"task": task.name, "regime": task.regime,
                               "compact_train": tr, "compact_test": te,
                               "underfits": tr <= 97.0, "overfits": tr - te >= 5.0,
                               "rule": rule, "holds": ok})
        # accuracy comparisons (sweep), paired by seed: at the task's epochs E and, on the
        # doubling check's seeds, at 2E (a replication with twice the budget)
        for variant, baseline, family in task.comparisons:
            ca, cb = choices.get((task.name, variant)), choices.get((task.name, baseline))
            if ca is None or cb is None:
                continue
            for budget, epochs, seeds in (
                    ("E", task.epochs, config.eval_seeds),
                    ("2E", 2 * task.epochs, config.eval_seeds[:config.double_seeds])):
                ra2 = _cell(runs, task, variant, ca, seeds, epochs)
                rb2 = _cell(runs, task, baseline, cb, seeds, epochs)
                if ra2 is None or rb2 is None:
                    continue
                p = paired([ra2[s]["test_acc"] for s in seeds],
                           [rb2[s]["test_acc"] for s in seeds])
                comparisons.append({"task": task.name, "regime": task.regime,
                                    "variant": variant, "baseline": baseline,
                                    "family": family, "protocol": "sweep", "budget": budget,
                                    "epochs": epochs, "metric": "test_acc", **p,
                                    "edge": bool(ca.get("edge") or cb.get("edge")),
                                    "converged": converged})
            ra = _cell(runs, task, variant, ca, config.eval_seeds, task.epochs)
            rb = _cell(runs, task, baseline, cb, config.eval_seeds, task.epochs)
            if ra is None or rb is None:
                continue
            if task.regime == "b" and "compander" in variant:
                for metric, get in WEIGHT_METRICS.items():
                    va = [get(ra[s]) for s in config.eval_seeds]
                    vb = [get(rb[s]) for s in config.eval_seeds]
                    if None in va or None in vb:
                        continue
                    mechanisms.append({"task": task.name, "regime": "b", "variant": variant,
                                       "baseline": baseline, "family": "weights",
                                       "metric": metric, "claim": WEIGHT_CLAIMS[metric],
                                       **paired(va, vb)})
        # gradient confusion against ExpandNets §5 (folded weights), expanded vs compact
        if task.regime == "a" and base is not None:
            rb = _cell(runs, task, "compact", base, config.eval_seeds, task.epochs)
            for variant in task.variants:
                c = choices.get((task.name, variant))
                if variant == "compact" or c is None or rb is None:
                    continue
                ra = _cell(runs, task, variant, c, config.eval_seeds, task.epochs)
                if ra is None:
                    continue
                for stat in ("mean", "p5"):
                    va = [ra[s].get("confusion_folded", {}).get(stat) for s in ra]
                    vb = [rb[s].get("confusion_folded", {}).get(stat) for s in rb]
                    if None in va or None in vb:
                        continue
                    mechanisms.append({"task": task.name, "regime": "a", "variant": variant,
                                       "baseline": "compact", "family": "confusion",
                                       "metric": f"cosine_{stat}",
                                       "claim": "higher (less confusion) than compact",
                                       **paired(va, vb)})
        # the authors' protocol column: at compact's lr, chain_lr=None, vs the compact net
        if base is not None:
            rb = _cell(runs, task, "compact", base, config.eval_seeds[:config.authors_seeds],
                       task.epochs)
            for variant in task.authors:
                ra = _cell(runs, task, variant, base, config.eval_seeds[:config.authors_seeds],
                           task.epochs, "authors")
                if ra is None or rb is None:
                    continue
                seeds = config.eval_seeds[:config.authors_seeds]
                p = paired([ra[s]["test_acc"] for s in seeds], [rb[s]["test_acc"] for s in seeds])
                comparisons.append({"task": task.name, "regime": task.regime,
                                    "variant": variant, "baseline": "compact",
                                    "family": "authors", "protocol": "authors",
                                    "budget": "E", "epochs": task.epochs,
                                    "metric": "test_acc", **p, "edge": bool(base.get("edge")),
                                    "converged": converged})
    for rows in (comparisons, mechanisms):  # Holm within (regime, family, budget)
        def fam(r):
            return r["regime"], r["family"], r.get("budget", "E")
        for f in {fam(r) for r in rows}:
            members = [r for r in rows if fam(r) == f]
            for r, ph in zip(members, holm([r["p_t"] for r in members]), strict=True):
                r["p_holm"] = ph
    at_2e = {(r["task"], r["variant"], r["baseline"], r["family"]): r for r in comparisons
             if r.get("budget") == "2E"}
    for r in comparisons:
        r["verdict"] = verdict(r, at_2e.get((r["task"], r["variant"], r["baseline"],
                                             r["family"])) if r.get("budget") == "E" else None)
    for r in mechanisms:
        r["verdict"] = mech_verdict(r)
    return {"cells": cells, "comparisons": comparisons, "mechanisms": mechanisms,
            "convergence": convergence, "regime_checks": checks}


def _first(stats: dict, metric: str) -> float | None:
    return None if stats is None else next(iter(stats.values()))[metric]


WEIGHT_METRICS = {
    "max_abs_all": lambda r: None if "weights" not in r else
    max(v["max_abs"] for v in r["weights"].values()),
    "near_zero_first": lambda r: None if "weights" not in r else
    100 * _first(r["weights"], "near_zero"),
    "near_zero_mean": lambda r: None if "weights" not in r else
    100 * statistics.fmean(v["near_zero"] for v in r["weights"].values()),
    "p16_p84_first": lambda r: None if "weights" not in r else _first(r["weights"], "p16_p84"),
}
WEIGHT_CLAIMS = {  # the direction the compander paper claims (§IV-D), the metric's sign
    "max_abs_all": "lower (magnitudes restricted)",
    "near_zero_first": "lower (fewer weights at zero), first layer, % of weights",
    "near_zero_mean": "lower (fewer weights at zero), mean over layers, % of weights",
    "p16_p84_first": "higher (a greater range around zero), first layer",
}


def verdict(r: dict, twice: dict | None = None) -> str:
    """The plan's rule: a gain or a loss is stated only in the primary family, surviving Holm,
    with both lrs strictly inside their grids; at convergence (the task passed the doubling
    check), or — where it did not — only if it also survives Holm at twice the epochs
    (``twice``: the same comparison at 2E). Everything else is reported as what it is."""
    if math.isnan(r.get("p_holm", float("nan"))):
        return "n/a"
    sig = r["p_holm"] < 0.05
    if r["family"] != "primary":
        return f"{r['family']}: {'p_holm < 0.05' if sig else 'no difference shown'}"
    if r.get("budget") == "2E":
        return "at 2E: " + ("p_holm < 0.05" if sig else "no difference shown")
    if r["edge"]:
        return "not settled: an lr at its grid's edge"
    word = "gain" if r["delta"] > 0 else "loss"
    if r["converged"]:
        return word if sig else "null (no difference shown)"
    if twice is None or math.isnan(twice.get("p_holm", float("nan"))):
        return "not settled: not shown converged"
    sig2 = twice["p_holm"] < 0.05 and (twice["delta"] > 0) == (r["delta"] > 0)
    if sig and sig2:
        return f"{word} (not shown converged; holds at E and 2E)"
    if not sig and twice["p_holm"] >= 0.05:
        return "null at E and 2E (not shown converged)"
    return "not settled: E and 2E disagree, not shown converged"


def mech_verdict(r: dict) -> str:
    if math.isnan(r.get("p_holm", float("nan"))):
        return "n/a"
    if r["p_holm"] >= 0.05:
        return "no difference shown"
    lower = r["claim"].startswith("lower")
    agrees = (r["delta"] < 0) == lower
    return "as the paper claims" if agrees else "against the paper's claim"


# --------------------------------------------------------------------------- the driver

def read_runs(path: Path) -> dict:
    runs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[key(r)] = r
    return runs


def execute(specs: list, jobs: int, deadline: float, done, pool=None) -> bool:
    """Run ``specs`` (in ``pool``'s worker processes, or a pool of ``jobs`` made here, or in
    this process when ``jobs`` is 1), calling ``done(rec)`` as each finishes; start no new
    one after ``deadline``. True when every spec ran."""
    if jobs <= 1:
        for spec in specs:
            if time.monotonic() > deadline:
                return False
            done(one_run(spec))
        return True
    if pool is None:
        with make_pool(jobs) as pool:
            return execute(specs, jobs, deadline, done, pool)
    it, pending, complete = iter(specs), set(), True
    while True:
        while len(pending) < jobs:
            if time.monotonic() > deadline:
                complete = False
                break
            spec = next(it, None)
            if spec is None:
                break
            pending.add(pool.submit(one_run, spec))
        if not pending:
            return complete and next(it, None) is None
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in finished:
            done(f.result())


def make_pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _meta(config: Config, jobs: int, started: float, load0: float, prune: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    with reproducible(1) as setup:
        pass
    return {"setup": setup, "jobs": jobs, "quick": config.quick, "prune": prune,
            "pruned": [name for name, _ in PRUNING[:prune]],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "minutes_this_call": (time.perf_counter() - started) / 60,
            "load_1min": [load0, os.getloadavg()[0]], "cores": os.cpu_count(),
            "torch": torch.__version__, "commit": commit,
            "tune_seeds": list(config.tune_seeds), "eval_seeds": list(config.eval_seeds),
            "double_seeds": config.double_seeds, "authors_seeds": config.authors_seeds,
            "tasks": {t.name: {"regime": t.regime, "title": t.title, "epochs": t.epochs,
                               "variants": list(t.variants)} for t in config.tasks},
            "confusion_batches": config.confusion_batches,
            "compander": COMPANDER, "unit": "percentage points"}


def run(config: Config, out: Path, jobs: int = 2, max_minutes: float | None = None,
        prune: int = 0, report_only: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{NAME}.runs.jsonl"
    runs = read_runs(log)
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    deadline = time.monotonic() + (max_minutes * 60 if max_minutes else math.inf)
    complete = True
    pool = make_pool(jobs) if jobs > 1 and not report_only else None
    while True:
        todo, choices = plan_round(config, runs)
        if report_only or not todo:
            complete = not todo
            break
        print(f"{len(todo)} runs in this round ({len(runs)} finished so far), {jobs} "
              f"worker(s), load {os.getloadavg()[0]:.1f}", flush=True)

        def done(rec):
            runs[key(rec)] = rec
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{len(runs)} {rec['task']} {rec['variant']} {rec['protocol']} lr "
                  f"{rec['lr']:g} wd {rec['wd']:g} seed {rec['seed']} ep {rec['epochs']}: "
                  f"test {rec['test_acc']:.2f} val {rec['val_acc']:.2f} "
                  f"({rec['seconds']:.0f} s){' DIVERGED' if rec['diverged'] else ''}",
                  flush=True)

        if not execute(todo, jobs, deadline, done, pool):
            complete = False
            print("time limit reached: stopping here; run again to resume", flush=True)
            _, choices = plan_round(config, runs)
            break
    if pool is not None:
        pool.shutdown()
    result = analyse(config, runs, choices)
    mine = {(t.name) for t in config.tasks}
    meta = _meta(config, jobs, started, load0, prune) | {"complete": complete,
                                                         "runs": len(runs)}
    doc = {"meta": meta, "runs": [r for r in runs.values() if r["task"] in mine],
           "choices": [{"task": t, "variant": v, **c} for (t, v), c in choices.items()],
           **result}
    (out / f"{NAME}.json").write_text(json.dumps(_clean(doc)))
    (out / f"{NAME}.md").write_text(markdown(doc))
    figure(doc, out / f"{NAME}.png")
    return doc


# --------------------------------------------------------------------------- the report

def _clean(x):
    """NaN → None, so the JSON is strict."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _f(x: float | None, nd: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _p(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "—"
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.1e}"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = ["# Does it help? Converged, paired, Holm-corrected (CPU scale: MNIST-1D)\n",
             f"Generated by `python benchmarks/does_it_help.py` "
             f"({'QUICK RUN — pipeline check, not results; ' if m['quick'] else ''}"
             f"{'complete' if m['complete'] else 'INCOMPLETE: runs still to go'}); plan: "
             f"[`does_it_help_plan.md`](does_it_help_plan.md). {m['date']}, {m['setup']}, "
             f"{m['jobs']} worker process(es) on {m['cores']} cores, 1-min load average "
             f"{m['load_1min'][0]:.1f} at the start of this call and {m['load_1min'][1]:.1f} "
             f"at its end (every run records its own); commit {m['commit'] or '?'}; "
             f"{m['runs']} runs finished. Pruned to fit the budget: "
             f"{'; '.join(m['pruned']) or 'nothing'}. Accuracy in percent and differences "
             f"in percentage points throughout; Δ = variant − baseline, paired by seed "
             f"(seeds {m['eval_seeds']}); CI = paired t 95 %; p_holm = Holm-adjusted within "
             f"each regime, family and budget (E, 2E); the Wilcoxon signed-rank p stands "
             f"beside the t test's. A gain or loss is stated only in the primary family, when "
             f"it survives Holm, both lrs lie strictly inside their grids, and the task passed "
             f"the doubling check (or, where it did not, the comparison survives Holm at "
             f"both E and 2E); no number is bold.\n"]
    for tname, t in m["tasks"].items():
        lines += [f"\n## {tname} — regime ({t['regime']}), {t['epochs']} epochs\n",
                  f"{t['title']}.\n"]
        chk = [c for c in doc["regime_checks"] if c["task"] == tname]
        for c in chk:
            lines.append(f"Regime check ({c['rule']}, compact at its chosen lr): train "
                         f"{c['compact_train']:.2f}, test {c['compact_test']:.2f} — "
                         + (f"{'holds' if c['holds'] else 'DOES NOT HOLD'}" if c["regime"] != "c"
                            else f"underfits: {c['underfits']}, overfits: {c['overfits']}")
                         + ".\n")
        conv = {c["variant"]: c for c in doc["convergence"] if c["task"] == tname}
        lines += ["| variant | lr | wd | lr grid (edge?) | n | test | sd | train | val | "
                  f"test at {2 * t['epochs']} ep (Δ, n) | failed | contracted = trained | "
                  "s/run |", "|---|" + "---:|" * 12]
        for c in (c for c in doc["cells"] if c["task"] == tname):
            cv = conv.get(c["variant"])
            grid = f"{min(c['lr_grid']):g}–{max(c['lr_grid']):g}" + (
                f" EDGE ({c['edge']})" if c["edge"] else "") + (
                f", wd edge ({c['wd_edge']})" if c.get("wd_edge") else "")
            lines.append(
                f"| {c['variant']} | {c['lr']:g} | {c['wd']:g} | {grid} | {c.get('n', 0)} | "
                f"{_f(c.get('test_acc_mean'))} | {_f(c.get('test_sd'))} | "
                f"{_f(c.get('train_acc_mean'))} | {_f(c.get('val_acc_mean'))} | "
                + (f"{cv['mean_2E']:.2f} ({cv['move']:+.2f}, {cv['n']})"
                   f"{'' if cv['converged'] else ' MOVED'}" if cv else "—")
                + f" | {c.get('failed', '—')} | {c.get('contract_ok', '—')}/{c.get('n', 0)} | "
                  f"{_f(c.get('seconds_mean'), 0)} |")
        rows = [r for r in doc["comparisons"] if r["task"] == tname]
        if rows:
            lines += ["", "| comparison | family | protocol | epochs | n | Δ (points) | 95 % CI "
                      "| p (t) | p (Wilcoxon) | p_holm | verdict |", "|---|---|---|" + "---:|" * 7
                      + "---|"]
            for r in rows:
                lines.append(
                    f"| {r['variant']} vs {r['baseline']} | {r['family']} | {r['protocol']} | "
                    f"{r['epochs']} | {r['n']} | {_f(r['delta'], sign=True)} | "
                    f"[{_f(r['ci95'][0], sign=True)}, {_f(r['ci95'][1], sign=True)}] | "
                    f"{_p(r['p_t'])} | {_p(r['p_wilcoxon'])} | {_p(r['p_holm'])} | "
                    f"{r['verdict']} |")
        mech = [r for r in doc["mechanisms"] if r["task"] == tname]
        if mech:
            lines += ["", "Mechanisms (on the folded weights; Holm within the family): "
                      "gradient confusion = cosine similarity of mini-batch gradients over "
                      f"all pairs of {m['confusion_batches']} training batches of 64 (eval "
                      "mode; ExpandNets §5.1 claims expanded nets higher); weights = the "
                      "compander paper's §IV-D claims, near zero = |w| < 0.1 × the layer's "
                      "default-init std.", "",
                      "| variant vs baseline | metric | paper's claim | n | Δ | 95 % CI | "
                      "p_holm | verdict |", "|---|---|---|---:|---:|---:|---:|---|"]
            for r in mech:
                lines.append(f"| {r['variant']} vs {r['baseline']} | {r['metric']} | "
                             f"{r['claim']} | {r['n']} | {_f(r['delta'], 4, True)} | "
                             f"[{_f(r['ci95'][0], 4, True)}, {_f(r['ci95'][1], 4, True)}] | "
                             f"{_p(r['p_holm'])} | {r['verdict']} |")
    bad = [r for r in doc["runs"] if r.get("contract_ok") is False]
    lines += ["", f"Contracted model = trained model (test accuracy within one test sample): "
              f"{sum(r.get('contract_ok') is True for r in doc['runs'])} runs agree, "
              f"{len(bad)} disagree or failed to contract; diverged runs "
              f"({sum(bool(r['diverged']) for r in doc['runs'])}) are not contracted and "
              f"count at chance ({CHANCE:g} %)."]
    return "\n".join(lines) + "\n"


def figure(doc: dict, path: Path) -> None:
    """Per task: each variant's test accuracy (mean ± 95 % t CI over the seeds) and its
    wall-clock per run beside it."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no figure", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(doc["meta"]["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3 + 0.35 * 8 * len(tasks)),
                             squeeze=False)
    for (ax, ax2), tname in zip(axes, tasks, strict=True):
        cells = [c for c in doc["cells"] if c["task"] == tname and c.get("n")]
        names = [c["variant"] for c in cells]
        means = [c["test_acc_mean"] for c in cells]
        half = [t_quantile(0.975, c["n"] - 1) * c["test_sd"] / math.sqrt(c["n"])
                if c["n"] > 1 else 0.0 for c in cells]
        ax.errorbar(means, range(len(names)), xerr=half, fmt="o", capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy % (mean, 95 % CI over seeds)")
        ax.set_title(f"{tname} (regime {doc['meta']['tasks'][tname]['regime']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax2.barh(range(len(names)), [c["seconds_mean"] for c in cells], color="grey")
        ax2.set_yticks(range(len(names)), names)
        ax2.invert_yaxis()
        ax2.set_xlabel("wall-clock per run, s (1 thread; load in the .md)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- the pilot

def pilot(out: Path, jobs: int = 2, seeds: int = 5, full: Config | None = None) -> dict:
    """About 5 minutes: (1) seconds per training step of every (task, variant), (2) paired
    runs (5 seeds, lr 0.1, the task's epochs) of compact vs CK on a1-w4 and compact vs
    compander on b1-wide for the paired SD, the MDE and the regime checks, (3) the full
    study's projected compute, no widenings and worst case, for each pruning level."""
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    full = full or Config()
    per_step = {}
    with reproducible(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task in full.tasks:
            (xtr, ytr), val, _ = data_for(task, False)
            for variant in task.variants:
                torch.manual_seed(0)
                model = build(task, variant)
                groups = efx.param_groups(model, 0.05, 5e-4)
                opt = torch.optim.SGD(groups, momentum=0.9)
                gen = torch.Generator().manual_seed(0)
                order = torch.cat([torch.randperm(len(ytr), generator=gen)
                                   for _ in range(math.ceil(BATCH * 29 / len(ytr)))])
                idx = order[:BATCH * 29].split(BATCH)  # 29 full batches, small sets too
                blocks = []  # 5 warm-up steps, then the fastest of 3 blocks of 8 steps:
                for n, i in enumerate(idx):  # robust to other jobs on the machine
                    if n >= 5 and (n - 5) % 8 == 0:
                        blocks.append(time.perf_counter())
                    opt.zero_grad()
                    (F.cross_entropy(model(xtr[i]), ytr[i]) + groups.penalty()).backward()
                    opt.step()
                blocks.append(time.perf_counter())
                step = min(b - a for a, b in zip(blocks, blocks[1:], strict=False)) / 8
                t0 = time.perf_counter()
                accuracy(model, *val)
                per_step[(task.name, variant)] = {"step_s": step,
                                                  "val_s": time.perf_counter() - t0}
    print("seconds per step:", {f"{k[0]} {k[1]}": round(v["step_s"] * 1e3, 2)
                                for k, v in per_step.items()}, "ms", flush=True)
    # paired pilot runs, and the compact net at twice the epochs (a first look at the
    # doubling check)
    a0, a1, b1 = (task_of(full, n) for n in ("a0-branch", "a1-w4", "b1-wide"))
    ss = [90 + s for s in range(seeds)]
    specs = [(False, a1.name, v, "sweep", LR_BASE, WD_BASE, s, a1.epochs)
             for s in ss for v in ("compact", "CK")]
    specs += [(False, b1.name, v, "sweep", LR_BASE, WD_BASE, s, b1.epochs)
              for s in ss for v in ("compact", "compander")]
    specs += [(False, t.name, "compact", "sweep", LR_BASE, WD_BASE, s, e)
              for t in (a1, b1, a0) for s in ss
              for e in ((2 * t.epochs,) if t is not a0 else (t.epochs, 2 * t.epochs))]
    recs = []
    execute(specs, jobs, math.inf, recs.append)
    by = {(r["task"], r["variant"], r["seed"], r["epochs"]): r for r in recs}
    doubling = {}
    for t in (a1, b1, a0):
        e1 = [by[(t.name, "compact", s, t.epochs)]["test_acc"] for s in ss]
        e2 = [by[(t.name, "compact", s, 2 * t.epochs)]["test_acc"] for s in ss]
        doubling[t.name] = {"epochs": t.epochs, "mean_E": statistics.fmean(e1),
                            "mean_2E": statistics.fmean(e2), **paired(e2, e1),
                            "train_E": statistics.fmean(
                                by[(t.name, "compact", s, t.epochs)]["train_acc"]
                                for s in ss)}
    by = {(t, v, s): r for (t, v, s, e), r in by.items()
          if e == task_of(full, t).epochs}
    sds, paired_out = {}, {}
    for task, (va, vb) in ((a1, ("CK", "compact")), (b1, ("compander", "compact"))):
        p = paired([by[(task.name, va, s)]["test_acc"] for s in ss],
                   [by[(task.name, vb, s)]["test_acc"] for s in ss])
        sds[task.name] = p["sd"]
        paired_out[task.name] = {
            "pair": f"{va} vs {vb}", **p,
            "mde_10": mde(p["sd"], 10), "mde_10_holm_worst": None,
            "train": {v: statistics.fmean(by[(task.name, v, s)]["train_acc"] for s in ss)
                      for v in (va, vb)},
            "test": {v: statistics.fmean(by[(task.name, v, s)]["test_acc"] for s in ss)
                     for v in (va, vb)},
            "seconds": {v: statistics.fmean(by[(task.name, v, s)]["seconds"] for s in ss)
                        for v in (va, vb)}}
    # measured wall-clock per run vs the step model: the overhead factor (eval, contract, ...)
    ratios = []
    for r in recs:
        task = task_of(full, r["task"])
        (xtr, _), _, _ = data_for(task, False)
        steps = math.ceil(len(xtr) / BATCH) * r["epochs"]
        ps = per_step[(r["task"], r["variant"])]
        ratios.append(r["seconds"] / (steps * ps["step_s"] + r["epochs"] * ps["val_s"]))
    overhead = statistics.median(ratios)
    projection = []
    for level in range(len(PRUNING) + 1):
        cfg = pruned(full, level)
        projection.append({"prune": level, "pruned": [n for n, _ in PRUNING[:level]],
                           **project(cfg, per_step, overhead)})
    budget = 2 * 90 * 60 * jobs  # worker-seconds in 2 × 90 min on `jobs` cores
    fit = next((p["prune"] for p in projection if p["expected_s"] <= budget), None)
    doc = {"meta": _meta(full, jobs, started, load0, 0), "per_step": {
        f"{k[0]} | {k[1]}": v for k, v in per_step.items()}, "paired": paired_out,
        "overhead_factor": overhead, "projection": projection, "doubling": doubling,
        "budget_worker_s": budget, "recommended_prune": fit,
        "runs": recs}
    for name, p in paired_out.items():
        n_primary = sum(1 for t in full.tasks if t.regime == task_of(full, name).regime
                        for c in t.comparisons if c[2] == "primary")
        p["primary_in_regime"] = n_primary
        p["mde_10_holm_worst"] = mde(p["sd"], 10, alpha=0.05 / n_primary)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}_pilot.json").write_text(json.dumps(_clean(doc), indent=1))
    text = pilot_text(doc)
    (out / f"{NAME}_pilot.md").write_text(text)
    print(text, flush=True)
    return doc


def project(cfg: Config, per_step: dict, overhead: float) -> dict:
    """Worker-seconds of the planned runs: no widening, expected (one widening for half the
    lr searches) and worst case (two widenings everywhere, the decay always moving)."""
    totals = {"none": 0.0, "expected": 0.0, "worst": 0.0}
    runs = {"none": 0, "expected": 0.0, "worst": 0}
    for task in cfg.tasks:
        (xtr, _), _, _ = data_for(task, False)
        steps_epoch = math.ceil(len(xtr) / BATCH)

        def cost(variant, epochs, n, _t=task, _s=steps_epoch):
            ps = per_step[(_t.name, variant)]
            phases = 2 if variant.endswith("+Init") else 1
            return n * overhead * phases * epochs * (_s * ps["step_s"] + ps["val_s"])

        nt = len(cfg.tune_seeds)
        for variant in task.variants:
            grid = len(task.lr_ks)  # + the decay grid and the lr again at the new decay
            base_n = grid * nt + ((len(task.wd_js) - 1 + 4) * nt if task.tune_wd else 0)
            extra = {"none": 0, "expected": 0.5 * 2 * nt, "worst": 2 * 2 * nt * (
                2 if task.tune_wd else 1)}
            for k in totals:
                tune = base_n + extra[k]
                totals[k] += cost(variant, task.epochs, tune)
                totals[k] += cost(variant, task.epochs, len(cfg.eval_seeds))
                totals[k] += cost(variant, 2 * task.epochs, cfg.double_seeds)
                runs[k] += tune + len(cfg.eval_seeds) + cfg.double_seeds
            if variant in task.authors:
                for k in totals:
                    totals[k] += cost(variant, task.epochs, cfg.authors_seeds)
                    runs[k] += cfg.authors_seeds
    return {"none_s": totals["none"], "expected_s": totals["expected"],
            "worst_s": totals["worst"], "runs_expected": runs["expected"]}


def pilot_text(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# Pilot of `benchmarks/does_it_help.py` ({m['date']})\n",
             f"{m['setup']}; {m['jobs']} worker processes on {m['cores']} cores; 1-min load "
             f"average {m['load_1min'][0]:.1f} at the start, {m['load_1min'][1]:.1f} at the "
             f"end; {m['minutes_this_call']:.1f} min; commit {m['commit']}.\n",
             "Seconds per training step (batch 64, 1 thread; +Init: its counterpart's step):\n",
             "| task | variant | ms/step |", "|---|---|---:|"]
    for k, v in doc["per_step"].items():
        t, var = k.split(" | ")
        lines.append(f"| {t} | {var} | {1e3 * v['step_s']:.2f} |")
    lines += ["", f"Measured wall-clock / step model (eval, contraction, confusion, "
              f"load): {doc['overhead_factor']:.2f}×.\n",
              "Paired pilot runs (lr 0.1, wd 5e-4, the task's epochs, seeds 90–94; "
              "accuracy in %):\n",
              "| task | pair | n | Δ | paired sd | MDE, 10 seeds (α 0.05, power 0.8) | "
              "MDE at Holm's strictest α | train (a, b) | test (a, b) | s/run (a, b) |",
              "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for t, p in doc["paired"].items():
        va, vb = p["pair"].split(" vs ")
        lines.append(f"| {t} | {p['pair']} | {p['n']} | {p['delta']:+.2f} | {p['sd']:.2f} | "
                     f"{p['mde_10']:.2f} | {p['mde_10_holm_worst']:.2f} (α = 0.05/"
                     f"{p['primary_in_regime']}) | {p['train'][va]:.2f}, {p['train'][vb]:.2f} | "
                     f"{p['test'][va]:.2f}, {p['test'][vb]:.2f} | "
                     f"{p['seconds'][va]:.0f}, {p['seconds'][vb]:.0f} |")
    lines += ["", "The compact net at twice the epochs (lr 0.1, same seeds; a first look at the "
              "doubling check, not the check itself):", "",
              "| task | epochs | train at E | test at E | test at 2E | move | 95 % CI |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t, d in doc["doubling"].items():
        lines.append(f"| {t} | {d['epochs']} | {d['train_E']:.2f} | {d['mean_E']:.2f} | "
                     f"{d['mean_2E']:.2f} | {d['delta']:+.2f} | [{d['ci95'][0]:+.2f}, "
                     f"{d['ci95'][1]:+.2f}] |")
    lines += ["", f"Projected compute of the full study in worker-minutes (one run = one "
              f"worker; the budget: 2 × 90 min × {m['jobs']} workers = "
              f"{doc['budget_worker_s'] / 60:.0f} worker-minutes):\n",
              "| prune level | pruned | runs (expected) | no widening | expected | worst case |",
              "|---:|---|---:|---:|---:|---:|"]
    for p in doc["projection"]:
        lines.append(f"| {p['prune']} | {'; '.join(p['pruned'][-1:]) or '—'} | "
                     f"{p['runs_expected']:.0f} | {p['none_s'] / 60:.0f} min | "
                     f"{p['expected_s'] / 60:.0f} min | {p['worst_s'] / 60:.0f} min |")
    lines += ["", f"Smallest prune level whose expected compute fits: "
              f"{doc['recommended_prune']}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the whole pipeline on slices, 2 epochs, 2 seeds (into --out "
                             "or a temporary folder, never over the results)")
    parser.add_argument("--pilot", action="store_true", help="~5 min: timing, paired SD, "
                        "projection (writes does_it_help_pilot.{json,md} into --out)")
    parser.add_argument("--report", action="store_true",
                        help="only write the tables and figure from the runs so far")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (≤ 2 here)")
    parser.add_argument("--prune", type=int, default=0,
                        help=f"apply the first N of the plan's pruning order (0–{len(PRUNING)})")
    parser.add_argument("--max-minutes", type=float,
                        help="start no new run after this many minutes (then resume later)")
    args = parser.parse_args(argv)
    if args.pilot:
        pilot(args.out or RESULTS, args.jobs)
        return 0
    if args.quick:
        out = args.out or Path(tempfile.mkdtemp(prefix="does_it_help_quick_"))
        if out.resolve() == RESULTS.resolve():
            parser.error("--quick never writes over benchmarks/results: pick another --out")
        config = QUICK
    else:
        out, config = args.out or RESULTS, pruned(Config(), args.prune)
    doc = run(config, out, args.jobs, args.max_minutes, args.prune, args.report)
    print(f"wrote {out / (NAME + '.json')}, .md, .png; "
          f"{'complete' if doc['meta']['complete'] else 'incomplete'}", flush=True)
    return 0 if doc["meta"]["complete"] or args.report else 3


if __name__ == "__main__":
    raise SystemExit(main())
