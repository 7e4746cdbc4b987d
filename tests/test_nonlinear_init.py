"""+Init: nonlinearities inserted and removed, weights kept, contract exact afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from support import rel_err, sgd_steps, state_equal

import expandfx as efx
from expandfx.models import smallnet_7x7


def test_nonlinear_counterpart_then_linearize_then_contract():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    big = efx.expand(smallnet_7x7(), "CK+FC", r=2)
    linear_out = big.eval()(x)
    keys = list(big.state_dict())
    efx.nonlinear_counterpart(big, act="relu")
    assert list(big.state_dict()) == keys  # same checkpoint layout
    with torch.no_grad():
        assert rel_err(linear_out, big(x)) > 1e-3  # the ReLUs change the function
    with pytest.raises(efx.ContractionError, match=r"'features.0' still has its nonlinearity "
                                                   r"\(ReLU\).*expandfx.linearize"):
        efx.contract(big)
    big.train()
    sgd_steps(big, x, steps=3)  # train the nonlinear counterpart
    trained = copy.deepcopy(big.state_dict())
    efx.linearize(big)
    assert state_equal(big.state_dict(), trained)  # weights kept
    assert all(b.act is None for b in big.modules() if isinstance(b, efx.ExpandedBlock))
    sgd_steps(big, x, steps=2)  # continue as an ExpandNet
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
