"""The catalogue of bad inputs (docs/design.md §5) across expand, contract, compand, bake,
export_onnx and the command line: each asserts the exception type, that the message names
the offending module or argument, and what to do. None returns a NaN-filled or silently
wrong model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import expandfx as efx
from expandfx.models import TinyResNet, smallnet_3x3, smallnet_7x7
from expandfx.rules import RULES


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))


@pytest.mark.parametrize("r", [0, -1, 0.0, float("nan"), float("inf"), "4", True])
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
    with pytest.raises(efx.ConfigError, match=r"'0'.*lazy.*model\(x\)") as err:
        efx.expand(model, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert "example_inputs" not in str(err.value)  # they do not initialize it (issue #22)
    model(torch.randn(1, 3, 8, 8))  # initialized: now a plain Conv2d and expandable
    assert isinstance(efx.expand(model)[0], efx.ExpandedBlock)


def test_already_parametrized_weight():
    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    model = net()
    parametrize.register_parametrization(model[2], "weight", Scale())
    row = efx.plan(model).rows[1]  # one such layer does not block the others: skipped
    assert row.rule is None and "already has parametrizations on weight (Scale)" in row.reason
    with pytest.raises(efx.ConfigError, match=r"'2' already has parametrizations on weight "
                                              r"\(Scale\).*remove_parametrizations"):
        efx.expand(model, include=["2"])  # asked for by its exact path: refused


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


def test_checkpoint_of_another_rule_leads_with_the_diagnosis():
    """Issue #22: expandfx's diagnosis used to come after 1–2 KB of torch's key lists."""
    ckpt = efx.expand(smallnet_7x7(), "CL", r=2).state_dict()
    with pytest.raises(RuntimeError) as err:
        efx.expand(smallnet_7x7(), "ACNet").load_state_dict(ckpt)
    lines = str(err.value).splitlines()
    assert "the checkpoint was saved from another expansion rule" in lines[1]
    assert "Missing key(s)" not in str(err.value) and "Unexpected key(s)" not in str(err.value)
    with pytest.raises(RuntimeError) as err:  # a compact checkpoint: the same
        efx.expand(smallnet_7x7(), "CL", r=2).load_state_dict(smallnet_7x7().state_dict())
    assert "is an expanded block (CL, r=2) but the checkpoint holds a compact layer" in \
        str(err.value).splitlines()[1]
    assert "Missing key(s)" not in str(err.value)
    # keys that the diagnosis does not explain are still listed
    ckpt = efx.expand(smallnet_7x7(), "CL", r=2).state_dict()
    ckpt["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"extra.weight\""):
        efx.expand(smallnet_7x7(), "ACNet").load_state_dict(ckpt)


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
        efx.expand(model, {"2": "CL", "*": "CL"}, r=2)
    assert "has no weight parameter" in efx.plan(model).rows[1].reason  # skipped, not raised
    big = efx.expand(model, r=2)
    assert isinstance(big[0], efx.ExpandedBlock) and not isinstance(big[2], efx.ExpandedBlock)


@pytest.mark.parametrize(("rule", "match"), [
    ("XL", r"unknown rule \['XL'\]"), ("CL+XX", r"unknown rule \['XX'\]"),
    ("", r"unknown rule \[''\]"), ("cl+ck", r"conv layers \['CK', 'CL'\]; a layer takes one"),
    (3, r"must be a string"),
])
def test_rule_errors_say_what_is_wrong(rule, match):
    with pytest.raises(efx.ConfigError, match=match):
        efx.expand(net(), rule=rule)


def test_bad_rule_from_callable_names_the_layer():
    with pytest.raises(efx.ConfigError, match=r"for '0'"):
        efx.expand(net(), rule=lambda name, m: "ZZ")


# --- compand / bake ---------------------------------------------------------------------


def small_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"psi": "tanh"}, r"unknown psi 'tanh'"),
    ({"a": 0}, r"a must be a positive number"),
    ({"b": -1.0}, r"b must be a positive number"),
    ({"learnable": "all"}, r"learnable must be one of"),
])
def test_bad_compander_arguments(kwargs, match):
    with pytest.raises(efx.ConfigError, match=match):
        efx.compand(small_linear(), **kwargs)


def test_weights_outside_psi_range_are_refused_with_layer_and_bound():
    model = small_linear()
    with torch.no_grad():
        model[2].weight[0, 0] = 2.0
    msg = r"'2' has \|w\| up to 2.*a·1.571 = 0.7854.*a > 1.273"
    with pytest.raises(efx.ConfigError, match=msg):
        efx.compand(model, psi="arctan", a=0.5)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # nothing half-done


def test_compand_twice_is_refused():
    model = efx.compand(small_linear())
    with pytest.raises(efx.ConfigError, match=r"'0' already has a parametrization.*bake"):
        efx.compand(model)


def test_expand_after_compand_is_refused():
    model = efx.compand(small_linear())
    with pytest.raises(efx.ConfigError, match=r"'0' already has parametrizations.*compand"):
        efx.expand(model, "FC", r=2, include=["0"])
    with pytest.warns(UserWarning, match=r"expanded no layer.*already has parametrizations"):
        efx.expand(model, "FC", r=2)


def test_compand_of_meta_model_names_layer_and_fix():
    with torch.device("meta"):
        model = smallnet_3x3()
    with pytest.raises(efx.ConfigError, match=r"'features.0' is on the meta device.*to_empty"):
        efx.compand(model)


def test_compander_checkpoint_with_other_psi_is_refused():
    ckpt = efx.compand(small_linear(), psi="erf").state_dict()
    with pytest.raises(efx.ConfigError, match=r"psi='erf'.*psi='arctan'.*same psi"):
        efx.compand(small_linear(), psi="arctan").load_state_dict(ckpt)


def test_bake_of_plain_model_is_an_unchanged_copy():
    model = small_linear()
    out = efx.bake(model)
    assert out is not model and list(out.state_dict()) == list(model.state_dict())


# --- export_onnx ------------------------------------------------------------------------


def test_export_of_meta_model(tmp_path):
    with torch.device("meta"):
        model = smallnet_3x3()
    with pytest.raises(efx.ConfigError, match=r"'features.0.weight'.*meta device.*to_empty"):
        efx.export_onnx(model, (torch.randn(1, 3, 32, 32),), tmp_path / "m.onnx")


def test_export_of_bfloat16_model_says_to_cast(tmp_path):
    model = efx.expand(smallnet_3x3(), "CL", r=2).bfloat16().eval()
    with pytest.raises(efx.ConfigError, match=r"checker rejected.*bfloat16.*model.float\(\)"):
        efx.export_onnx(model, (torch.randn(2, 3, 32, 32).bfloat16(),), tmp_path / "m.onnx")


def test_export_with_wrong_input_shape_names_model_and_fix(tmp_path, capfd):
    # issue #22: the model runs eagerly first; one line, the real shape error, no ANSI codes,
    # no advice about a dynamic batch that does not apply, no exporter log on the console
    with pytest.raises(efx.ConfigError, match=r"SmallNet \(eval mode\) fails on the given "
                                              r"inputs \[\(2, 3, 7, 7\) float32\]: RuntimeError"
                                              r".*Kernel size can't be greater") as err:
        efx.export_onnx(smallnet_3x3(), (torch.randn(2, 3, 7, 7),), tmp_path / "m.onnx")
    text = str(err.value)
    assert "\n" not in text and "\x1b" not in text and "dynamic_batch" not in text
    out, errs = capfd.readouterr()
    assert "always_classified" not in errs and "_trace.py" not in errs


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1  # torch.export cannot trace this branch


def test_exporter_failure_keeps_its_log_off_the_console(tmp_path, capfd):
    model = nn.Sequential(nn.Linear(3, 3), DataDependent())
    with pytest.raises(efx.ConfigError, match=r"torch.onnx.export failed for Sequential "
                                              r"\(eval mode\): GuardOnDataDependentSymNode: "
                                              r"Could not guard on data-dependent") as err:
        efx.export_onnx(model, (torch.randn(2, 3),), tmp_path / "m.onnx")
    text = str(err.value)
    assert "\x1b" not in text and "step 1/3" not in text and "dynamic_batch" not in text
    assert "def forward(" in err.value.export_log  # the exporter's graph dump: kept ...
    out, errs = capfd.readouterr()
    assert "def forward(" not in errs + out and "data-dependent" not in errs + out  # not printed


def test_model_with_a_fixed_batch_gets_the_dynamic_batch_advice(tmp_path):
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(2, -1)

    model = nn.Sequential(nn.Linear(3, 3), Fixed())
    with pytest.raises(efx.ConfigError, match=r"Sequential fails at batch size 5 .*shape "
                                              r"'\[2, -1\]' is invalid.*dynamic_batch=False"):
        efx.export_onnx(model, (torch.randn(2, 3),), tmp_path / "m.onnx")
    assert efx.export_onnx(model, (torch.randn(2, 3),), tmp_path / "m.onnx",
                           dynamic_batch=False).passed


def test_a_successful_export_keeps_the_exporter_log_in_the_report(tmp_path, capfd):
    report = efx.export_onnx(nn.Sequential(nn.Linear(3, 3)), (torch.randn(2, 3),),
                             tmp_path / "m.onnx")
    assert report.passed and isinstance(report.export_log, str)
    assert "export_log" in report.to_json()
    out, errs = capfd.readouterr()
    assert "torch.onnx" not in out + errs


def test_half_precision_model_round_trips_within_fp16_tolerance(tmp_path):
    torch.manual_seed(0)
    model = smallnet_3x3().half().eval()
    x = torch.randn(2, 3, 32, 32).half()
    big = efx.expand(model, "CL+FC", r=2).eval()
    small = efx.contract(big)
    assert all(p.dtype == torch.float16 for p in small.parameters())
    with torch.no_grad():
        out, ref = small(x), big(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-3 * 4, atol=1e-3)  # fp16: float64 fold, cast
    assert efx.export_onnx(big, (x,), tmp_path / "h.onnx").passed


def test_meta_model_expands_and_contracts_structurally():
    with torch.device("meta"):
        model = smallnet_7x7()
    small = efx.contract(efx.expand(model, "CK+FC", r=2))
    assert [tuple(p.shape) for p in small.parameters()] == \
        [tuple(p.shape) for p in model.parameters()]


# --- command line -------------------------------------------------------------------------


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "expandfx", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "no_such_model"], "unknown model 'no_such_model'"),
    (["plan", "smallnet_7x7", "--input", "1,x,3"], "bad --input '1,x,3'"),
    (["plan", "nosuchpkg.mod:factory", "--input", "1,3"], "cannot load 'nosuchpkg.mod:factory'"),
    (["plan", "smallnet_7x7", "--rule", "XYZ"], "unknown rule"),
    (["plan", "smallnet_7x7", "--input", "1,3,8,8"], "cannot run on an input of shape 1,3,8,8"),
    (["check", "smallnet_7x7", "--input", "1,3"], "cannot run on an input of shape 1,3"),
    (["plan", "expandfx.models:get_model", "--input", "1,3"], "failed when called with no "),
    (["export", "smallnet_7x7", "--weights", "missing.pt", "--out", "m.onnx"],
     "checkpoint 'missing.pt' not found"),
])
def test_malformed_input_gives_one_line_error(args, message, tmp_path):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_rejects_non_positive_epochs():
    out = cli("demo", "--epochs", "0")
    assert out.returncode == 2 and "expected a positive integer, got '0'" in out.stderr
    assert "Traceback" not in out.stderr


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save(TinyResNet().state_dict(), ckpt)
    out = cli("export", "smallnet_7x7", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"))
    assert out.returncode == 2 and "does not fit smallnet_7x7" in out.stderr
    assert "Traceback" not in out.stderr


def test_modified_adaptive_twice_or_lbfgs_is_refused():
    model = efx.compand(small_linear())
    opt = efx.modified_adaptive(torch.optim.Adam(model.parameters()), model)
    with pytest.raises(efx.ConfigError, match=r"already patched; apply modified_adaptive once"):
        efx.modified_adaptive(opt, model)
    with pytest.raises(efx.ConfigError, match=r"LBFGS.*Adam-style"):
        efx.modified_adaptive(torch.optim.LBFGS(model.parameters()), model)
    biases = torch.optim.SGD([model[0].bias], lr=0.1)
    with pytest.raises(efx.ConfigError, match=r"holds no companded weight of Sequential"):
        efx.modified_adaptive(biases, model)


def test_nonlinear_counterpart_refuses_a_module_instance():
    big = efx.expand(net(), "CL", r=2)
    with pytest.raises(efx.ConfigError, match=r"pass nn.ReLU, not nn.ReLU\(\)"):
        efx.nonlinear_counterpart(big, nn.ReLU())
    with pytest.raises(efx.ConfigError, match=r"returned Tensor"):
        efx.nonlinear_counterpart(big, lambda: torch.zeros(1))


# --- issue #22: the promises users rely on ------------------------------------------------


class UserNet(nn.Module):
    """The new user's model of issue #22: a 5×5 stem, a depthwise-separable block with a
    residual, attention, a GRU, a transposed-conv decoder and two Linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, padding=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        t, _ = self.gru(t)
        x = self.up(t.transpose(1, 2).reshape(b, c, h, w))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


USER_X = torch.randn(2, 3, 8, 8)


def test_exact_mapping_key_raises_even_when_other_layers_expand():
    with pytest.raises(efx.ConfigError, match=r"'dw' was requested exactly \(rule mapping key "
                                              r"'dw'\).*no odd size > 3.*map it to None"):
        efx.expand(UserNet(), {"dw": "CK", "*": "CK"}, 2, example_inputs=(USER_X,))
    # a glob is no request: the same layer is skipped with its reason, the stem expands
    big = efx.expand(UserNet(), {"d*": "CK", "*": "CK"}, 4, example_inputs=(USER_X,))
    assert isinstance(big.stem, efx.ExpandedBlock) and type(big.dw) is nn.Conv2d
    # a key mapped to None is the user's own choice: no error
    big = efx.expand(UserNet(), {"dw": None, "*": "CK"}, 4, example_inputs=(USER_X,))
    assert type(big.dw) is nn.Conv2d


def test_exact_include_raises_even_when_other_layers_expand():
    with pytest.raises(efx.ConfigError, match=r"'attn.out_proj' was requested exactly "
                                              r"\(include=\['attn.out_proj'\]\).*"
                                              r"MultiheadAttention.*drop it from include="):
        efx.expand(UserNet(), "FC", 2, include=["*", "attn.out_proj"], example_inputs=(USER_X,))
    with pytest.raises(efx.ConfigError, match=r"'fc1' was requested exactly.*rule CL does not "
                                              r"apply to Linear"):
        efx.expand(UserNet(), "CL", 2, include=["*", "fc1"], example_inputs=(USER_X,))
    # exclude= is the user's choice too: it wins over an exact include, silently
    big = efx.expand(UserNet(), "CL+FC", 2, include=["*", "fc1"], exclude=["fc1"],
                     example_inputs=(USER_X,))
    assert type(big.fc1) is nn.Linear


def test_an_expansion_that_would_contract_the_layer_is_skipped_or_raises():
    model = UserNet()
    row = next(r for r in efx.plan(model, "CK", 2, example_inputs=(USER_X,)).rows
               if r.path == "stem")
    # CK at r=2: factors (6,3,3,3) and (16,6,3,3) hold 1,048 parameters for a 1,216 layer
    assert row.rule is None
    assert row.reason == ("CK at r=2 on 'stem' would hold 1.05K parameters for a 1.22K layer, "
                          "so it cannot represent every weight of the layer it replaces: use "
                          "r >= 2.25 (or another rule)")
    with pytest.raises(efx.ConfigError, match=r"'stem' was requested exactly.*1.05K parameters"):
        efx.expand(model, {"stem": "CK"}, 2, example_inputs=(USER_X,))
    big = efx.expand(model, {"stem": "CK"}, 2.25, example_inputs=(USER_X,))  # the fix it names
    assert sum(p.numel() for p in big.stem.parameters()) == 1220 >= 1216


def test_an_expansion_below_the_layers_rank_is_skipped():
    # FC at r=0.5 on 8→8: more parameters (3 layers) but rank ≤ 4 < 8
    plan = efx.plan(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "FC", 0.5)
    assert "rank at most 4 (per group) where the layer reaches rank 8" in plan.rows[0].reason
    assert "use r >= 1" in plan.rows[0].reason
    # CL at r=0.5 on a 3×3 conv 1→8: 82 parameters for 80, but the last 1×1 has 4 inputs
    plan = efx.plan(nn.Sequential(nn.Conv2d(1, 8, 3)), "CL", 0.5)
    assert "rank at most 4" in plan.rows[0].reason and "reaches rank 8" in plan.rows[0].reason
    # depthwise: widths round up to one channel per group, which reaches every weight
    assert efx.plan(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), "CL", 0.5).rows[0].rule == "CL"


def test_cli_checkpoint_of_another_rule_keeps_the_whole_diagnosis(tmp_path):
    ckpt = tmp_path / "cl.pt"
    torch.save(efx.expand(smallnet_7x7(), "CL", r=2).state_dict(), ckpt)
    out = cli("export", "smallnet_7x7", "--weights", str(ckpt), "--rule", "CK", "--r", "2",
              "--out", str(tmp_path / "m.onnx"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "Expand the fresh model with the same rule and r as the checkpoint." in out.stderr
    assert "Missing key" not in out.stderr


def test_cli_include_reaches_the_output_layer_and_exact_names_raise(tmp_path):
    out = cli("plan", "smallnet_7x7", "--rule", "FC", "--include", "*,classifier.2")
    assert out.returncode == 0
    row = next(line for line in out.stdout.splitlines() if line.startswith("classifier.2"))
    assert " FC(r=4) " in row and "650 → " in row
    out = cli("plan", "smallnet_7x7", "--rule", "FC", "--include", "*", "--exclude",
              "classifier.0")
    row = next(line for line in out.stdout.splitlines() if line.startswith("classifier.0"))
    assert "excluded by 'classifier.0'" in row
    out = cli("plan", "smallnet_7x7", "--rule", "CK", "--r", "1", "--include", "features.0")
    assert out.returncode == 2 and "'features.0' was requested exactly" in out.stderr


def test_torchscript_of_an_expanded_model_says_to_contract_first():
    big = efx.expand(smallnet_3x3(), "CL", r=2)
    with pytest.raises(efx.ConfigError, match=r"expanded block \(CL, r=2, replacing a Conv2d\)"
                                              r".*torch.jit.script\(expandfx.contract\(model\)\)"):
        torch.jit.script(big)
    x = torch.randn(1, 3, 32, 32)
    scripted = torch.jit.script(efx.contract(big))
    with torch.no_grad():
        assert (scripted(x) - big(x)).abs().max() <= 1e-5 * big(x).abs().max()


def test_every_layer_holding_a_linear_map_is_listed_with_its_reason():
    plan = efx.plan(UserNet(), "CL+FC", 2, example_inputs=(USER_X,))
    rows = {row.path: row for row in plan.rows}
    assert list(rows) == ["stem", "dw", "pw", "attn", "attn.out_proj", "gru", "up", "fc1", "fc2"]
    assert rows["up"].rule == "CL" and rows["up"].reason is None  # tests/test_transposed.py
    assert rows["up"].layer == "ConvTranspose2d(16→8, k2, s2)"
    assert "weight_ih/weight_hh" in rows["gru"].reason and rows["gru"].layer == "GRU(16→16)"
    assert "in_proj_weight" in rows["attn"].reason
    # the attention row counts its own weights only: out_proj has its own row
    assert rows["attn"].params_before == 3 * 16 * 16 + 3 * 16
    assert plan.totals()["params_before"] == sum(p.numel() for p in UserNet().parameters())


def test_mac_totals_say_what_they_leave_out():
    from torch.utils.flop_counter import FlopCounterMode

    model = UserNet().eval()
    plan = efx.plan(model, "CL", 2, example_inputs=(USER_X,))
    assert [row.path for row in plan.uncounted] == ["attn", "attn.out_proj", "gru"]
    text = str(plan)
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert "?" not in total_line
    assert ("MAC totals leave out 3 layer(s) with no MAC count: attn (MultiheadAttention), "
            "attn.out_proj (Linear), gru (GRU)") in text
    # the transposed conv is counted, as torch's flop counter counts it
    up = next(row for row in plan.rows if row.path == "up")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.up(torch.randn(2, 16, 8, 8))
    assert up.macs_before == counter.get_total_flops() // 2 == 2 * 16 * 64 * 8 * 4


def test_a_pattern_matching_an_unhandled_layer_reports_the_type_not_the_mapping():
    with pytest.raises(efx.ConfigError, match=r"'gru' was requested exactly \(rule mapping key "
                                              r"'gru'\).*weight_ih"):
        efx.plan(UserNet(), {"gru": "CL", "*": "CL"}, 2, example_inputs=(USER_X,))
    row = next(r for r in efx.plan(UserNet(), {"g*": "CL", "*": "CL"}, 2,
                                   example_inputs=(USER_X,)).rows if r.path == "gru")
    assert "no pattern of the rule mapping matches" not in row.reason
    assert "weight_ih" in row.reason
    with pytest.raises(efx.ConfigError, match=r"'gru' was requested exactly.*weight_ih"):
        efx.expand(UserNet(), "CL+FC", 2, include=["*", "gru"], example_inputs=(USER_X,))


def test_a_rule_that_cannot_expand_a_transposed_conv_says_so_and_names_cl():
    with pytest.raises(efx.ConfigError, match=r"'up' was requested exactly \(rule mapping key "
                                              r"'up'\).*CK does not apply to transposed "
                                              r"convolutions.*use CL"):
        efx.plan(UserNet(), {"up": "CK", "*": "CL"}, 2, example_inputs=(USER_X,))
    with pytest.raises(efx.ConfigError, match=r"'up' was requested exactly.*RepVGG does not "
                                              r"apply to transposed convolutions.*use CL"):
        efx.expand(UserNet(), "RepVGG", include=["*", "up"], example_inputs=(USER_X,))


def test_output_size_on_a_block_of_a_plain_conv_is_refused():
    block = RULES["CL"].build(nn.Conv2d(4, 6, 3), 2)
    with pytest.raises(efx.ConfigError, match=r"output_size is an argument of a transposed "
                                              r"convolution's forward, but this block replaces "
                                              r"a Conv2d. Call it with the input only"):
        block(torch.randn(1, 4, 8, 8), output_size=[6, 6])
