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
    with pytest.warns(UserWarning, match=r"'0': Shifted subclasses Conv2d and overrides forward"):
        big = efx.expand(model)
    assert type(big[0]) is Shifted and isinstance(big[1], efx.ExpandedBlock)
    with pytest.warns(UserWarning, match="overrides forward"):
        assert "overrides forward" in efx.plan(model).rows[0].reason


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


def test_tied_weights_are_left_alone_and_reported():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.emb(t))

    p = efx.plan(LM(), "FC", 2)
    assert p.rows[0].rule is None and "tied to emb.weight" in p.rows[0].reason
    big = efx.expand(LM(), "FC", r=2)
    assert big.head.weight is big.emb.weight


def test_hooked_original_layer_is_left_alone_and_reported():
    model = net()
    model[0].register_forward_hook(lambda m, i, o: o * 0)
    with pytest.warns(UserWarning, match=r"'0': has forward hooks.*handle.remove"):
        big = efx.expand(model, r=2)
    assert type(big[0]) is nn.Conv2d and isinstance(big[2], efx.ExpandedBlock)


def test_subclass_overriding_conv_forward_is_left_alone():
    class WSConv(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, w - w.mean((1, 2, 3), keepdim=True), b)

    with pytest.warns(UserWarning, match=r"'0': WSConv subclasses Conv2d and overrides "
                                         r"_conv_forward"):
        big = efx.expand(nn.Sequential(WSConv(3, 4, 3)), r=2)
    assert type(big[0]) is WSConv


def test_subclass_with_extra_tensors_is_left_alone():
    class Masked(nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_buffer("mask", torch.ones(4))

    with pytest.warns(UserWarning, match=r"'0': Masked has tensors besides weight and bias "
                                         r"\(mask\)"):
        big = efx.expand(nn.Sequential(Masked(3, 4, 3)), r=2)
    assert type(big[0]) is Masked


def test_plain_subclass_contracts_back_to_the_subclass():
    class Tagged(nn.Conv2d):
        tag = "mine"

    model = nn.Sequential(Tagged(3, 4, 3, padding=1))
    small = efx.contract(efx.expand(model, r=2))
    assert type(small[0]) is Tagged and small[0].tag == "mine"


def test_layer_referenced_outside_module_tree_is_refused_and_undone():
    class ListRef(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.stages = [self.conv]

        def forward(self, x):
            return self.stages[0](x)

    model = ListRef()
    with pytest.raises(efx.ConfigError, match=r"\['conv'\].*outside the module tree.*ModuleList"):
        efx.expand(model, r=2, inplace=True)
    assert type(model.conv) is nn.Conv2d  # the in-place model was restored


def test_pruned_layer_names_path_and_fix():
    import torch.nn.utils.prune as prune

    model = net()
    prune.l1_unstructured(model[2], "weight", 0.5)
    with pytest.raises(efx.ConfigError, match=r"'2' has no weight parameter.*prune.remove"):
        efx.expand(model, r=2)


@pytest.mark.parametrize(("rule", "match"), [
    ("XL", r"unknown rule \['XL'\]"), ("CL+XX", r"unknown rule \['XX'\]"),
    ("", r"unknown rule \[''\]"), ("cl+ck", r"both CL and CK"), (3, r"must be a string"),
])
def test_rule_errors_say_what_is_wrong(rule, match):
    with pytest.raises(efx.ConfigError, match=match):
        efx.expand(net(), rule=rule)


def test_bad_rule_from_callable_names_the_layer():
    with pytest.raises(efx.ConfigError, match=r"for '0'"):
        efx.expand(net(), rule=lambda name, m: "ZZ")
