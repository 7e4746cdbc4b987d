"""Training-step time and memory of expanded models against their compact networks.

Per training step (forward, backward, ``torch.optim.SGD(momentum=0.9)`` step), torch threads
= 2 (the thread count and torch version are printed and recorded). This machine is shared
and noisy, so every group of cases is timed round-robin in one process: each round times one
step of every case, ``×compact`` is the median over rounds of the case's time divided by the
compact network's time *in the same round*. Memory is counted exactly, not sampled:
parameters + gradients + optimizer state (SGD momentum) + the unique storages autograd saves
for backward — what a step holds at its peak between forward and backward.

The *limit* of an expansion is what no execution can avoid: the compact step, plus composing
the factors (forward + backward, measured alone), plus the optimizer's extra work on the
extra parameters (measured alone); for memory, the compact figure plus parameters, gradients
and momentum of the extra parameters.

    python benchmarks/training_speed.py          # writes results/training_speed.{md,json}
    python benchmarks/training_speed.py --quick  # a smoke run (nothing written)
    python benchmarks/training_speed.py --memory [--device cuda]  # issue 20's run only

``--device`` (default: cuda when present) trains there; steps are timed with
:func:`expandfx.execution.timed`, which synchronizes an accelerator, so a GPU run needs no
edits.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import conftest  # noqa: E402,F401  (torchvision import workaround of this machine)

import expandfx as efx  # noqa: E402
from expandfx import execution  # noqa: E402
from expandfx.linear.costs import layer_macs  # noqa: E402
from expandfx.models import MobileNetV1, smallnet_7x7, smallnet_7x7_ablation  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = 2
DEVICE = torch.device("cpu")  # set by --device; every model and batch is moved there


@dataclass
class Case:
    label: str
    model: nn.Module
    sgd: str = ""  # "", "foreach" or "fused": SGD's implementation ("" = torch's default,
    # a for-loop over the parameters on CPU)
    rule: str = ""
    r: float = 0.0
    mode: str = "compact"


@dataclass
class Group:
    name: str
    batch: int
    size: int
    cases: list[Case]
    repeats: int
    limits: bool = False  # also measure composition and optimizer alone (the limit)
    x: torch.Tensor = field(init=False)
    y: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.batch, 3, self.size, self.size, generator=gen).to(DEVICE)
        self.y = torch.randint(0, 10, (self.batch,), generator=gen).to(DEVICE)


def depthwise_only(name: str, module: nn.Module) -> str | None:
    """The paper's MobileNet setting: CL on the depthwise 3x3 convolutions."""
    return "CL" if isinstance(module, nn.Conv2d) and module.groups > 1 else None


def expanded(compact: nn.Module, rule, r: float, mode: str = "auto", label: str = "",
             sgd: str = "") -> Case:
    big = efx.expand(copy.deepcopy(compact), rule, r=r, mode=mode)
    name = rule if isinstance(rule, str) else "CL (depthwise)"
    suffix = "" if mode == "auto" else f" {mode}"
    return Case(label or f"{name} r={r:g}{suffix}", big, sgd, name, r, mode)


def torchvision_model(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10)


def groups(quick: bool) -> Iterator[Group]:
    torch.manual_seed(0)
    if quick:
        net = smallnet_7x7_ablation()
        yield Group("SmallNet 7x7 ablation (smoke)", 8, 32, [
            Case("compact", net), expanded(net, "CL", 2), expanded(net, "CK", 2),
            expanded(net, "FC", 2)], repeats=2, limits=True)
        return
    net = smallnet_7x7_ablation()
    grid = [expanded(net, rule, r) for rule in ("CL", "CK", "FC") for r in (2, 4, 8)]
    extra = [expanded(net, rule, 4, mode) for rule in ("CL", "CK", "FC")
             for mode in ("collapsed", "sequential")]
    sgd = [Case(f"compact, SGD {kind}", net, kind) for kind in ("foreach", "fused")] + [
        expanded(net, rule, 4, label=f"{rule} r=4, SGD {kind}", sgd=kind)
        for kind in ("foreach", "fused") for rule in ("CL", "CK", "FC")]
    yield (Group("SmallNet 7x7 ablation", 128, 32,
                 [Case("compact", net), *grid, *extra, *sgd], repeats=7, limits=True))
    yield (Group("SmallNet 7x7 ablation", 512, 32, [
        Case("compact", net), *[copy.deepcopy(c) for c in grid],
        expanded(net, "CK", 4, "collapsed")], repeats=5, limits=True))
    yield (Group("SmallNet 7x7 ablation", 32, 32,
                     [Case("compact", net), *[copy.deepcopy(c) for c in grid]], repeats=9,
                     limits=True))
    small = smallnet_7x7()
    yield (Group("SmallNet 7x7", 128, 32, [
        Case("compact", small), *[expanded(small, rule, 4) for rule in ("CL", "CK", "FC")],
        expanded(small, "CL", 8)], repeats=7))
    mobile = MobileNetV1(width_mult=0.5)
    yield (Group("MobileNetV1 (width 0.5)", 64, 64, [
        Case("compact", mobile), expanded(mobile, depthwise_only, 4),
        expanded(mobile, "CL", 4)], repeats=5))
    for name in ("resnet18", "mobilenet_v2"):
        model = torchvision_model(name)
        cases = [Case("compact", model), expanded(model, "CL", 4)]
        if name == "mobilenet_v2":
            cases.append(expanded(model, depthwise_only, 4))
        for size in (32, 64):
            yield (Group(f"torchvision {name}", 32, size,
                             [copy.deepcopy(c) for c in cases], repeats=2, limits=True))


BRANCH_RULES = ("RepVGG", "ACNet", "DBB", "MobileOne", "OREPA")
# (norm, mode) rows per rule; OREPA's block is norm="scale" (it takes no other norm)
NORM_MODES = ((None, "auto"), ("scale", "collapsed"), ("scale", "sequential"), ("bn", "auto"))
RULE_NORM_MODES = {"OREPA": (("scale", "collapsed"), ("scale", "sequential"))}


def branch_group(quick: bool) -> Group:
    """Every branch rule × norm against the compact net: the ExpandNets paper's Table 6
    network (SmallNet 7×7 ablation, biased convs), batch 128, 32×32."""
    torch.manual_seed(0)
    net = smallnet_7x7_ablation()
    rules = ("RepVGG", "OREPA") if quick else BRANCH_RULES
    cases = [Case("compact", net)]
    for rule in rules:
        for norm, mode in RULE_NORM_MODES.get(rule, NORM_MODES):
            big = efx.expand(copy.deepcopy(net), efx.rules.find(rule)(norm=norm), mode=mode)
            cases.append(Case(f"{rule} norm={norm} {mode}", big, "", rule, 1.0,
                              f"{norm}/{mode}"))
    return Group("SmallNet 7x7 ablation", 8 if quick else 128, 32, cases,
                 repeats=1 if quick else 7)


def branch_report(env: dict, rows: list[dict]) -> str:
    lines = [
        "# Training cost of the branch rules × per-branch norms (CPU scale)",
        "",
        f"Measured {env['date']} with torch {env['torch']}, **{env['threads']} threads**, "
        f"`python benchmarks/training_speed.py --branch` ({env['seconds']} s); {env['load']} "
        f"(times are noisy when it is high; memory is exact). The ExpandNets paper's Table 6 "
        f"network (SmallNet 7×7 ablation: four 7×7 "
        f"convs with biases, BN, ReLU, max-pool; 150 K parameters), input 32×32, batch 128 "
        f"(OREPA's own comparison is ResNet-18 on ImageNet, on GPUs); one step = forward, "
        f"backward, SGD "
        f"(momentum 0.9). `time ×`: median over {rows[0]['repeats']} round-robin rounds of "
        f"the step time divided by the compact step of the same round. `memory ×`: parameters "
        f"+ gradients + momentum + the storages autograd saves, over the compact net's (counted"
        f", not sampled). `auto` with `norm=\"bn\"` runs the branches (training-mode BN is "
        f"not linear).",
        "",
        "| rule | norm | mode | params | step ms | time × compact | memory × compact | auto "
        "chose |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        rule, norm_mode = (row["rule"] or "compact"), row["mode"]
        norm, _, mode = norm_mode.partition("/")
        lines.append(f"| {rule} | {norm if mode else ''} | {mode or norm} | {row['params']:,} "
                     f"| {row['step_ms']:.0f} | {row['time_ratio']:.2f} | "
                     f"{row['memory_ratio']:.2f} | {row['auto']} |")
    by = {row["case"]: row for row in rows}
    dbb_bn, dbb_scale = by.get("DBB norm=bn auto"), by.get("DBB norm=scale collapsed")
    if dbb_bn and dbb_scale:
        lines += ["", f"OREPA's claim, DBB with per-branch BN vs collapsed + `scale`: "
                  f"{dbb_bn['time_ratio'] / dbb_scale['time_ratio']:.2f}× the speed (ratio of "
                  f"the two `time ×` medians; of the raw median steps "
                  f"{dbb_bn['step_ms'] / dbb_scale['step_ms']:.2f}×; claimed about 2×), "
                  f"{100 * (1 - dbb_scale['memory_MiB'] / dbb_bn['memory_MiB']):.0f} % less "
                  f"training memory (claimed about 70 %)."]
    orepa = by.get("OREPA norm=scale collapsed")
    if dbb_bn and orepa:
        lines += ["", f"OREPA's own block (collapsed) vs DBB with per-branch BN: "
                  f"{dbb_bn['time_ratio'] / orepa['time_ratio']:.2f}× the speed, "
                  f"{100 * (1 - orepa['memory_MiB'] / dbb_bn['memory_MiB']):.0f} % less "
                  f"training memory (OREPA's 7×7 layers would use its OREPA_LargeConv; "
                  f"the rule applies its k×k block)."]
    return "\n".join(lines) + "\n"


def sgd(model: nn.Module, kind: str = "") -> torch.optim.SGD:
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(kind, {})
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, **flags)


def step_fn(case: Case, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = sgd(case.model, case.sgd)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(case.model(x), y).backward()
        opt.step()

    return step


def compose_fn(model: nn.Module) -> Callable[[], None]:
    """Composing every block's factors, forward and backward (the collapsed mode's overhead)."""
    found = [m for m in model.modules() if isinstance(m, efx.ExpandedBlock)]
    params = [p for m in found for p in m.parameters()]

    def compose() -> None:
        for p in params:
            p.grad = None
        outs = [t for m in found for t in m.weight_bias() if t is not None]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    return compose


def optimizer_fn(model: nn.Module) -> Callable[[], None]:
    """The (default) optimizer step alone, gradients in place."""
    model = copy.deepcopy(model)
    opt = sgd(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return opt.step


def training_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   params_once: bool = True) -> int:
    """Parameters + gradients + optimizer state (SGD momentum) + unique storages saved for
    backward in one step: what a training step holds between forward and backward.

    ``params_once``: a parameter that autograd saves is the parameter's own storage, so it
    is counted once (with the parameters), not again among the saved storages.
    ``params_once=False`` is the accounting of the results before issue 20, which counted a
    saved parameter twice (its effect: up to 4 bytes per parameter of a collapsed block)."""
    saved: dict[int, int] = {}
    own = {p.untyped_storage().data_ptr() for p in model.parameters()} if params_once else set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return 3 * params + sum(saved.values())  # params + grads + momentum + saved


def timed_rounds(fns: list[Callable[[], None]], repeats: int) -> list[list[float]]:
    for fn in fns:  # warm-up; the first forward of "auto" decides its modes
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):  # round-robin: drift of the machine hits every case alike
        for i, fn in enumerate(fns):
            # the library's timer: synchronizes an accelerator before and after the step
            times[i].append(execution.timed(fn, DEVICE))
    return times


def decisions(model: nn.Module, batch: int) -> str:
    """What ``auto`` chose for inputs of this batch size (a model copied from another group
    also carries that group's decisions)."""
    chosen = [c for m in model.modules() if isinstance(m, efx.ExpandedBlock)
              for key, c in m._auto.items() if key[0][0] == batch]
    if not chosen:
        return ""
    return ", ".join(f"{chosen.count(c)} {c}" for c in ("collapsed", "sequential")
                     if chosen.count(c))


def run_group(group: Group) -> list[dict]:
    cases = group.cases
    for case in cases:
        case.model.to(DEVICE)
    fns = [step_fn(c, group.x, group.y) for c in cases]
    extra: dict[str, tuple[int, int]] = {}  # label -> (index of compose fn, of optimizer fn)
    if group.limits:
        compact = cases[0].model
        fns.append(optimizer_fn(compact))
        for case in cases[1:]:
            if case.mode == "auto" and not case.sgd:
                extra[case.label] = (len(fns), len(fns) + 1)
                fns += [compose_fn(case.model), optimizer_fn(case.model)]
    times = timed_rounds(fns, group.repeats)
    base = times[0]
    rows = []
    base_mem = None
    for i, case in enumerate(cases):
        ratios = [t / b for t, b in zip(times[i], base, strict=True)]
        mem = training_bytes(case.model, group.x, group.y)
        params = sum(p.numel() for p in case.model.parameters())
        if base_mem is None:
            base_mem, base_params = mem, params
        row = {"group": group.name, "batch": group.batch, "input": group.size,
               "case": case.label, "rule": case.rule, "r": case.r, "mode": case.mode,
               "sgd": case.sgd or "default", "params": params,
               "step_ms": 1e3 * statistics.median(times[i]),
               "time_ratio": statistics.median(ratios),
               "min_ratio": min(times[i]) / min(base), "memory_MiB": mem / 2**20,
               "memory_ratio": mem / base_mem, "auto": decisions(case.model, group.batch),
               "repeats": group.repeats}
        if case.label in extra:
            c_i, o_i = extra[case.label]
            limit = [(b + c + o - ob) / b for b, c, o, ob in zip(
                base, times[c_i], times[o_i], times[len(cases)], strict=True)]
            row |= {"compose_ms": 1e3 * statistics.median(times[c_i]),
                    "optimizer_extra_ms": 1e3 * (statistics.median(times[o_i])
                                                 - statistics.median(times[len(cases)])),
                    "limit_ratio": statistics.median(limit),
                    "memory_limit_ratio": (base_mem + 12 * (params - base_params)) / base_mem}
        rows.append(row)
        print(f"{group.name}, {group.size}x{group.size}, batch {group.batch} | {case.label}: "
              f"{row['step_ms']:.1f} ms, {row['time_ratio']:.2f}x"
              + (f" (limit {row['limit_ratio']:.2f}x)" if "limit_ratio" in row else "")
              + f", memory {row['memory_ratio']:.2f}x {row['auto']}", flush=True)
    return rows


def crossover(quick: bool) -> list[dict]:
    """Collapsed vs sequential step time against the batch size (ablation net, r = 4)."""
    net = smallnet_7x7_ablation()
    batches = (1, 8) if quick else (1, 2, 4, 8, 16, 32)
    rows = []
    for rule in ("CL", "CK", "FC"):
        cases = [expanded(net, rule, 4, mode) for mode in ("sequential", "collapsed", "auto")]
        for batch in batches:
            group = Group("crossover", batch, 32, cases, repeats=2 if quick else 5)
            times = timed_rounds([step_fn(c, group.x, group.y) for c in cases], group.repeats)
            seq, col, auto = (statistics.median(t) for t in times)
            ratio = statistics.median([c / s for s, c in zip(times[0], times[1], strict=True)])
            rows.append({"rule": rule, "r": 4, "batch": batch, "sequential_ms": 1e3 * seq,
                         "collapsed_ms": 1e3 * col, "auto_ms": 1e3 * auto,
                         "collapsed_over_sequential": ratio,
                         "auto": decisions(cases[2].model, batch)})
            for c in cases:
                efx.set_mode(c.model, c.mode)  # a fresh decision at the next batch size
            print(f"crossover {rule} r=4 batch {batch}: sequential {1e3 * seq:.1f} ms, "
                  f"collapsed {1e3 * col:.1f} ms, auto {1e3 * auto:.1f} ms "
                  f"({rows[-1]['auto']})", flush=True)
    return rows


def find(rows: list[dict], group: str, batch: int, label: str, size: int = 32) -> dict | None:
    for row in rows:
        if (row["group"], row["batch"], row["case"], row["input"]) == (group, batch, label, size):
            return row
    return None


def report(env: dict, rows: list[dict], cross: list[dict]) -> str:
    abl = "SmallNet 7x7 ablation"
    lines = [
        "# Training step of expanded networks vs their compact networks",
        "",
        f"Measured {env['date']} with torch {env['torch']}, **{env['threads']} threads**, "
        f"`python benchmarks/training_speed.py` ({env['seconds']} s). One step = forward, "
        "backward, `torch.optim.SGD(momentum=0.9)` step. `× compact`: median over "
        "round-robin rounds of the case's step time over the compact network's in the same "
        "round; *fastest*: the case's fastest step over the compact network's fastest (robust "
        "when other jobs share the cores). Memory: parameters + gradients + SGD momentum + "
        "unique storages saved for backward (a saved parameter counted once). *Limit*: "
        "compact step + composing the factors "
        "(forward + backward, timed alone) + the optimizer's extra time on the extra "
        "parameters (timed alone) — what no "
        "execution of the expanded net avoids; memory limit: compact + parameters, gradients "
        "and momentum of the extra parameters. Where `auto` runs some blocks sequentially "
        "(the torchvision rows), the time limit, which composes every block, is no lower "
        "bound; the optimizer's extra time alone is. `auto` is the default mode (measured "
        "choice per block); the shared 2-core machine makes single figures noisy by several "
        "percent.",
        "",
        "## Targets (issue 12)",
        "",
        "| target | measured (median ratio) | ratio of fastest steps | limit | met? (median; "
        "fastest) |",
        "|---|---:|---:|---:|---|",
    ]

    def target(text: str, row: dict | None, key: str, bound: float, limit_key: str,
               extra: str = "") -> None:
        if row is None:
            return
        value, limit = row[key], row.get(limit_key)
        fastest = row["min_ratio"] if key == "time_ratio" else value

        def verdict(v: float) -> str:
            return "met" if v <= bound else f"missed by {v - bound:.2f}"

        note = verdict(value) + ("" if key != "time_ratio" else f"; {verdict(fastest)}")
        if limit is not None and limit > bound:
            note += f" — the limit itself is above {bound}×"
        lim = "—" if limit is None else f"{limit:.2f}×"
        fast = f"{fastest:.2f}×" if key == "time_ratio" else "—"
        lines.append(f"| {text} | {value:.2f}× | {fast} | {lim} | {note}{extra} |")

    for rule, bound in (("CL", 1.15), ("CK", 1.25), ("FC", 1.05)):
        row = find(rows, abl, 128, f"{rule} r=4")
        extra = ""
        if rule == "CK" and row is not None:
            gap = row["time_ratio"] / row["limit_ratio"] - 1
            extra = f"; {100 * gap:+.0f} % from the limit (target ≤ +5 %: " + (
                "met)" if gap <= 0.05 else "missed)")
        target(f"ablation, batch 128, {rule} r=4: time ≤ {bound}×", row, "time_ratio",
               bound, "limit_ratio", extra)
    target("ablation, batch 512, CK r=4: time ≤ 1.10×", find(rows, abl, 512, "CK r=4"),
           "time_ratio", 1.10, "limit_ratio")
    for rule in ("CL", "CK"):
        target(f"ablation, batch 128, {rule} r=4: memory ≤ 1.3×", find(rows, abl, 128,
               f"{rule} r=4"), "memory_ratio", 1.3, "memory_limit_ratio")
    for name in ("resnet18", "mobilenet_v2"):
        for size in (32, 64):
            row = find(rows, f"torchvision {name}", 32, "CL r=4", size)
            base = find(rows, f"torchvision {name}", 32, "compact", size)
            extra = ""
            if row is not None and base is not None and "optimizer_extra_ms" in row:
                bound = 1 + row["optimizer_extra_ms"] / base["step_ms"]
                extra = (f"; the optimizer's extra work alone makes ≥ {bound:.2f}× "
                         f"({row['params'] / base['params']:.0f}× the parameters)")
            target(f"torchvision {name}, {size}×{size}, batch 32, CL r=4: time ≤ 1.15×",
                   row, "time_ratio", 1.15, "limit_ratio", extra)

    lines += ["", "## Scaling with batch size and r (ablation net, 32×32, default mode)", "",
              "| expansion | batch 32 | batch 128 | batch 512 | limit at 128 |",
              "|---|---:|---:|---:|---:|"]
    for rule in ("CL", "CK", "FC"):
        for r in (2, 4, 8):
            cells = []
            for batch in (32, 128, 512):
                row = find(rows, abl, batch, f"{rule} r={r}")
                cells.append("—" if row is None else f"{row['time_ratio']:.2f}×")
            row = find(rows, abl, 128, f"{rule} r={r}")
            lim = "—" if row is None or "limit_ratio" not in row else f"{row['limit_ratio']:.2f}×"
            lines.append(f"| {rule} r={r} | " + " | ".join(cells) + f" | {lim} |")

    lines += ["", "## Collapsed vs sequential against the batch size (ablation net, r = 4)", "",
              "| expansion | batch | sequential (ms) | collapsed (ms) | collapsed / sequential "
              "| auto (ms) | auto chose |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in cross:
        lines.append(f"| {row['rule']} r=4 | {row['batch']} | {row['sequential_ms']:.1f} | "
                     f"{row['collapsed_ms']:.1f} | {row['collapsed_over_sequential']:.2f} | "
                     f"{row['auto_ms']:.1f} | {row['auto']} |")
    lines.append("")
    for rule in ("CL", "CK", "FC"):
        mine = [row for row in cross if row["rule"] == rule]
        if not mine:
            continue
        wins = [row["batch"] for row in mine if row["collapsed_over_sequential"] < 1]
        above = next((b for b in sorted(wins) if all(
            row["collapsed_over_sequential"] < 1 for row in mine if row["batch"] >= b)), None)
        lines.append(f"- {rule} r=4: collapsed wins at every measured batch ≥ {above}"
                     if above is not None else f"- {rule} r=4: sequential wins at every "
                     "measured batch")

    lines += ["", "## SGD implementation (ablation net, batch 128, r = 4, default mode)", "",
              "Step time over the compact network with torch's default SGD (a for-loop on CPU); "
              "in brackets, over the compact network with the same SGD implementation.", "",
              "| expansion | default | foreach | fused |", "|---|---:|---:|---:|"]
    for rule in ("compact", "CL", "CK", "FC"):
        cells = []
        for kind in ("", "foreach", "fused"):
            label = ("compact" if rule == "compact" else f"{rule} r=4") + (
                f", SGD {kind}" if kind else "")
            row = find(rows, abl, 128, label)
            own = find(rows, abl, 128, "compact" + (f", SGD {kind}" if kind else ""))
            if row is None or own is None:
                cells.append("—")
                continue
            cells.append(f"{row['time_ratio']:.2f}× ({row['time_ratio'] / own['time_ratio']:.2f}×)")
        lines.append(f"| {rule if rule == 'compact' else rule + ' r=4'} | " + " | ".join(cells)
                     + " |")

    lines += ["", "## Every case", "",
              "| model | input, batch | case | params | step (ms) | × compact | × (fastest) "
              "| limit | memory (MiB) | × compact | auto chose |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lim = f"{row['limit_ratio']:.2f}×" if "limit_ratio" in row else ""
        lines.append(
            f"| {row['group']} | {row['input']}², {row['batch']} | {row['case']} | "
            f"{row['params']:,} | {row['step_ms']:.1f} | {row['time_ratio']:.2f} | "
            f"{row['min_ratio']:.2f} | {lim} | "
            f"{row['memory_MiB']:.1f} | {row['memory_ratio']:.2f} | {row['auto']} |")
    return "\n".join(lines) + "\n"


def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward of a (compact) model's conv/linear layers at this input."""
    total = 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal total
        total += layer_macs(module, list(args[0].shape))[1]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def exact_compose_macs(block: efx.ExpandedBlock) -> tuple[int, int, int]:
    """(forward, recomputed in backward, pairwise-only forward) multiply-accumulates of
    composing a block's factors: a chain as ``compose_chain`` does it (the best pairwise
    order counting tap pairs, or the point method where cheaper), of which the recomputing
    backward redoes all but the last step (``_RecomposeChain``); the last figure is the best
    pairwise order alone (what composition cost before the point method)."""
    from expandfx.linear import compose

    if not block.is_chain:
        macs = execution.compose_macs(block)
        return macs, macs, macs
    shapes = [tuple(f.weight.shape) for f in block.layers]
    total = compose.chain_cost(shapes)
    pairs = compose._best_splits(tuple(shapes))[1]
    return total, total - compose.last_step_cost(shapes), pairs


def memory_run(repeats: int) -> tuple[list[dict], dict]:
    """Issue 20: the Table 6 network at batch 128, r = 4, CL/CK/FC, with the composition
    recomputed in backward (the default) and with its partial products kept (as before),
    in one round-robin run: time and memory against their limits."""
    torch.manual_seed(0)
    net = smallnet_7x7_ablation()
    cases = [Case("compact", net)]
    for rule in ("CL", "CK", "FC"):
        for mode in ("auto", "collapsed"):
            for keep in (False, True):
                case = expanded(net, rule, 4, mode)
                if keep:
                    efx.set_mode(case.model, mode, recompose=False)
                    case.label += " (keep partial products)"
                cases.append(case)
    group = Group("SmallNet 7x7 ablation", 128, 32, cases, repeats=repeats, limits=True)
    rows = run_group(group)
    compact_fwd = forward_macs(net.to(DEVICE), group.x)
    old_base = training_bytes(net, group.x, group.y, params_once=False)
    base_params = sum(p.numel() for p in net.parameters())
    for row, case in zip(rows, cases, strict=True):
        blocks = [m for m in case.model.modules() if isinstance(m, efx.ExpandedBlock)]
        macs = [exact_compose_macs(b) for b in blocks]
        compose = sum(m[0] for m in macs)
        again = sum(m[1] for m in macs)
        pairs = sum(m[2] for m in macs)
        row["compose_fwd_MMAC"] = compose / 1e6  # best order or the point method
        row["recompute_MMAC"] = again / 1e6  # what the recomputing backward redoes
        row["compose_fwd_pairs_MMAC"] = pairs / 1e6  # pairwise only (before the points)
        row["compact_step_GMAC"] = 3 * compact_fwd / 1e9
        # the composition forward + backward (≈ 2× forward) on top of the compact step;
        # recomputing in backward adds all but the last composition step
        row["arithmetic_limit"] = 1 + 3 * compose / (3 * compact_fwd)
        row["arithmetic_limit_recompose"] = 1 + (3 * compose + again) / (3 * compact_fwd)
        row["arithmetic_limit_pairs"] = 1 + 3 * pairs / (3 * compact_fwd)
        row["arithmetic_limit_pairs_recompose"] = 1 + 4 * pairs / (3 * compact_fwd)
        old = training_bytes(case.model, group.x, group.y, params_once=False)
        row["memory_ratio_old_accounting"] = old / old_base
        row["memory_limit_old_accounting"] = (old_base + 12 * (row["params"] - base_params)) \
            / old_base
        if "memory_limit_ratio" not in row:  # collapsed rows: the same limit as auto's
            base_mem = rows[0]["memory_MiB"] * 2**20
            row["memory_limit_ratio"] = (base_mem + 12 * (row["params"] - base_params)) \
                / base_mem
    return rows, {"compact_fwd_GMAC": compact_fwd / 1e9}


def memory_report(env: dict, rows: list[dict]) -> str:
    lines = [
        "# Training memory and time at their limits (issue 20)",
        "",
        f"Measured {env['date']} with torch {env['torch']}, **{env['threads']} threads**, "
        f"device {env['device']}, `python benchmarks/training_speed.py --memory"
        f"{'' if env['device'] == 'cpu' else ' --device ' + env['device']}` "
        f"({env['seconds']} s, {env['repeats']} round-robin rounds). Load: {env['load']}. "
        "Table 6 ablation network (SmallNet 7×7), 32×32, batch 128, r = 4, default SGD "
        "(momentum 0.9). *keep*: collapsed blocks keep the composition's partial products for "
        "backward (the behaviour before this change, `set_mode(..., recompose=False)`); "
        "otherwise backward recomputes them (the default now). Time: median over rounds of "
        "the step time over the compact network's in the same round; *fastest*: fastest over "
        "fastest. *Limit* (measured): compact step + composing the factors forward and backward "
        "(timed alone) + the optimizer's extra work (timed alone). *Arithmetic limit*: compact "
        "step MACs (3 × forward) + composition MACs (3 × its forward: forward and backward) "
        "+ with the recomputation what backward recomputes (all of the composition but its "
        "last step) over the compact step's MACs — optimizer not included. "
        "Memory: parameters + gradients + momentum + unique storages saved for backward, a "
        "saved parameter counted once (it is the parameter's storage); *old accounting* "
        "counts a saved parameter again, as the results before this change did. Memory limit: "
        "compact + 12 bytes per extra parameter.",
        "",
        "| case | step (ms) | × compact | × (fastest) | limit (measured) | arithmetic limit "
        "| memory × compact | memory limit | within | old accounting: memory / limit | "
        "auto chose |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lim = f"{row['limit_ratio']:.2f}×" if "limit_ratio" in row else ""
        recompute = "keep" not in row["case"] and row["mode"] != "compact"
        arith = row["arithmetic_limit_recompose" if recompute else "arithmetic_limit"]
        mem_lim = row.get("memory_limit_ratio", 1.0)
        within = f"{100 * (row['memory_ratio'] / mem_lim - 1):+.1f} %"
        lines.append(
            f"| {row['case']} | {row['step_ms']:.1f} | {row['time_ratio']:.3f} | "
            f"{row['min_ratio']:.3f} | {lim} | {arith:.3f}× | {row['memory_ratio']:.3f} | "
            f"{mem_lim:.3f} | {within} | {row['memory_ratio_old_accounting']:.2f} / "
            f"{row['memory_limit_old_accounting']:.2f} | {row['auto']} |")
    lines += ["", "Composition arithmetic per step (M MACs; *pairs*: the best pairwise order "
              "alone, what composing cost before the point method, with the old recomputation "
              "of the whole composition)", "",
              "| rule | composition forward | recomputed in backward | arithmetic limit: keep "
              "/ recompute | recompute / keep | pairs: forward | pairs: keep / recompute |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for rule in ("CL", "CK", "FC"):
        row = find(rows, rows[0]["group"], 128, f"{rule} r=4")
        if row is not None and "recompute_MMAC" in row:
            lines.append(
                f"| {rule} r=4 | {row['compose_fwd_MMAC']:.1f} | {row['recompute_MMAC']:.1f} | "
                f"{row['arithmetic_limit']:.3f}× / {row['arithmetic_limit_recompose']:.3f}× | "
                f"{row['arithmetic_limit_recompose'] / row['arithmetic_limit']:.3f} | "
                f"{row['compose_fwd_pairs_MMAC']:.1f} | {row['arithmetic_limit_pairs']:.3f}× / "
                f"{row['arithmetic_limit_pairs_recompose']:.3f}× |")
    lines += ["", "Recomputing vs keeping (same run, same mode): step time ratio",
              "", "| rule | mode | recompute / keep (median of the × compact ratios) |",
              "|---|---|---:|"]
    for rule in ("CL", "CK", "FC"):
        for mode in ("auto", "collapsed"):
            suffix = "" if mode == "auto" else " collapsed"
            a = find(rows, rows[0]["group"], 128, f"{rule} r=4{suffix}")
            b = find(rows, rows[0]["group"], 128, f"{rule} r=4{suffix} (keep partial products)")
            if a and b:
                lines.append(f"| {rule} r=4 | {mode} | {a['time_ratio'] / b['time_ratio']:.3f} |")
    group = rows[0]["group"]
    lines += ["", "## Targets (issue 20)", "", "| target | measured | met? |", "|---|---:|---|"]
    for rule in ("CL", "CK", "FC"):
        row = find(rows, group, 128, f"{rule} r=4")
        if row is not None:
            over = row["memory_ratio"] / row["memory_limit_ratio"] - 1
            lines.append(f"| {rule} r=4 (auto): memory within 5 % of its limit "
                         f"({row['memory_limit_ratio']:.3f}×) | {row['memory_ratio']:.3f}× "
                         f"({100 * over:+.1f} %) | {'met' if over <= 0.05 else 'missed'} |")
    for rule in ("CL", "CK", "FC"):
        a = find(rows, group, 128, f"{rule} r=4")
        b = find(rows, group, 128, f"{rule} r=4 (keep partial products)")
        if a and b:
            ratio = a["time_ratio"] / b["time_ratio"]
            lines.append(f"| {rule} r=4 (auto): time ≤ 3 % worse than keeping the partial "
                         f"products (measured) | {ratio:.3f} | "
                         f"{'met' if ratio <= 1.03 else 'missed'} |")
        if a and "recompute_MMAC" in a:
            ratio = a["arithmetic_limit_recompose"] / a["arithmetic_limit"]
            old = a["arithmetic_limit_pairs"]
            lines.append(f"| {rule} r=4: the same by arithmetic (recompute / keep; "
                         f"recompute / keep before the point method) | {ratio:.3f}; "
                         f"{a['arithmetic_limit_recompose'] / old:.3f} | "
                         f"{'met' if ratio <= 1.03 else 'missed'}; "
                         f"{'met' if a['arithmetic_limit_recompose'] <= 1.03 * old else 'missed'}"
                         " |")
    ck = find(rows, group, 128, "CK r=4")
    if ck is not None:
        lines.append(f"| CK r=4: ≤ 1.35× the compact step (measured) | {ck['time_ratio']:.3f}× "
                     f"(fastest {ck['min_ratio']:.3f}×) | "
                     f"{'met' if ck['time_ratio'] <= 1.35 else 'missed'} |")
        lines.append(f"| CK r=4: ≤ 1.35× the compact step (arithmetic limit) | "
                     f"{ck['arithmetic_limit_recompose']:.3f}× | "
                     f"{'met' if ck['arithmetic_limit_recompose'] <= 1.35 else 'missed'} |")
        gap = ck["time_ratio"] / ck["arithmetic_limit_recompose"] - 1
        lines.append(f"| CK r=4: within 5 % of the arithmetic limit "
                     f"({ck['arithmetic_limit_recompose']:.3f}× with the recomputation, "
                     f"{ck['arithmetic_limit']:.3f}× without) | {100 * gap:+.1f} % | "
                     f"{'met' if gap <= 0.05 else 'missed'} |")
    if env.get("notes"):
        lines += ["", env["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, nothing written")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda when present, else cpu)")
    parser.add_argument("--memory", action="store_true",
                        help="only the issue-20 run (Table 6 net, batch 128, r=4): writes "
                             "results/training_memory{,_DEVICE}.{md,json}")
    parser.add_argument("--repeats", type=int, default=15, help="rounds of the --memory run")
    parser.add_argument("--branch", action="store_true", help="only the branch rules × norms "
                        "(writes results/training_speed_branch.{md,json})")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(THREADS)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "device": str(DEVICE)}
    if DEVICE.type == "cuda":
        env["device"] = f"cuda ({torch.cuda.get_device_name(DEVICE)})"
    print(f"torch {env['torch']}, {env['threads']} threads, device {env['device']}", flush=True)
    start = time.perf_counter()
    if args.memory:
        env["load"] = (f"1-min load average {os.getloadavg()[0]:.1f} on "
                       f"{os.cpu_count() or 0} cores at the start")
        rows, extra = memory_run(2 if args.quick else args.repeats)
        env |= extra | {"seconds": round(time.perf_counter() - start), "repeats": args.repeats}
        env["load"] += f", {os.getloadavg()[0]:.1f} at the end"
        text = memory_report(env, rows)
        print(text)
        if not args.quick:
            name = "training_memory" + ("" if DEVICE.type == "cpu" else f"_{DEVICE.type}")
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{name}.json").write_text(
                json.dumps({"env": env, "rows": rows}, indent=1))
            (RESULTS / f"{name}.md").write_text(text)
        if not args.branch:
            return 0  # the issue-20 run only (the docstring's promise)
    if args.branch:
        env["load"] = (f"1-min load average {os.getloadavg()[0]:.1f} on "
                       f"{os.cpu_count() or 0} cores at the start")
        rows = run_group(branch_group(args.quick))
        env["seconds"] = round(time.perf_counter() - start)
        env["load"] += f", {os.getloadavg()[0]:.1f} at the end"
        text = branch_report(env, rows)
        print(text)
        if not args.quick:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "training_speed_branch.json").write_text(
                json.dumps({"env": env, "rows": rows}, indent=1))
            (RESULTS / "training_speed_branch.md").write_text(text)
        return 0
    rows = [row for group in groups(args.quick) for row in run_group(group)]
    cross = crossover(args.quick)
    env["seconds"] = round(time.perf_counter() - start)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "training_speed.json").write_text(
            json.dumps({"env": env, "rows": rows, "crossover": cross}, indent=1))
        (RESULTS / "training_speed.md").write_text(report(env, rows, cross))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
