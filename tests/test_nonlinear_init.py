"""+Init: nonlinearities inserted and removed, weights kept, contract exact afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from support import rel_err, sgd_steps, state_equal
from torch import nn

import expandfx as efx
from expandfx.models import smallnet_7x7


def test_nonlinear_counterpart_then_linearize_then_contract():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    big = efx.expand(smallnet_7x7(), "CK+FC", r=2)
    linear_out = big.eval()(x)
    keys = list(big.state_dict())
    big = efx.nonlinear_counterpart(big, act="relu", init="keep")
    assert list(big.state_dict()) == keys  # same checkpoint layout
    with torch.no_grad():
        assert rel_err(linear_out, big(x)) > 1e-3  # the ReLUs change the function
    with pytest.raises(efx.ContractionError, match=r"'features.0' still has its nonlinearity "
                                                   r"\(ReLU\).*expandfx.linearize"):
        efx.contract(big)
    big.train()
    sgd_steps(big, x, steps=3)  # train the nonlinear counterpart
    trained = copy.deepcopy(big.state_dict())
    big = efx.linearize(big)
    assert state_equal(big.state_dict(), trained)  # weights kept
    assert all(b.act is None for b in big.modules() if isinstance(b, efx.ExpandedBlock))
    sgd_steps(big, x, steps=2, lr=0.01)  # continue as an ExpandNet
    big.eval()
    small = efx.contract(big)
    with torch.no_grad():
        assert rel_err(big(x), small(x)) <= 1e-5
    assert list(small.state_dict()) == list(smallnet_7x7().state_dict())


def test_nonlinear_block_runs_sequentially_even_in_collapsed_mode():
    big = efx.nonlinear_counterpart(efx.expand(smallnet_7x7(), "CL", r=2, mode="collapsed"),
                                    act="tanh")
    block = big.features[0]
    x = torch.randn(2, 3, 32, 32)
    expected = block.layers[2](torch.tanh(block.layers[1](torch.tanh(block.layers[0](x)))))
    assert torch.allclose(block(x), expected)
    with pytest.raises(efx.ContractionError, match="still has its nonlinearity"):
        _ = block.weight


def test_nonlinear_counterpart_errors():
    with pytest.raises(efx.ConfigError, match=r"act must be one of"):
        efx.nonlinear_counterpart(efx.expand(smallnet_7x7(), "CL", r=2), act="swish9")
    with pytest.raises(efx.ConfigError, match=r"SmallNet has no expanded blocks.*expand"):
        efx.linearize(smallnet_7x7())


def test_he_init_and_keep():
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CK+FC", r=4)
    kept = copy.deepcopy(big)
    kept = efx.nonlinear_counterpart(kept, init="keep")
    assert state_equal(kept.state_dict(), big.state_dict())
    big = efx.nonlinear_counterpart(big, "relu", init="he")
    factors = [layer for m in big.modules() if isinstance(m, efx.ExpandedBlock)
               for layer in m.layers]
    # He: w ~ N(0, 2/fan_in), so Σ w²·fan_in/2 over all weights ≈ their count
    scaled = sum((layer.weight.detach() ** 2 * layer.weight[0].numel() / 2).sum().item()
                 for layer in factors)
    assert scaled / sum(layer.weight.numel() for layer in factors) == pytest.approx(1, abs=0.02)
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in factors)


def block_rms(model, batches):
    rms = {}
    handles = [b.register_forward_hook(
        lambda m, a, out: rms.setdefault(m, []).append(out.pow(2).mean().item()))
        for b in model.modules() if isinstance(b, efx.ExpandedBlock)]
    with torch.no_grad():
        for x in batches:
            model.eval()(x)
    for h in handles:
        h.remove()
    return {m: (sum(v) / len(v)) ** 0.5 for m, v in rms.items()}


def test_linearize_calibrates_block_scales_and_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))
    big = efx.nonlinear_counterpart(efx.expand(model, "CK+FC", r=4, include=["0", "4"]))
    batches = [torch.randn(16, 3, 4, 4) for _ in range(3)]
    before = block_rms(big, batches)
    big.train()
    efx.linearize(big, calibrate=[(x, None) for x in batches], inplace=True)  # loader-style
    assert big.training  # mode kept
    assert all(b.act is None for b in before)
    after = block_rms(big, batches)
    for block, rms in before.items():  # each block has the scale it had with its ReLUs
        assert after[block] == pytest.approx(rms, rel=1e-4)
    # batch norm re-estimated: its running mean is the mean of its inputs over the batches
    inputs = [big[0](x).detach() for x in batches]
    expected = torch.stack([i.mean((0, 2, 3)) for i in inputs]).mean(0)
    torch.testing.assert_close(big[1].running_mean, expected, rtol=1e-4, atol=1e-5)
    assert big[1].momentum == 0.1  # restored
    small = efx.contract(big.eval())
    with torch.no_grad():
        assert rel_err(big(batches[0]), small(batches[0])) <= 1e-5


def test_linearize_without_calibration_keeps_weights_and_empty_calibration_is_refused():
    big = efx.nonlinear_counterpart(efx.expand(smallnet_7x7(), "CL", r=2))
    weights = copy.deepcopy(big.state_dict())
    assert state_equal(efx.linearize(big).state_dict(), weights)
    with pytest.raises(efx.ConfigError, match="calibrate is empty"):
        efx.linearize(efx.nonlinear_counterpart(big), calibrate=[])
