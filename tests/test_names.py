"""Exact names are requests, globs select (issue 28): typos raise with the closest names,
a container's path means every layer under it, and a glob that selects nothing warns with
ExpandFXWarning — in expand, plan, compand and the command line, on every call."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import expandfx as efx
from expandfx.cli import main
from expandfx.errors import ExpandFXWarning
from expandfx.models import smallnet_7x7


def blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, efx.ExpandedBlock)]


def test_container_path_means_every_layer_under_it():
    model = smallnet_7x7()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert blocks(efx.expand(model, include=["features"])) == convs == \
        [n for n in convs if n.startswith("features.")]
    assert blocks(efx.expand(model, {"features": efx.CK(r=2)})) == convs
    excluded = efx.expand(model, "CL+FC", exclude=["features"])
    assert not any(n.startswith("features") for n in blocks(excluded))
    assert len(efx.companded(efx.compand(model, include="classifier"))) == 2


def test_glob_that_matches_nothing_warns_with_the_project_class():
    model = smallnet_7x7()
    with pytest.warns(ExpandFXWarning, match=r"include= glob 'feat\*\.9\*' matches no layer"):
        big = efx.expand(model, include=["features.*", "feat*.9*"])
    assert len(blocks(big)) == 3  # the other glob still selects
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExpandFXWarning)  # users can make it an error
        with pytest.raises(ExpandFXWarning):
            efx.expand(model, exclude=["head.*"])


def test_glob_shadowed_by_an_earlier_key_warns():
    with pytest.warns(ExpandFXWarning, match=r"glob 'features\.[*]' matches only layers that "
                                             r"the earlier pattern\(s\) \['\*'\]"):
        big = efx.expand(smallnet_7x7(), {"*": "CL", "features.*": "CK"})
    assert {smallnet_7x7().get_submodule(n).__class__ for n in blocks(big)} and \
        all(big.get_submodule(n).rule == "CL" for n in blocks(big))


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_name_checks_run_whatever_the_log_level(level):
    logger = logging.getLogger("expandfx")
    before = logger.level
    logger.setLevel(level)
    try:
        with pytest.raises(efx.ConfigError, match=r"'clasifier\.0'.*closest: 'classifier\.0'"):
            efx.expand(smallnet_7x7(), include=["clasifier.0"])
    finally:
        logger.setLevel(before)


def test_a_typo_changes_nothing_even_in_place():
    model = smallnet_7x7()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(efx.ConfigError):
        efx.expand(model, {"features.0": "CL", "clasifier.0": "FC"}, inplace=True)
    assert not blocks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_command_line_typo_is_bad_input(capsys):
    code = main(["plan", "smallnet_7x7", "--include", "*,clasifier.2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'clasifier.2' names no layer" in err and "closest: 'classifier.2'" in err


# --- issue 30: compiled and scripted models: unwrapped or refused, never a silent no-op ---

def test_compiled_model_is_unwrapped_with_a_warning():
    model = smallnet_7x7()
    compiled = torch.compile(model)
    with pytest.warns(ExpandFXWarning, match=r"torch.compile'd; expand works on its original"):
        big = efx.expand(compiled, "CL", r=2)
    assert type(big) is type(model) and len(blocks(big)) == 3
    with pytest.warns(ExpandFXWarning):
        small = efx.contract(torch.compile(big))
    assert list(small.state_dict()) == list(model.state_dict())  # no '_orig_mod.' keys
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(ExpandFXWarning):
        folded = efx.fold(torch.compile(model.eval()), (x,))
    assert folded.meta["expandfx.fold"].folded  # real work done, on the original module
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("verb", ["expand", "plan", "fold", "contract", "compand"])
def test_torchscript_module_is_refused(verb):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    scripted = torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    call = {"fold": lambda m: efx.fold(m, (torch.randn(1, 3, 8, 8),))}.get(
        verb, getattr(efx, verb))
    with pytest.raises(efx.ConfigError, match=rf"{verb}: TopLevelTracedModule is a TorchScript "
                                              rf"module.*Pass the Python nn.Module"):
        call(scripted)
