"""A Table S10-style complexity table on this CPU: compact vs ExpandNet-CL (r = 4 on 3×3 convs).

For the in-repo MobileNetV1-style network (width 1.0) and torchvision's mobilenet_v2 and
shufflenet_v2_x0_5 (random init): parameters and MACs at train and test time (MACs =
``torch.utils.flop_counter`` FLOPs / 2, expanded blocks run layer by layer), training
throughput (forward + backward + SGD step, images/s) of the expanded model run sequentially
(the paper's execution) and collapsed (expandfx's default ``auto``), and inference
throughput of the deployed (contracted) model. Input 3×96×96, batch 16, torch threads = 2,
median of 3 round-robin repeats.

    python benchmarks/complexity_s10.py      # writes benchmarks/results/complexity_s10.md
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import conftest  # noqa: E402,F401  (torchvision import workaround of this machine)

import expandfx as efx  # noqa: E402
from expandfx.models import MobileNetV1  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE, BATCH = (3, 96, 96), 16


def cl_on_3x3(name: str, module: nn.Module) -> str | None:
    return "CL" if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) else None


def models() -> dict[str, nn.Module]:
    import torchvision.models as tvm

    return {"MobileNetV1-style (in-repo, width 1.0)": MobileNetV1(width_mult=1.0),
            "mobilenet_v2 (torchvision)": tvm.mobilenet_v2(),
            "shufflenet_v2_x0_5 (torchvision)": tvm.shufflenet_v2_x0_5()}


def macs(model: nn.Module) -> int:
    model = efx.set_mode(model, "sequential") if any(
        isinstance(m, efx.ExpandedBlock) for m in model.modules()) else model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *SHAPE))
    return counter.get_total_flops() // 2


def train_step(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(BATCH, *SHAPE), torch.randint(0, 10, (BATCH,))

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def infer_step(model: nn.Module):
    x = torch.randn(BATCH, *SHAPE)
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(x)
    return step


def main() -> int:
    torch.set_num_threads(2)
    rows = []
    for name, model in models().items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            big = efx.expand(model, cl_on_3x3, r=4)
        small = efx.contract(big)
        cases = {"compact train": train_step(model),
                 "expanded train (sequential)": train_step(
                     efx.set_mode(efx.expand(model, cl_on_3x3, r=4), "sequential")),
                 "expanded train (auto)": train_step(efx.set_mode(big, "auto")),
                 "deployed inference": infer_step(small)}
        for fn in cases.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(3):
            for key, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        ips = {k: BATCH / statistics.median(v) for k, v in times.items()}
        rows.append((name, sum(p.numel() for p in big.parameters()),
                     sum(p.numel() for p in small.parameters()), macs(big), macs(small), ips))
        print(name, ips, flush=True)
    lines = [f"# Table S10-style complexity on this CPU\n\nMeasured "
             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, 2 threads, input "
             f"{BATCH}×{'×'.join(map(str, SHAPE))}, CL r = 4 on every 3×3 convolution "
             f"(`python benchmarks/complexity_s10.py`). MACs per image = flop_counter FLOPs / 2. "
             f"Throughput in images/s, median of 3.\n",
             "| model | params train | params test | MACs train | MACs test | train img/s "
             "compact | train img/s expanded, sequential | train img/s expanded, auto | "
             "inference img/s deployed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ptr, pte, mtr, mte, ips in rows:
        lines.append(f"| {name} | {ptr / 1e6:.2f}M | {pte / 1e6:.2f}M | {mtr / 1e6:.1f}M | "
                     f"{mte / 1e6:.1f}M | {ips['compact train']:.1f} | "
                     f"{ips['expanded train (sequential)']:.1f} | "
                     f"{ips['expanded train (auto)']:.1f} | {ips['deployed inference']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "complexity_s10.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
