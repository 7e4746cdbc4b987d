"""Every in-repo reference model: expand with each applicable rule, train, contract, match."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from support import rel_err, sgd_steps, state_equal

import expandfx as efx
from expandfx.models import EXAMPLE_SHAPES, MODELS

RULES = ["CL", "CK", "FC", "CL+FC", "CK+FC"]


def applicable(name: str, rule: str) -> bool:
    return bool(efx.plan(MODELS[name](), rule, 2).expanded)


CASES = [(n, r) for n in MODELS for r in RULES if applicable(n, r)]


@pytest.mark.parametrize(("name", "rule"), CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_train_then_contract_matches(name, rule):
    torch.manual_seed(0)
    model = MODELS[name]()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(EXAMPLE_SHAPES[name])
    big = efx.expand(model, rule=rule, r=2)
    assert type(big) is type(model)
    sgd_steps(big, x, steps=3)
    big.eval()
    small = efx.contract(big)
    with torch.no_grad():
        err = rel_err(big(x), small(x))
    assert err <= 1e-5, f"{name} {rule}: relative error {err:.2e}"
    # same class, same keys and shapes: the original loads the contracted weights
    assert type(small) is type(model)
    assert {k: v.shape for k, v in small.state_dict().items()} == \
        {k: v.shape for k, v in before.items()}
    model.load_state_dict(small.state_dict())
    model.eval()
    with torch.no_grad():
        assert rel_err(big(x), model(x)) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_original_model_is_untouched(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    before = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    big = efx.expand(model, rule="CL+FC", r=2)
    sgd_steps(big, torch.randn(EXAMPLE_SHAPES[name]), steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        efx.contract(big)
    assert state_equal(model.state_dict(), before)
    assert [type(m) for m in model.modules()] == kinds


def test_never_expanded_parameters_are_bit_identical():
    torch.manual_seed(0)
    model = MODELS["smallnet_7x7"]()
    big = efx.expand(model, rule="CK", r=4)  # the Linears stay
    sgd_steps(big, torch.randn(2, 3, 32, 32), steps=2)
    small = efx.contract(big)
    for key in ("classifier.0.weight", "classifier.2.bias", "features.1.running_mean"):
        assert torch.equal(small.state_dict()[key], big.state_dict()[key])
