"""Small helpers shared by the tests (no mocks: real layers, real numbers)."""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter fresh values of a sensible scale (1/sqrt(fan-in) for weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = 1 / math.sqrt(fan_in) if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| — the measure of docs/design.md §4."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def sgd_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """A few real SGD steps on a fixed target, so trained weights are not the init."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()


def state_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


FUZZ = __import__("os").environ.get("HYPOTHESIS_PROFILE") == "fuzz"


def examples(ci: int, fuzz: int) -> int:
    """Hypothesis examples: ``ci`` normally, ``fuzz`` under ``HYPOTHESIS_PROFILE=fuzz``."""
    return fuzz if FUZZ else ci


COUNTS: dict[str, int] = {}


def count(case: str) -> None:
    """Tally one passed random case (reported by conftest after a fuzz run)."""
    COUNTS[case] = COUNTS.get(case, 0) + 1


def run_workers(worker, args: tuple, nprocs: int, what: str, limit: float = 300) -> None:
    """Spawn ``nprocs`` processes running ``worker(rank, *args)`` and wait for them (at most
    ``limit`` seconds); never leave one behind."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} workers did not finish within {limit:g} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def draw_channels(draw, most: int, per_group: int, depthwise: int) -> tuple[int, int, int]:
    """``(groups, in, out)`` of a plain, grouped or depthwise conv, drawn with hypothesis's
    ``draw``: plain up to ``most`` channels, grouped up to ``per_group`` per group (2–3
    groups), depthwise up to ``depthwise`` channels (out = in or 2·in)."""
    from hypothesis import strategies as st

    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if kind == "plain":
        return 1, draw(st.integers(1, most)), draw(st.integers(1, most))
    if kind == "grouped":
        g = draw(st.integers(2, 3))
        return g, g * draw(st.integers(1, per_group)), g * draw(st.integers(1, per_group))
    g = draw(st.integers(2, depthwise))
    return g, g, g * draw(st.integers(1, 2))
