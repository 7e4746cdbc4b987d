"""The models users actually bring (issue 11): the given model is never changed, one
unusable layer never blocks the rest, equivalent layer classes are recognised, nothing is
skipped without a word, models holding non-leaf tensors can be copied, untraceable models
keep their call-site checks, and the conformance check itself is right."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conformance import roundtrip_record
from support import rel_err
from torch import nn

import expandfx as efx


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
    big = efx.expand(model, efx.CL(r=2, init="preserve")).eval()
    with torch.no_grad():
        assert rel_err(model(x), big(x)) <= 1e-5 and rel_err(big(x), efx.contract(big)(x)) <= 1e-5


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


def weight_normed():
    """A weight-normed conv among plain layers, as in Hugging Face Wav2Vec2."""
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 5, padding=2)),
                         nn.Flatten(), nn.Linear(8 * 6, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("kwargs", [{"rule": "FC"}, {"rule": "CL", "exclude": "2"},
                                    {"rule": {"0": "CL", "4": "FC"}}, {"rule": "CK+FC"},
                                    {"rule": "CL"}])
def test_one_weight_normed_layer_does_not_block_the_model(kwargs):
    model = weight_normed()
    big = efx.expand(model, r=2, **kwargs)
    assert any(isinstance(m, efx.ExpandedBlock) for m in big.modules())
    assert type(big[2]).__name__ == "ParametrizedConv1d"  # left alone
    x = torch.randn(2, 4, 6)
    assert rel_err(big(x), efx.contract(big)(x)) <= 1e-5


def test_weight_normed_layer_is_skipped_with_reason_and_refused_only_when_named():
    model = weight_normed()
    row = efx.plan(model, "CL", 2).rows[1]
    assert row.path == "2" and row.rule is None
    assert "parametrizations on weight (_WeightNorm)" in row.reason
    assert "remove_parametrizations" in row.reason
    with pytest.raises(efx.ConfigError, match=r"'2' already has parametrizations on weight "
                                              r"\(_WeightNorm\).*remove_parametrizations"):
        efx.expand(model, "CL", r=2, include=["0", "2"])
    with pytest.raises(efx.ConfigError, match=r"'2' already has parametrizations"):
        efx.plan(model, {"2": "CL"}, 2)


def test_timm_linear_is_a_plain_linear_and_contracts_to_itself():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    big = efx.expand(model, "FC", r=2)
    assert isinstance(big[0], efx.ExpandedBlock) and type(big[2]) is nn.Linear  # [2]: output
    x = torch.randn(3, 8)
    small = efx.contract(big)
    assert type(small[0]) is timm_layers.Linear and rel_err(big(x), small(x)) <= 1e-5


def test_layers_that_compute_something_else_stay_refused():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.ScaledStdConv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"'0': ScaledStdConv2d subclasses Conv2d and "
                                         r"overrides forward"):
        rows = efx.plan(model, "CL", 2).rows
    assert rows[0].rule is None and "overrides forward" in rows[0].reason
    assert rows[1].rule == "CL"


class XW(nn.Module):
    """y = x @ W + b with the weight stored [in, out] (like transformers' Conv1D)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def test_registered_layer_expands_and_contracts_in_its_own_layout():
    model = nn.Sequential(XW(6, 12), nn.Tanh(), XW(12, 3))
    assert not efx.plan(model, "FC", 2).rows  # unknown class: not a layer at all
    efx.register_layer(XW, kind="linear", weight_to=torch.t, weight_from=torch.t)
    try:
        p = efx.plan(model, "FC", 2, example_inputs=(torch.randn(2, 6),))
        assert [(r.path, r.layer, r.rule) for r in p.rows] == [
            ("0", "XW(6→12)", "FC"), ("2", "XW(12→3)", None)]
        assert p.rows[0].macs_before == 2 * 6 * 12
        big = efx.expand(model, efx.FC(r=2, init="preserve"), include=["*", "2"])
        x = torch.randn(4, 6)
        assert rel_err(model(x), big(x)) <= 1e-5
        small = efx.contract(big)
        assert type(small[2]) is XW and small[2].weight.shape == (12, 3)
        assert rel_err(big(x), small(x)) <= 1e-5
        model.load_state_dict(small.state_dict(), strict=True)
    finally:
        efx.unregister_layer(XW)


def test_register_layer_validates_its_arguments():
    with pytest.raises(efx.ConfigError, match=r"kind must be one of"):
        efx.register_layer(XW, kind="embedding")
    with pytest.raises(efx.ConfigError, match=r"both weight_to and weight_from"):
        efx.register_layer(XW, kind="linear", weight_to=torch.t)


def test_zero_expansions_warn_with_top_reasons_or_raise_when_strict():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.warns(UserWarning, match=r"rule 'CK' expanded no layer of Sequential \(2 "
                                         r"layers holding a linear map's weight: 1 × CK: "
                                         r"kernel.*strict=True"):
        out = efx.expand(model, "CK", r=2)
    assert type(out[0]) is nn.Conv2d
    with pytest.raises(efx.ConfigError, match=r"expanded no layer.*output layer"):
        efx.expand(model, "FC", r=2, strict=True)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.fc(self.conv(x).mean((2, 3))))
        return self.drop(self.out(h)).view(-1, 2, 2)[:, 0]


def test_fc_leaves_the_output_layer_alone_unless_named_exactly():
    rows = {r.path: r for r in efx.plan(Head(), "FC", 2).rows}
    assert rows["fc"].rule == "FC" and rows["out"].rule is None
    assert "the model's output layer (its result is the model's output)" in rows["out"].reason
    for spec, include in (("FC", ["*", "out"]), ({"out": "FC", "*": "FC"}, None)):
        rows = {r.path: r.rule for r in efx.plan(Head(), spec, 2, include=include).rows}
        assert rows["out"] == "FC" and rows["fc"] == "FC"
    assert {r.path: r.rule for r in efx.plan(Head(), {"o*": "FC"}, 2).rows}["out"] is None
    assert {r.path: r.rule for r in efx.plan(Head(), "CL+FC", 2, include="*").rows}["out"] is None


class Untraceable(nn.Module):
    """FX cannot trace it (Hugging Face models fail on ``**kwargs``, this one on control flow
    that reads a value). One conv's weight is read by F.conv2d, one conv is called twice,
    the head ends the model."""

    def __init__(self):
        super().__init__()
        self.read = nn.Conv2d(3, 3, 3, padding=1)
        self.twice = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.abs().sum()) >= 0:  # always taken; FX cannot trace a value test
            x = torch.nn.functional.conv2d(x, self.read.weight, self.read.bias, padding=1)
        x = self.twice(self.twice(x))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def test_untraceable_model_gets_call_site_checks_from_a_recorded_forward():
    model = Untraceable()
    x = torch.randn(2, 3, 6, 6)
    p = efx.plan(model, "CL+FC", 2, example_inputs=(x,))
    rows = {r.path: r for r in p.rows}
    assert not p.traced and p.recorded and "recorded from one forward pass" in str(p)
    assert rows["read"].rule is None and "'weight' read directly by conv2d" in rows["read"].reason
    assert rows["twice"].rule == "CL" and rows["twice"].call_sites == 2
    assert rows["fc"].rule == "FC" and rows["head"].rule is None  # found by identity
    with pytest.warns(UserWarning, match=r"could not trace Untraceable.*recorded from one "
                                         r"forward pass.*Checked.*Not seen"):
        big = efx.expand(model, "CL+FC", r=2, example_inputs=(x,))
    assert type(big.read) is nn.Conv2d and isinstance(big.twice, efx.ExpandedBlock)
    assert rel_err(big(x), efx.contract(big)(x)) <= 1e-5
    with pytest.warns(UserWarning, match=r"module walk.*pass example_inputs"):
        efx.expand(model, "CL", r=2)


def test_registered_block_answers_its_weight_in_the_class_layout():
    efx.register_layer(XW, kind="linear", weight_to=torch.t, weight_from=torch.t)
    try:
        model = nn.Sequential(XW(6, 12), nn.Tanh(), nn.Linear(12, 3))
        big = efx.expand(model, "FC", r=2)
        assert big[0].weight.shape == (6, 12)  # user code reading .weight sees [in, out]
        torch.testing.assert_close(big[0].weight, efx.contract(big)[0].weight)
    finally:
        efx.unregister_layer(XW)
