"""``expand(model, plan=p)`` carries out a plan — edited or not — without deciding again."""

from __future__ import annotations

import pytest
import torch

import expandfx as efx
from expandfx.models import smallnet_7x7


def test_a_plan_is_carried_out_as_made() -> None:
    model = smallnet_7x7()
    x = torch.randn(2, 3, 32, 32)
    p = efx.plan(model, "CK+FC", r=2, example_inputs=(x,))
    by_plan = efx.expand(model, plan=p)
    direct = efx.expand(model, "CK+FC", r=2)
    rules = lambda m: {n: b.rule for n, b in m.named_modules()  # noqa: E731
                       if isinstance(b, efx.ExpandedBlock)}
    assert rules(by_plan) == rules(direct) and rules(by_plan)
    assert all(b.r == 2 for b in by_plan.modules() if isinstance(b, efx.ExpandedBlock))


def test_an_edited_plan_is_followed_and_checked() -> None:
    model = smallnet_7x7()
    p = efx.plan(model, "CL", r=2)
    p.rows[0].rule = None  # keep the first conv compact
    p.rows[1].rule = "RepVGG"  # 7x7, padding 3: RepVGG applies
    big = efx.expand(model, plan=p)
    assert not isinstance(big.get_submodule(p.rows[0].path), efx.ExpandedBlock)
    assert big.get_submodule(p.rows[1].path).rule == "RepVGG"
    p.rows[3].rule = "ACNet"  # a Linear
    with pytest.raises(efx.ConfigError, match="'classifier.0' rule 'ACNet', but it applies "
                                              "to conv layers"):
        efx.expand(model, plan=p)


def test_a_plan_of_another_model_or_with_other_settings_is_refused() -> None:
    p = efx.plan(smallnet_7x7(), "CL", r=2)
    with pytest.raises(efx.ConfigError, match="not this model's"):
        efx.expand(smallnet_7x7(), plan=p)
    model = smallnet_7x7()
    p = efx.plan(model, "CL", r=2)
    with pytest.raises(efx.ConfigError, match="rule, r would be ignored"):
        efx.expand(model, "CK", r=3, plan=p)
    with pytest.raises(efx.ConfigError, match="takes the Plan"):
        efx.expand(model, plan="CL")
