"""Bad inputs of DESIGN.md §5: each is refused with the module path and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import expandfx as efx
from expandfx.models import smallnet_3x3


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))


@pytest.mark.parametrize("r", [0, -1, 0.0, float("nan"), float("inf"), "4", True, None])
def test_r_must_be_positive_number(r):
    with pytest.raises(efx.ConfigError, match=r"r must be a positive number"):
        efx.expand(net(), r=r)


@pytest.mark.parametrize("rule", ["XL", "CL+XX", "", "cl+ck", 3])
def test_unknown_or_conflicting_rule(rule):
    with pytest.raises(efx.ConfigError, match=r"rule"):
        efx.expand(net(), rule=rule)


def test_rule_mapping_is_validated_up_front():
    with pytest.raises(efx.ConfigError, match=r"rule\['features\.\*'\]"):
        efx.expand(smallnet_3x3(), rule={"features.*": "CLL"})


def test_unknown_init():
    with pytest.raises(efx.ConfigError, match=r"init must be one of"):
        efx.expand(net(), init="zeros")


def test_lazy_module_names_path_and_fix():
    model = nn.Sequential(nn.LazyConv2d(8, 3))
    with pytest.raises(efx.ConfigError, match=r"'0'.*lazy.*forward pass"):
        efx.expand(model)
    model(torch.randn(1, 3, 8, 8))  # initialized: now a plain Conv2d and expandable
    assert isinstance(efx.expand(model)[0], efx.ExpandedBlock)


def test_already_parametrized_weight():
    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    model = net()
    parametrize.register_parametrization(model[2], "weight", Scale())
    with pytest.raises(efx.ConfigError, match=r"'2' already has parametrizations on weight"):
        efx.expand(model)


def test_conv_subclass_with_own_forward_is_left_alone_and_reported():
    class Shifted(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(Shifted(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"'0': Shifted subclasses Conv2d with its own forward"):
        big = efx.expand(model)
    assert type(big[0]) is Shifted and isinstance(big[1], efx.ExpandedBlock)
    with pytest.warns(UserWarning, match="own forward"):
        assert "own forward" in efx.plan(model).rows[0].reason


def test_edited_block_is_refused_by_contract():
    big = efx.expand(net(), r=2)
    big[2].layers.insert(1, nn.ReLU())
    with pytest.raises(efx.ContractionError, match=r"block '2' was edited.*ReLU"):
        efx.contract(big)


def test_replaced_factor_with_other_hyperparameters_is_refused():
    big = efx.expand(net(), r=2)
    big[0].layers[1] = nn.Conv2d(12, 32, 3, stride=2)
    with pytest.raises(efx.ContractionError, match=r"block '0' was edited"):
        efx.contract(big)


def test_hooked_block_is_refused_by_contract():
    big = efx.expand(net(), r=2)
    big[0].layers[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(efx.ContractionError, match=r"block '0' has forward hooks.*remove"):
        efx.contract(big)


def test_compact_checkpoint_into_expanded_model():
    model = net()
    big = efx.expand(net(), r=2)
    with pytest.raises(RuntimeError, match=r"'0' is an expanded block.*compact layer"):
        big.load_state_dict(model.state_dict())


def test_checkpoint_of_another_expansion():
    ckpt = efx.expand(net(), r=2).state_dict()
    with pytest.raises(RuntimeError, match=r"'0'.*layers.0.weight.*same rule and r"):
        efx.expand(net(), r=4).load_state_dict(ckpt)


def test_non_tensor_example_inputs():
    with pytest.raises(efx.ConfigError, match=r"example_inputs must be a tensor.*list"):
        efx.plan(net(), example_inputs=([1, 2, 3],))


def test_bad_include_pattern_type():
    with pytest.raises(efx.ConfigError, match=r"include must be a glob pattern"):
        efx.expand(net(), include=[3])


def test_single_layer_model_needs_a_wrapper():
    with pytest.raises(efx.ConfigError, match=r"single layer.*nn.Sequential"):
        efx.expand(nn.Conv2d(3, 4, 3))


def test_contract_without_blocks_says_so():
    model = net()
    with pytest.warns(UserWarning, match=r"no expanded blocks; changed nothing.*equivalent copy"):
        out = efx.contract(model)
    assert out is not model
