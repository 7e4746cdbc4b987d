"""torch.compile on expanded models in each execution mode, and DistributedDataParallel
(gloo, 2 processes on this machine): train a few steps, then contract exactly."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from support import rel_err, run_workers

import expandfx as efx
from expandfx.models import smallnet_3x3

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def train(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["sequential", "collapsed", "auto"])
def test_torch_compile_trains_like_eager_then_contracts_exactly(mode):
    torch.manual_seed(0)
    big = efx.expand(smallnet_3x3(), "CL+FC", r=2, mode=mode)
    eager = copy.deepcopy(big)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train(torch.compile(big), x, y)  # the compiled wrapper shares big's parameters
    train(eager, x, y)
    for (name, p), q in zip(big.named_parameters(), eager.parameters(), strict=True):
        assert rel_err(q.detach(), p.detach()) <= 1e-4, name
    big.eval()
    small = efx.contract(big)
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5
    assert list(small.state_dict()) == list(smallnet_3x3().state_dict())


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same init on both replicas
        big = efx.expand(smallnet_3x3(), "CL+FC", r=2)
        ddp = torch.nn.parallel.DistributedDataParallel(big)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        train(ddp, x, y, steps=3)
        flat = torch.cat([p.detach().flatten() for p in big.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        torch.distributed.all_gather(gathered, flat)
        result = {"identical": all(torch.equal(g, gathered[0]) for g in gathered)}
        if rank == 0:
            big.eval()
            small = efx.contract(big)
            xt = torch.randn(4, 3, 32, 32)
            with torch.no_grad():
                result["contract_error"] = rel_err(big(xt), small(xt))
            report = efx.export_onnx(big, (xt,), os.path.join(folder, "ddp.onnx"))
            result["export_passed"] = report.passed
            result["keys_equal"] = list(small.state_dict()) == list(smallnet_3x3().state_dict())
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_train_identically_and_rank0_contracts(tmp_path):
    run_workers(_ddp_worker, (2, str(tmp_path)), 2, "DDP")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["identical"] for r in results)
    assert results[0]["contract_error"] <= 1e-5
    assert results[0]["export_passed"] and results[0]["keys_equal"]
