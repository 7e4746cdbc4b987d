"""Rule configs (``efx.CL(r=4)``, ``efx.RepVGG(norm="bn")``), the copy convention of every
verb, and the short ``expandfx.__all__`` (issue 21)."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings

import pytest
import torch
from support import state_equal
from torch import nn

import expandfx as efx
from expandfx.linear.costs import param_count
from expandfx.models import smallnet_7x7
from expandfx.rules import RULES, Rule, register_rule, unregister_rule
from expandfx.rules.factors import conv_factor


def blocks(model: nn.Module) -> dict[str, efx.ExpandedBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, efx.ExpandedBlock)}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rows(p: efx.Plan) -> list[tuple]:
    return [(r.path, r.rule, r.config, r.reason, r.params_before, r.params_after)
            for r in p.rows]


# --- construction -------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "message"), [
    (lambda: efx.CK(r=2, init="preserve"),
     r"^CK\(r=2, init='preserve'\): CK cannot honour init='preserve'.*Use init='default', or "
     r"a rule that takes init='preserve': \[.*'CL'.*\]"),
    (lambda: efx.RepVGG(r=4),
     r"^RepVGG\(r=4\): RepVGG does not use r .*drop r=.*\['CK', 'CL', 'FC'\]"),
    (lambda: efx.CL(norm="bn"),
     r"^CL\(norm='bn'\): CL takes no setting \['norm'\].*rules that take it: \['ACNet', "),
    (lambda: efx.RepVGG(norm="batch"), r"^RepVGG\(norm='batch'\): norm must be one of"),
    (lambda: efx.DBB(norm="bn", init="preserve"),
     r"^DBB\(init='preserve', norm='bn'\): init='preserve' with norm='bn' cannot hold.*"
     r"Use init='default'"),
    (lambda: efx.MobileOne(k=0), r"^MobileOne\(k=0\): k .* integer ≥ 1, got 0"),
    (lambda: efx.CL(r=0), r"^CL\(r=0\): r must be a positive number"),
    (lambda: efx.FC(r="4"), r"^FC\(r='4'\): r must be a positive number"),
    (lambda: efx.CL(init="zeros"), r"^CL\(init='zeros'\): init must be one of"),
    (lambda: efx.CL(r=2) + efx.CK(r=2), r"gives conv layers \['CK', 'CL'\]; a layer takes one"),
    (lambda: efx.CL(r=2) + "FC", r"combines rule configs.*efx.FC\(r=4\)"),
])
def test_an_impossible_config_fails_when_built_naming_the_rule_and_the_fix(make, message):
    with pytest.raises(efx.ConfigError, match=message):
        make()


def test_configs_are_frozen_values_with_a_readable_repr():
    assert repr(efx.CL(r=4)) == "CL(r=4)" and repr(efx.CL()) == "CL(r=4)"  # r defaults to 4
    assert repr(efx.FC(r=1.5, init="preserve")) == "FC(r=1.5, init='preserve')"
    assert repr(efx.RepVGG(norm="bn")) == "RepVGG(norm='bn')" and repr(efx.ACNet()) == "ACNet()"
    assert repr(efx.MobileOne(k=2, norm="scale")) == "MobileOne(k=2, norm='scale')"
    assert efx.CL(4) == efx.CL(r=4.0) and hash(efx.CL(4)) == hash(efx.CL(r=4.0))
    assert efx.RepVGG(norm=None) == efx.RepVGG() and efx.MobileOne(k=4) == efx.MobileOne()
    assert efx.CL(r=2) != efx.CL(r=3) and len({efx.CL(2), efx.CL(2.0), efx.CK(2)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        efx.CL(r=4).r = 2
    assert efx.CL(r=4).replace(r=2) == efx.CL(r=2)
    assert isinstance(efx.CL, Rule) and efx.CL is RULES["CL"]
    combo = efx.FC(r=4) + efx.CK(r=2)
    assert repr(combo) == "CK(r=2) + FC(r=4)"  # conv first, as "CK+FC"
    assert combo == efx.CK(r=2) + efx.FC(r=4) and hash(combo) == hash(efx.CK(2) + efx.FC(4))
    assert efx.CK + efx.FC == efx.CK() + efx.FC()  # bare rules: their defaults


# --- shorthand == configs -------------------------------------------------------------------

@pytest.mark.parametrize(("short", "config"), [
    ((("CL",), {"r": 4}), efx.CL(r=4)),
    ((("CL",), {}), efx.CL(r=4)),
    ((("CK+FC", 2), {}), efx.CK(r=2) + efx.FC(r=2)),
    (((), {"rule": "CK+FC", "r": 2}), efx.CK(r=2) + efx.FC(r=2)),
    ((({"features.*": "CL", "classifier.0": "FC"},), {"r": 2}),
     {"features.*": efx.CL(r=2), "classifier.0": efx.FC(r=2)}),
    ((("RepVGG",), {}), efx.RepVGG()),
    ((("RepVGG+FC", 3), {}), efx.RepVGG() + efx.FC(r=3)),  # r goes to the rules that use it
    (((efx.CL,), {"r": 2}), efx.CL(r=2)),  # a bare rule is its name
])
def test_a_rule_string_means_exactly_the_configs(short, config):
    args, kwargs = short
    model = smallnet_7x7()
    assert rows(efx.plan(model, *args, **kwargs)) == rows(efx.plan(model, config))
    torch.manual_seed(0)
    a = efx.expand(model, *args, **kwargs)
    torch.manual_seed(0)
    b = efx.expand(model, config)
    assert shapes(a) == shapes(b) and state_equal(a.state_dict(), b.state_dict())
    assert {n: (m.rule, m.r) for n, m in blocks(a).items()} == \
        {n: (m.rule, m.r) for n, m in blocks(b).items()}


def test_a_mapping_gives_each_layer_its_own_config():
    model = smallnet_7x7()  # convs 3→8, 8→16, 16→32 (7×7); linears 512→64, 64→10
    spec = {"features.0": efx.CL(r=2), "features.4": efx.CK(r=3),
            "features.*": "CL", "classifier.0": efx.FC(r=1.5)}
    p = efx.plan(model, spec, r=1)  # the shorthand r reaches the string only
    assert [(r.path, r.config) for r in p.rows] == [
        ("features.0", efx.CL(r=2)), ("features.4", efx.CK(r=3)), ("features.8", efx.CL(r=1)),
        ("classifier.0", efx.FC(r=1.5)), ("classifier.2", None)]
    big = efx.expand(model, spec, r=1)
    widths = {n: [tuple(f.weight.shape[:2]) for f in b.layers] for n, b in blocks(big).items()}
    assert widths["features.0"] == [(6, 3), (16, 6), (8, 16)]  # p = 2·3, q = 2·8
    assert widths["features.4"][0] == (24, 8) and widths["features.4"][-1] == (16, 48)
    assert widths["features.8"] == [(16, 16), (32, 16), (32, 32)]  # r = 1
    assert widths["classifier.0"] == [(768, 512), (96, 768), (64, 96)]  # 1.5·512, 1.5·64
    assert [r.params_after for r in p.rows if r.config] == \
        [param_count(b) for b in blocks(big).values()]
    assert "CK(r=3)" in str(p) and "FC(r=1.5)" in str(p)  # the plan shows the configs


def test_a_callable_may_return_configs_or_strings():
    def choose(name, module):
        return efx.CL(r=2) if name == "features.0" else "FC" if isinstance(module, nn.Linear) \
            else None
    p = efx.plan(smallnet_7x7(), choose, r=3)
    assert [r.config for r in p.rows] == [efx.CL(r=2), None, None, efx.FC(r=3), None]


@pytest.mark.parametrize("norm", [None, "scale", "bn"])
def test_the_plan_counts_the_block_the_norm_builds(norm):
    model = smallnet_7x7()
    x = torch.randn(1, 3, 32, 32)
    p = efx.plan(model, efx.RepVGG(norm=norm) + efx.FC(r=2), example_inputs=(x,))
    big = efx.expand(model, plan=p)
    built = blocks(big)
    assert len(built) == 4
    for row in p.rows:
        if row.config is None:
            continue
        assert row.config == (efx.RepVGG(norm=norm) if row.rule == "RepVGG" else efx.FC(r=2))
        assert row.params_after == param_count(built[row.path])
    # features.0 (3→8, 7×7): k×k with bias + 1×1; a scale per branch and channel, or a BN's
    # weight and bias per branch and channel, whose shift replaces the k×k bias
    per_branch = {None: 0, "scale": 2 * 8, "bn": 2 * 2 * 8 - 8}
    assert p.rows[0].params_after == 8 * 3 * 49 + 8 + 8 * 3 + per_branch[norm]


def test_the_plan_refuses_what_expand_refuses_for_a_norm():
    """A bias-free layer not followed solely by a BatchNorm cannot take norm='bn' (the
    branch BNs' shift has nowhere to go): plan and expand skip it with that reason, an
    exact request raises, and norm='scale' is planned."""
    bias_free = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU())
    why = r"RepVGG with norm='bn' on a bias-free layer: its result does not go only to a BatchNorm"
    assert re.match(why, efx.plan(bias_free, efx.RepVGG(norm="bn")).rows[0].reason)
    with pytest.raises(efx.ConfigError, match=r"expanded no layer.*" + why):
        efx.expand(bias_free, efx.RepVGG(norm="bn"), strict=True)
    for call in (efx.plan, efx.expand):
        with pytest.raises(efx.ConfigError, match=r"'0' was requested exactly.*" + why):
            call(bias_free, {"0": efx.RepVGG(norm="bn")})
    followed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    assert efx.plan(followed, efx.RepVGG(norm="bn")).rows[0].reason is None
    assert efx.plan(bias_free, efx.RepVGG(norm="scale")).rows[0].params_after == 108 + 12 + 8


def test_a_plan_carries_its_configs_and_refuses_other_settings():
    model = smallnet_7x7()
    p = efx.plan(model, {"features.0": efx.CL(r=2), "*": efx.CK(r=3) + efx.FC(r=2)})
    big = efx.expand(model, plan=p)
    assert {n: (b.rule, b.r) for n, b in blocks(big).items()} == {
        "features.0": ("CL", 2.0), "features.4": ("CK", 3.0), "features.8": ("CK", 3.0),
        "classifier.0": ("FC", 2.0)}
    for settings in ({"r": 2}, {"rule": "CL"}, {"include": ["*"]}, {"init": "preserve"},
                     {"norm": "bn"}):
        with pytest.raises(efx.ConfigError, match="would be ignored"):
            efx.expand(model, plan=p, **settings)
    p.rows[0].config = efx.CL(r=3)  # edit one row's config
    assert blocks(efx.expand(model, plan=p))["features.0"].r == 3.0


def test_shorthand_keywords_that_no_rule_string_takes_are_refused():
    model = smallnet_7x7()
    with pytest.raises(efx.ConfigError, match=r"expand: r=2 would be ignored.*CL\(r=4\)"):
        efx.expand(model, efx.CL(r=4), r=2)
    with pytest.raises(efx.ConfigError, match=r"plan: r=2 would be ignored"):
        efx.plan(model, {"features.*": efx.CL(r=4)}, r=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nrom'"):
        efx.expand(model, "RepVGG", nrom="bn")
    for rule in ("RepVGG", {"features.0": "ACNet", "features.4": efx.CL(r=2)}):  # no string
        with pytest.raises(efx.ConfigError, match=r"r=3 would be ignored.*use no expansion "
                                                  r"rate.*\['CK', 'CL', 'FC'\]"):
            efx.expand(model, rule, r=3)
    with pytest.raises(efx.ConfigError, match=r"r=2 would be ignored: the rule callable "
                                              r"picked only.*\['RepVGG'\]"):
        efx.expand(model, lambda name, module: "RepVGG", r=2)
    assert efx.plan(model, lambda name, module: "CL", r=2).rows[0].config == efx.CL(r=2)
    mixed = efx.expand(model, {"features.0": "RepVGG", "*": "CL"}, r=3)  # r reaches "CL"
    assert {(b.rule, b.r) for b in blocks(mixed).values()} == {("RepVGG", None), ("CL", 3.0)}


# --- the deprecated keywords ----------------------------------------------------------------

def test_init_and_norm_keywords_still_work_and_warn_naming_the_config():
    model = smallnet_7x7()
    with pytest.warns(DeprecationWarning, match=r"init='preserve'\) is deprecated.*Write "
                      r"rule=CL\(r=2, init='preserve'\) \+ FC\(r=2, init='preserve'\)"):
        old = efx.expand(model, "CL+FC", r=2, init="preserve")
    torch.manual_seed(0)
    new = efx.expand(model, efx.CL(r=2, init="preserve") + efx.FC(r=2, init="preserve"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(old.eval()(x), new.eval()(x))
        torch.testing.assert_close(old(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    with pytest.warns(DeprecationWarning, match=r"norm='bn'\) is deprecated.*Write "
                      r"rule=RepVGG\(norm='bn'\) \+ FC\(r=4\)"):
        p = efx.plan(model, "RepVGG+FC", norm="bn")
    assert p.rows[0].config == efx.RepVGG(norm="bn") and p.rows[3].config == efx.FC(r=4)
    with pytest.warns(DeprecationWarning, match="norm="):
        big = efx.expand(model, "RepVGG", norm="bn")
    assert isinstance(big.features[0].branches["1x1"][1], nn.BatchNorm2d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config form never warns
        efx.expand(model, efx.RepVGG(norm="bn"))
        efx.expand(model, "CL", r=2)


# --- user rules -----------------------------------------------------------------------------

def test_every_registered_rule_gets_a_config_without_extra_code():
    def build(conv, r, init="default", *, path="", device=None, copies=2):
        made = {f"c{i}": conv_factor(conv, conv.in_channels, conv.out_channels,
                                     conv.kernel_size, stride=conv.stride,
                                     padding=conv.padding, device=device)
                for i in range(copies)}
        return efx.ExpandedBlock(conv, made, rule="Copies", r=r)

    # the Rule constructor as before: positional name, kind, skip_reason, build, summary, options
    rule = Rule("Copies", "conv", lambda conv: None, build, "parallel copies",
                frozenset({"copies"}))
    assert rule.uses_r and rule.inits == ("default", "preserve")
    with pytest.raises(efx.ConfigError, match="not registered.*register_rule"):
        rule(copies=3)
    register_rule(rule)
    try:
        assert efx.Copies is rule  # reachable as efx.<name> once registered
        config = efx.Copies(r=2, copies=3)
        assert repr(config) == "Copies(r=2, copies=3)" and efx.Copies(copies=2) == efx.Copies()
        big = efx.expand(smallnet_7x7(), config, include=["features.0"])
        assert list(big.features[0].branches) == ["c0", "c1", "c2"]
        with pytest.raises(efx.ConfigError, match=r"Copies\(norm='bn'\): Copies takes no setting"):
            efx.Copies(norm="bn")
    finally:
        unregister_rule("Copies")
    with pytest.raises(AttributeError):
        _ = efx.Copies


# --- one copy convention --------------------------------------------------------------------

def _expanded() -> nn.Module:
    return efx.expand(smallnet_7x7(), "CL", r=2)


VERBS = {  # name: (make the input, call the verb)
    "expand": (smallnet_7x7, lambda m, **kw: efx.expand(m, "CL", r=2, **kw)),
    "contract": (_expanded, lambda m, **kw: efx.contract(m, **kw)),
    "compand": (_expanded, lambda m, **kw: efx.compand(m, a=1.0, b=0.7, **kw)),
    "bake": (lambda: efx.compand(_expanded(), a=1.0, b=0.7), lambda m, **kw: efx.bake(m, **kw)),
    "nonlinear_counterpart": (_expanded, lambda m, **kw: efx.nonlinear_counterpart(m, **kw)),
    "linearize": (lambda: efx.nonlinear_counterpart(_expanded()),
                  lambda m, **kw: efx.linearize(m, **kw)),
}


def _same_state(a: dict, b: dict) -> bool:  # a compander's extra state is a dict
    return list(a) == list(b) and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _fingerprint(model: nn.Module) -> tuple:
    return ([(n, type(m).__name__, getattr(m, "act", None) is not None)
             for n, m in model.named_modules()], list(model.state_dict()))


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_returns_a_copy_unless_inplace(verb):
    make, call = VERBS[verb]
    torch.manual_seed(0)
    model = make()
    before, state = _fingerprint(model), copy.deepcopy(model.state_dict())
    out = call(model)
    assert out is not model and _fingerprint(out) != before
    assert _fingerprint(model) == before and _same_state(model.state_dict(), state)
    same = call(model, inplace=True)
    assert same is model and _fingerprint(model) == _fingerprint(out)


def test_fold_never_changes_its_input_and_set_mode_is_a_setter():
    model = smallnet_7x7().eval()
    state = copy.deepcopy(model.state_dict())
    assert efx.fold(model, (torch.randn(1, 3, 32, 32),)) is not model
    assert state_equal(model.state_dict(), state)
    big = _expanded()
    assert efx.set_mode(big, "sequential") is big and big.features[0].mode == "sequential"


def test_compand_takes_include_and_exclude_by_keyword_only():
    with pytest.raises(TypeError):
        efx.compand(_expanded(), "arctan", 1.0, 1.0, None, "features.*")
    assert efx.companded(efx.compand(_expanded(), include="features.0.*"))


# --- __all__ --------------------------------------------------------------------------------

def test_the_public_names_are_few_and_resolve():
    assert len(efx.__all__) <= 22 and len(set(efx.__all__)) == len(efx.__all__)
    assert all(getattr(efx, name) is not None for name in efx.__all__)
    builtin = {"CL", "CK", "FC", "ACNet", "RepVGG", "DBB", "MobileOne"}
    assert builtin <= set(efx.__all__)
    assert {"expand", "contract", "plan", "fold", "compand", "param_groups", "export_onnx",
            "shard", "ConfigError", "ExpandFXError", "Plan", "RuleConfig"} <= set(efx.__all__)
    assert not hasattr(efx, "decay_groups")
    for kept in ("Compander", "ChainLR", "chain_scale", "companded", "unregister_rule",
                 "LayerPlan", "bake", "linearize", "nonlinear_counterpart", "verify_onnx"):
        assert hasattr(efx, kept) and kept not in efx.__all__  # compatibility, not public
