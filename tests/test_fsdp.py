"""FSDP2 (``fully_shard``) on an expanded model: 2 processes (gloo, CPU) train the same
steps as one process, then ``contract`` and ``export_onnx`` on the sharded model give the
compact model that the single-process run contracts to."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from support import run_workers
from torch import nn

import expandfx as efx

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
STEPS, WORLD, BATCH = 3, 2, 8


def _data():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * BATCH, 3, 16, 16, generator=gen)
    return x, torch.randint(0, 10, (WORLD * BATCH,), generator=gen)


def _train(model, x, y) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _compact() -> nn.Module:
    """No BatchNorm: its batch statistics over one rank's half differ from the whole
    batch's, so with BatchNorm no data-parallel run equals one process (SyncBatchNorm
    would)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _expanded(mode: str):
    torch.manual_seed(0)
    return efx.expand(_compact(), "CL+FC", r=2, mode=mode)


def _fsdp_worker(rank: int, world: int, folder: str, mode: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        big = efx.shard(_expanded(mode))  # fully_shard per block, then the root
        n_sharded = sum(type(m).__name__.startswith("FSDP") for m in big.modules())
        x, y = _data()
        local = slice(rank * BATCH, (rank + 1) * BATCH)  # each rank its half of the batch
        losses = _train(big, x[local], y[local])
        # the global loss of each step: the mean of the ranks' means (equal halves)
        stacked = torch.stack(losses)
        torch.distributed.all_reduce(stacked)
        small = efx.contract(big)  # every rank, collectively
        report = efx.export_onnx(big, (x[:2],), os.path.join(folder, "fsdp.onnx"))
        torch.save({"losses": (stacked / world).tolist(), "small": small.state_dict(),
                    "n_sharded": n_sharded, "report": None if report is None else
                    {"passed": report.passed, "path": str(report.path)}},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_two_processes_train_and_contract_like_one_process(tmp_path, mode="collapsed"):
    """Collapsed mode: the case that needs a block-level shard (its forward reads every
    factor's weight without calling the factors)."""
    run_workers(_fsdp_worker, (WORLD, str(tmp_path), mode), WORLD, "FSDP")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # the same steps in one process: the whole batch, whose mean loss averages the halves
    single = _expanded(mode)
    x, y = _data()
    losses = [loss.item() for loss in _train(single, x, y)]
    small = efx.contract(single)

    assert ranks[0]["n_sharded"] == 1 + sum(isinstance(m, efx.ExpandedBlock)
                                            for m in single.modules())
    for result in ranks:
        assert result["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
        assert list(result["small"]) == list(_compact().state_dict())
        for key, value in small.state_dict().items():
            torch.testing.assert_close(result["small"][key], value, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]  # it trained
    assert ranks[0]["report"]["passed"] and os.path.exists(ranks[0]["report"]["path"])
    assert ranks[1]["report"] is None  # one rank writes
