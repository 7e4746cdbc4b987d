"""What FX sees (call sites, shared layers, functional calls, untraceable models) and
the behaviour users rely on (copies, modes, dtypes, checkpoints, per-layer control)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import randomize, rel_err, sgd_steps, state_equal
from torch import nn

import expandfx as efx
from expandfx.models import smallnet_7x7


class SharedConv(nn.Module):
    """One conv called at two call sites, and registered under two names."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.conv
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(torch.relu(self.alias(x)))
        return self.head(x.mean((2, 3)))


class FunctionalUse(nn.Module):
    """A conv module whose weight is also used by a functional call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.other = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.other(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 5, padding=2)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = self.b(x)
        return self.fc(x.mean((2, 3)))


def test_shared_layer_expands_once_and_both_sites_use_it():
    torch.manual_seed(0)
    model = SharedConv()
    p = efx.plan(model, "CL+FC", 2)
    row = next(r for r in p.rows if r.path == "conv")
    assert row.call_sites == 2 and row.aliases == ["alias"] and "called at 2 sites" in str(p)
    big = efx.expand(model, "CL+FC", r=2)
    assert big.conv is big.alias and isinstance(big.conv, efx.ExpandedBlock)
    randomize(big)
    x = torch.randn(2, 4, 6, 6)
    small = efx.contract(big)
    assert small.conv is small.alias
    assert list(small.state_dict()) == list(model.state_dict())
    assert rel_err(big(x), small(x)) <= 1e-5


def test_functional_use_of_weights_is_reported_and_left_alone():
    model = FunctionalUse()
    p = efx.plan(model, "CL", 2)
    row = next(r for r in p.rows if r.path == "conv")
    assert row.rule is None and "conv2d" in row.reason and "'weight'" in row.reason
    assert any("conv2d" in note for note in p.notes)
    big = efx.expand(model, "CL", r=2)
    assert type(big.conv) is nn.Conv2d and isinstance(big.other, efx.ExpandedBlock)
    x = torch.randn(1, 3, 5, 5)
    randomize(big)
    assert rel_err(big(x), efx.contract(big)(x)) <= 1e-5


def test_untraceable_model_is_expanded_by_module_walk_with_warning():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.warns(UserWarning, match=r"could not trace Untraceable.*module walk.*Lost"):
        big = efx.expand(model, "CK+FC", r=2, include=["*", "fc"])  # fc: the output layer
    assert isinstance(big.a, efx.ExpandedBlock) and isinstance(big.fc, efx.ExpandedBlock)
    assert type(big.b) is nn.Conv2d  # 3x3: CK leaves it alone
    x = torch.rand(2, 3, 8, 8)
    sgd_steps(big, x, steps=2)
    assert rel_err(big(x), efx.contract(big)(x)) <= 1e-5
    with pytest.warns(UserWarning, match=r"module walk"):
        pre = efx.expand(model, efx.CL(r=2, init="preserve") + efx.FC(r=2, init="preserve"))
    assert rel_err(model(x), pre(x)) <= 1e-5
    assert "FX could not trace" in str(efx.plan(model, "CL", 2))


def test_layers_inside_torch_builtin_modules_are_left_alone():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.attn(x, x, x)[0])

    model = Attn().eval()
    p = efx.plan(model, "FC", 2)
    row = next(r for r in p.rows if r.path == "attn.out_proj")
    assert row.rule is None and "'attn' (MultiheadAttention)" in row.reason
    big = efx.expand(model, "FC", r=2, include=["*", "proj"]).eval()
    assert isinstance(big.proj, efx.ExpandedBlock)
    x = torch.randn(2, 5, 8)
    randomize(big)
    assert rel_err(big(x), efx.contract(big)(x)) <= 1e-5


def test_expanding_twice_skips_layers_already_inside_blocks():
    big = efx.expand(smallnet_7x7(), "CK", r=2)
    bigger = efx.expand(big, "FC", r=2)
    rows = efx.plan(big, "CL+FC", 2).rows
    assert all(r.rule is None and "already part of" in r.reason
               for r in rows if r.path.startswith("features"))
    x = torch.randn(2, 3, 32, 32)
    bigger.eval()
    small = efx.contract(bigger)
    assert list(small.state_dict()) == list(smallnet_7x7().state_dict())
    assert rel_err(bigger(x), small(x)) <= 1e-5


def test_per_layer_control_mapping_callable_include_exclude():
    model = smallnet_7x7()
    mapping = efx.plan(model, {"features.0": "CK", "features.*": "CL", "classifier.0": "FC"}, 2)
    assert [r.rule for r in mapping.rows] == ["CK", "CL", "CL", "FC", None]
    picked = efx.plan(model, lambda name, m: "CL" if name.endswith("4") else None, 2)
    assert [r.rule for r in picked.rows] == [None, "CL", None, None, None]
    inc = efx.plan(model, "CL+FC", 2, include="classifier.*", exclude=["*.2"])
    assert [r.rule for r in inc.rows] == [None, None, None, "FC", None]
    assert inc.rows[4].reason == "excluded by '*.2'"


def test_plan_counts_and_table():
    model = smallnet_7x7()
    p = efx.plan(model, "CL", 4, example_inputs=(torch.randn(1, 3, 32, 32),))
    conv1 = p.rows[0]
    # 1x1 3->12, 7x7 12->32, 1x1 32->8, all with bias (docs/design.md §3)
    assert conv1.params_after == (3 * 12 + 12) + (12 * 32 * 49 + 32) + (32 * 8 + 8)
    assert conv1.macs_before == 32 * 32 * 8 * 3 * 49
    # the padding sits on the first 1x1 layer, so its output map is 38x38 (as in the paper)
    assert conv1.macs_after == 38 * 38 * 12 * 3 + 32 * 32 * (32 * 12 * 49 + 8 * 32)
    big = efx.expand(model, "CL", 4)
    t = p.totals()
    grown = sum(q.numel() for q in big.parameters()) - sum(q.numel() for q in model.parameters())
    assert t["params_after"] - t["params_before"] == grown
    text = str(p)
    assert "features.0" in text and "Conv2d(3→8, k7, p3)" in text and "1.20M → " in text


def test_copy_modes_dtype_device_requires_grad_are_preserved():
    model = smallnet_7x7().double()
    model.features[0].weight.requires_grad_(False)
    model.eval()
    model.classifier.train()
    big = efx.expand(model, "CL+FC", r=2)
    assert big is not model and not big.training and big.classifier.training
    assert not big.features[0].training and big.classifier[0].training
    assert all(p.dtype == torch.float64 for p in big.parameters())
    assert not any(p.requires_grad for p in big.features[0].parameters() if p.dim() > 1)
    small = efx.contract(big)
    assert small.features[0].weight.dtype == torch.float64
    assert not small.features[0].weight.requires_grad and small.features[0].bias.requires_grad
    assert not small.training and small.classifier.training


def test_inplace_modifies_and_returns_the_given_model():
    model = smallnet_7x7()
    assert efx.expand(model, "CL", r=2, inplace=True) is model
    assert isinstance(model.features[0], efx.ExpandedBlock)
    assert efx.contract(model, inplace=True) is model
    assert type(model.features[0]) is nn.Conv2d


def test_midtraining_checkpoint_loads_into_fresh_expansion():
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CK+FC", r=2)
    x = torch.randn(2, 3, 32, 32)
    sgd_steps(big, x, steps=2)
    ckpt = copy.deepcopy(big.state_dict())
    fresh = efx.expand(smallnet_7x7(), "CK+FC", r=2)
    fresh.load_state_dict(ckpt)
    assert state_equal(fresh.state_dict(), ckpt)
    assert "features.0.layers.2.weight" in ckpt and "classifier.0.layers.1.bias" in ckpt
    big.eval()
    fresh.eval()
    assert torch.equal(big(x), fresh(x))


def test_expand_logs_the_plan(caplog):
    with caplog.at_level("INFO", logger="expandfx"):
        efx.expand(smallnet_7x7(), "CL", r=2)
    assert "features.0" in caplog.text and "CL" in caplog.text


def test_contracted_model_never_depends_on_the_expanded_one():
    big = efx.expand(smallnet_7x7(), "CL", r=2)
    small = efx.contract(big)
    with torch.no_grad():
        for p in big.parameters():
            p.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert small.features[0].weight.abs().sum() > 0


def test_user_code_reading_layer_attributes_keeps_working():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x).mean((2, 3))
            return self.fc(x.view(-1, self.fc.in_features))

        def l2(self):
            return self.conv.weight.pow(2).sum()

    model = Net()
    big = efx.expand(model, "CL+FC", r=2)
    randomize(big)
    x = torch.randn(2, 3, 6, 6)
    assert big(x).shape == (2, 2) and big.conv.out_channels == 4
    small = efx.contract(big)
    torch.testing.assert_close(big.l2(), small.l2(), rtol=1e-5, atol=0)
    big.l2().backward()  # the effective weight is differentiable w.r.t. every factor
    assert all(layer.weight.grad is not None for layer in big.conv.layers)


def test_r_accepts_numpy_and_tensor_scalars():
    import numpy as np

    for r in (np.float32(2.0), torch.tensor(2.0), 2):
        big = efx.expand(smallnet_7x7(), "CL", r=r)
        assert big.features[0].r == 2.0


def test_inplace_expand_logs_the_plan_of_the_given_model(caplog):
    with caplog.at_level("INFO", logger="expandfx"):
        efx.expand(smallnet_7x7(), "CL", r=2, inplace=True)
    assert "already part of" not in caplog.text and "5/5" not in caplog.text
    assert "3/5" in caplog.text


def test_contract_takes_requires_grad_from_the_trained_factors():
    big = efx.expand(smallnet_7x7(), "CL", r=2)
    big.requires_grad_(False)
    small = efx.contract(big)
    assert not any(p.requires_grad for p in small.parameters())


@pytest.mark.parametrize(("name", "rule"), [("smallnet_7x7", "CL+FC"), ("smallnet_7x7", "CK"),
                                            ("mobilenet_v1", "CL"), ("cnn1d", "CK+FC"),
                                            ("tiny_unet", "CL")])
def test_plan_macs_equal_torch_flop_counter(name, rule):
    """The analytic MAC count (plan, auto mode) against torch's own counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from expandfx.models import EXAMPLE_SHAPES, MODELS

    model = MODELS[name]().eval()
    x = torch.randn(EXAMPLE_SHAPES[name])
    totals = efx.plan(model, rule, 2, example_inputs=(x,)).totals()
    big = efx.set_mode(efx.expand(model, rule, r=2), "sequential").eval()
    for counted, net in ((totals["macs_before"], model), (totals["macs_after"], big)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        assert counted == counter.get_total_flops() // 2
