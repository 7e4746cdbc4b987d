"""Training-step time and memory of expanded models: sequential vs collapsed vs auto vs compact.

Per training step (forward, backward, SGD step), torch threads = 2. Every case is
timed round-robin against the others in the same run (this machine is shared and
noisy), ``--repeats`` times, and reported as the median ratio to the compact
network's step. Memory is counted exactly, not sampled: parameters + gradients +
optimizer state (SGD momentum) + the tensors autograd saves for backward (unique
storages), i.e. what a training step holds at its peak between forward and backward.

    python benchmarks/training_speed.py            # writes benchmarks/results/training_speed.md
    python benchmarks/training_speed.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import expandfx as efx
from expandfx.models import MobileNetV1, smallnet_7x7

RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    group: str
    label: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor


def depthwise_only(name: str, module: nn.Module) -> str | None:
    """The paper's MobileNet setting: CL on the depthwise 3x3 convolutions."""
    return "CL" if isinstance(module, nn.Conv2d) and module.groups > 1 else None


def cases(quick: bool) -> list[Case]:
    torch.manual_seed(0)
    batch = 16 if quick else 128
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    out = [Case(f"SmallNet 7x7, 32x32, batch {batch}", "compact", smallnet_7x7(), x, y)]
    configs = [("CL", 4), ("CK", 4), ("FC", 4), ("CL", 8)]
    for rule, r in configs[:2] if quick else configs:
        big = efx.expand(smallnet_7x7(), rule, r=r)
        for mode in ("sequential", "collapsed", "auto"):
            out.append(Case(out[0].group, f"{rule} r={r} {mode}",
                            efx.set_mode(copy.deepcopy(big), mode), x, y))
    batch, size = (8, 64) if quick else (64, 64)
    group = f"MobileNetV1-style (width 0.5), {size}x{size}, batch {batch}"
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    compact = MobileNetV1(width_mult=0.5)
    out.append(Case(group, "compact", compact, x, y))
    big = efx.expand(compact, depthwise_only, r=4)
    for mode in ("sequential", "collapsed", "auto"):
        out.append(Case(group, f"CL r=4 (depthwise) {mode}",
                        efx.set_mode(copy.deepcopy(big), mode), x, y))
    return out


def step_fn(case: Case):
    opt = torch.optim.SGD(case.model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(case.model(case.x), case.y).backward()
        opt.step()

    return step


def training_bytes(case: Case) -> int:
    """Parameters + gradients + optimizer state (SGD momentum) + unique storages saved for
    backward in one step: what a training step holds between forward and backward."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    params = sum(p.numel() * p.element_size() for p in case.model.parameters())
    model = copy.deepcopy(case.model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(case.x), case.y)
    loss.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for st in opt.state.values()
                for t in st.values() if torch.is_tensor(t))
    return 2 * params + state + sum(saved.values())


def measure(all_cases: list[Case], repeats: int, steps: int) -> dict[str, dict]:
    steps_fns = [step_fn(c) for c in all_cases]
    for fn in steps_fns:  # warm-up (and the first forward of "auto" decides its modes)
        fn()
        fn()
    times: list[list[float]] = [[] for _ in all_cases]
    for _ in range(repeats):  # round-robin: drift of the machine hits every case alike
        for i, fn in enumerate(steps_fns):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[i].append((time.perf_counter() - t0) / steps)
    return {f"{c.group} | {c.label}": {"seconds": statistics.median(t), "all": t}
            for c, t in zip(all_cases, times, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    repeats = args.repeats or (2 if args.quick else 5)
    all_cases = cases(args.quick)
    timing = measure(all_cases, repeats, steps=1)
    rows, compact = [], {}
    for case in all_cases:
        key = f"{case.group} | {case.label}"
        mem = training_bytes(case)
        secs = timing[key]["seconds"]
        if case.label == "compact":
            compact[case.group] = (secs, mem)
        base_s, base_m = compact[case.group]
        params = sum(p.numel() for p in case.model.parameters())
        rows.append({"group": case.group, "case": case.label, "params": params,
                     "step_ms": 1e3 * secs, "time_ratio": secs / base_s,
                     "train_MiB": mem / 2**20, "memory_ratio": mem / base_m})
    lines = ["| model | case | params | step (ms, median) | × compact | train memory (MiB) "
             "| × compact |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['group']} | {row['case']} | {row['params']:,} | "
                     f"{row['step_ms']:.1f} | {row['time_ratio']:.2f} | "
                     f"{row['train_MiB']:.1f} | {row['memory_ratio']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        header = (f"# Training step: collapsed vs sequential execution\n\n"
                  f"Measured {time.strftime('%Y-%m-%d')} with torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads, median of {repeats} round-robin "
                  f"repeats of one step (`python benchmarks/training_speed.py`). Memory: "
                  f"parameters + gradients + SGD momentum buffers + unique storages saved "
                  f"for backward.\n\n")
        (RESULTS / "training_speed.md").write_text(header + table + "\n")
        (RESULTS / "training_speed.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
