"""init='preserve': the expanded model computes the given model's function, with live factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import rel_err
from torch import nn

import expandfx as efx
from expandfx.models import EXAMPLE_SHAPES, MODELS


@pytest.mark.parametrize("name", ["smallnet_7x7", "mobilenet_v1", "tiny_resnet", "tiny_unet",
                                  "cnn1d"])
@pytest.mark.parametrize("r", [1, 2.5])
def test_preserve_keeps_function_and_every_factor_learns(name, r):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(EXAMPLE_SHAPES[name])
    big = efx.expand(model, efx.CL(r=r, init="preserve") + efx.FC(r=r, init="preserve")).eval()
    with torch.no_grad():
        assert rel_err(model(x), big(x)) <= 1e-5
    big.train()
    F.mse_loss(big(x), torch.randn_like(big(x))).backward()
    blocks = [m for m in big.modules() if isinstance(m, efx.ExpandedBlock)]
    assert blocks
    for block in blocks:
        for layer in block.layers:
            assert layer.weight.abs().sum() > 0, "degenerate (all-zero) factor"
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_preserve_depthwise_with_channel_multiplier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4, padding_mode="reflect"))
    x = torch.randn(2, 4, 9, 9)
    big = efx.expand(model, efx.CL(r=1.5, init="preserve"))
    with torch.no_grad():
        assert rel_err(model(x), big(x)) <= 1e-5


def test_preserve_refuses_shrinking_widths():
    with pytest.raises(efx.ConfigError, match=r"'0'.*r=0.5.*r >= 1"):
        efx.expand(nn.Sequential(nn.Linear(8, 8)), efx.FC(r=0.5, init="preserve"),
                   include=["0"])


def test_preserve_with_ck_is_refused_clearly():
    with pytest.raises(efx.ConfigError, match=r"CK\(r=2, init='preserve'\): CK cannot honour "
                                              r"init='preserve'.*Use init='default'.*'CL'"):
        efx.CK(r=2, init="preserve")
