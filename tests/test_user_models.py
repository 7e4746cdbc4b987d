"""The models users actually bring (issue 11): the given model is never changed, one
unusable layer never blocks the rest, equivalent layer classes are recognised, nothing is
skipped without a word, models holding non-leaf tensors can be copied, untraceable models
keep their call-site checks, and the conformance check itself is right."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from support import rel_err
from torch import nn

import expandfx as efx
from expandfx.conformance import roundtrip_record


class CachesInForward(nn.Module):
    """Caches a tensor computed from a parameter in eval mode, as timm's LeViT does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bias_table = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.training:
            bias = self.bias_table * 2
        else:
            if "b" not in self.cache:
                self.cache["b"] = self.bias_table * 2
            bias = self.cache["b"]
        self.last_bias = bias
        return self.fc(self.conv(x).mean((2, 3)) + bias)


def test_plan_and_expand_never_change_a_model_that_caches_in_forward():
    model = CachesInForward().eval()
    before = set(vars(model))
    x = torch.randn(1, 3, 6, 6)
    efx.plan(model, "CL", 2, example_inputs=(x,))
    efx.expand(model, "CL", r=2)
    assert set(vars(model)) == before and model.cache == {}
    torch.save(model, io.BytesIO())  # FX proxies left behind cannot be pickled
    assert efx.plan(model, "CL", 2).rows[0].rule == "CL"  # a second call works too
    big = efx.expand(model, "CL", r=2)
    assert rel_err(model(x), efx.contract(big)(x)) < 1  # both run


class KeepsActivations(nn.Module):
    """Keeps the last training forward's features in a plain list, as torchvision RAFT does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)
        self.pyramid: list[torch.Tensor] = []

    def forward(self, x):
        y = self.conv(x)
        self.pyramid = [y, y * 2]
        return self.head(y)


def test_models_holding_non_leaf_tensors_expand_and_contract():
    model = KeepsActivations()
    x = torch.randn(1, 3, 8, 8)
    model(x)  # a training forward: the list now holds non-leaf tensors
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    big = efx.expand(model, "CL", r=2)
    assert model.pyramid[0].grad_fn is not None  # the given model keeps its own
    big(x).sum().backward()
    small = efx.contract(big)
    assert rel_err(big(x), small(x)) <= 1e-5


def test_a_model_that_cannot_be_copied_names_the_attribute_and_inplace():
    model = KeepsActivations()
    model.lock = __import__("threading").Lock()
    with pytest.raises(efx.ConfigError, match=r"attribute 'lock'.*inplace=True"):
        efx.expand(model, "CL", r=2)
    assert isinstance(efx.expand(model, "CL", r=2, inplace=True).conv, efx.ExpandedBlock)


class CalledTwice(nn.Module):
    """One layer called on two different inputs (an FPN/RPN head)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.stem(x)
        return self.head(a) + self.head(a.flip(-1) * 3)


def test_conformance_check_records_inputs_without_replacing_them():
    rec = roundtrip_record(CalledTwice(), "CL", 2, torch.randn(2, 3, 8, 8))
    assert rec["output_error"] <= 1e-5 and rec["layer_error"] <= 1e-5
