"""The bad-input catalogue: every way a user can hand expandfx something wrong, one case each.

Each case is a function that makes the mistake (given a fresh ``tmp_path``), registered with
the error class it must raise, the substrings its message must contain (the offending name
or path, the number, the fix token), and the files that must *not* exist afterwards under
their final names (a failed check leaves no artefact that looks verified). The CLI exit code
each error maps to (1: a check failed, 2: bad input) is asserted from the class.

docs/usage.md's error table is generated from this catalogue:
``python tests/test_error_catalogue.py`` rewrites it; a test checks it is current.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import expandfx as efx
from expandfx.cli import CLIError, exit_code


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the mistake, in the user's words (the docs table's first column)
    error: type[BaseException]
    contains: tuple[str, ...]
    run: Callable[[Path], object]
    leaves_no: tuple[str, ...] = ()  # names under tmp_path that must not exist afterwards


CASES: list[Case] = []


def case(id: str, what: str, error: type[BaseException], *contains: str,
         leaves_no: tuple[str, ...] = ()) -> Callable:
    """Register the decorated ``fn(tmp_path)`` as a catalogue case."""
    def register(fn: Callable[[Path], object]) -> Callable[[Path], object]:
        CASES.append(Case(id, what, error, contains, fn, leaves_no))
        return fn
    return register


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))


def x4() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# ---- names: an exact name is a request ------------------------------------------------------

@case("mapping-typo", "a rule mapping key that names no layer (`{\"classifer.7\": efx.FC(r=4)}`)",
      efx.ConfigError, "'classifer.7'", "closest: '7'", "names no layer")
def _(tmp):
    efx.expand(cnn(), {"classifer.7": efx.FC(r=4), "*": "CL"})


@case("include-typo", "an exact `include=` entry that matches nothing", efx.ConfigError,
      "include= entry '11'", "names no layer", "its layers: '0', '3', '7', '9'")
def _(tmp):
    efx.expand(cnn(), include=["0", "11"])


@case("exclude-typo", "an `exclude=` typo", efx.ConfigError, "exclude= entry '00'",
      "closest: '0'")
def _(tmp):
    efx.expand(cnn(), exclude=["00"])


@case("include-not-a-layer", "`include=` naming a module that holds no layer (a ReLU)",
      efx.ConfigError, "'2' is a module that holds no layer")
def _(tmp):
    efx.expand(cnn(), include=["2"])


@case("mapping-shadowed", "an exact mapping key after a glob that already takes it",
      efx.ConfigError, "key '7' is never used", "['*']", "Put '7' first")
def _(tmp):
    efx.expand(cnn(), {"*": "CL", "7": efx.FC(r=4)})


@case("plan-typo", "`plan` with a typo'd `include=`", efx.ConfigError, "'conv1'",
      "names no layer")
def _(tmp):
    efx.plan(cnn(), include=["conv1"])


@case("compand-typo", "`compand` with a typo'd `include=`", efx.ConfigError,
      "compand: include= entry '7.weight'", "closest: '7'")
def _(tmp):
    efx.compand(cnn(), include=["7.weight"])


# ---- configs refuse at construction what does not depend on the layer -----------------------

@case("orepa-bn", "`efx.OREPA(norm=\"bn\")`", efx.ConfigError, "OREPA(norm='bn')",
      "norm='scale'", "DBB")
def _(tmp):
    efx.OREPA(norm="bn")


@case("orepa-none", "`efx.OREPA(norm=None)`", efx.ConfigError, "OREPA(norm=None)", "'DBB'")
def _(tmp):
    efx.OREPA(norm=None)


@case("unknown-setting", "an unknown setting (`efx.CL(nrom=\"bn\")`)", efx.ConfigError,
      "takes no setting ['nrom']", "its settings are r, init")
def _(tmp):
    efx.CL(nrom="bn")


# ---- one clear sentence for what used to be a raw exception ---------------------------------

@case("plan-wrong-shape", "`plan` with `example_inputs` of the wrong shape", efx.ConfigError,
      "fails on example_inputs [(2, 3, 8)", "RuntimeError", "example_inputs of the shape")
def _(tmp):
    efx.plan(cnn(), example_inputs=(torch.randn(2, 3, 8),))


@case("expand-wrong-shape", "`expand` with `example_inputs` of the wrong shape (used to be "
      "accepted silently)", efx.ConfigError, "fails on example_inputs [(2, 5, 8, 8)",
      "example_inputs of the shape")
def _(tmp):
    efx.expand(cnn(), example_inputs=(torch.randn(2, 5, 8, 8),))


@case("expand-not-a-module", "a non-Module passed to `expand` (a model's name)",
      efx.ConfigError, "the model must be an nn.Module, got str 'resnet18'")
def _(tmp):
    efx.expand("resnet18")


@case("expand-torchscript", "a TorchScript module passed to `expand` (issue 30)",
      efx.ConfigError, "RecursiveScriptModule is a TorchScript module", "Pass the Python nn.Module")
def _(tmp):
    efx.expand(torch.jit.script(cnn()))


@case("fold-torchscript", "a traced module passed to `fold` (it used to report BatchNorms folded)",
      efx.ConfigError, "fold: TopLevelTracedModule is a TorchScript module")
def _(tmp):
    efx.fold(torch.jit.trace(cnn().eval(), x4()), (x4(),))


@case("contract-state-dict", "a `state_dict` passed to `contract`", efx.ConfigError,
      "got OrderedDict with 13 entries", "load it into the model first")
def _(tmp):
    efx.contract(cnn().state_dict())



# ---- non-finite (fold, contract, compand) ---------------------------------------------------

NonFinite = efx.errors.NonFiniteError  # (not yet exported as efx.NonFiniteError)


def _nan_at(t: torch.Tensor, value: float = float("nan")) -> None:
    with torch.no_grad():
        t.view(-1)[0] = value


@case("fold-nan-weight", "`fold` of a model with a NaN weight", NonFinite,
      "non-finite", "'0.weight'", "1 NaN", "restore a finite checkpoint")
def _(tmp: Path) -> object:
    model = cnn().eval()
    _nan_at(model[0].weight)
    return efx.fold(model, (x4(),))


@case("fold-nan-running-var", "`fold` of a model whose BatchNorm `running_var` diverged to NaN",
      NonFinite, "non-finite", "buffer '1.running_var'", "restore a finite checkpoint")
def _(tmp: Path) -> object:
    model = cnn().eval()
    _nan_at(model[1].running_var)
    return efx.fold(model, (x4(),))


@case("fold-inf-input", "`fold` with an inf in `example_inputs`", NonFinite,
      "non-finite", "'example_inputs[0]'", "1 inf", "pass finite inputs")
def _(tmp: Path) -> object:
    x = x4()
    _nan_at(x, float("inf"))
    return efx.fold(cnn().eval(), (x,))


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()


@case("fold-nan-output", "`fold` of a model that outputs NaN on `example_inputs`",
      NonFinite, "non-finite", "'output[0]'", "allow_nonfinite_outputs=True")
def _(tmp: Path) -> object:
    return efx.fold(nn.Sequential(cnn(), _Log()).eval(), (x4(),))


@case("fold-meta-model", "`fold` of a model on the meta device", efx.ConfigError,
      "'0.weight'", "meta device", "model.to_empty(device='cpu')", "load_state_dict")
def _(tmp: Path) -> object:
    with torch.device("meta"):
        model = cnn().eval()
    return efx.fold(model, (x4(),))


@case("contract-nan-factor", "`contract` of an expanded model with a NaN factor",
      NonFinite, "non-finite", "'0.layers.1.weight'", "restore a finite checkpoint")
def _(tmp: Path) -> object:
    big = efx.expand(cnn(), "CL", 2, include="0")
    _nan_at(big[0].layers[1].weight)
    return efx.contract(big)


@case("contract-overflow", "`contract` whose composed float16 weight overflows", NonFinite,
      "non-finite", "'0.weight'", "float16", "model.float()")
def _(tmp: Path) -> object:
    big = efx.expand(cnn(), "CL", 2, include="0").half()
    with torch.no_grad():
        for layer in big[0].layers:
            layer.weight.fill_(300.0)
    return efx.contract(big)


@case("compand-nan-weight", "`compand` of a model with a NaN weight", NonFinite,
      "non-finite", "'0.weight'", "restore a finite checkpoint")
def _(tmp: Path) -> object:
    model = cnn()
    _nan_at(model[0].weight)
    return efx.compand(model)


@case("bake-inf-v", "`bake` of a companded model whose `v` is inf", NonFinite,
      "non-finite", "'0.parametrizations.weight.original'", "1 inf")
def _(tmp: Path) -> object:
    model = efx.compand(cnn())
    _nan_at(model[0].parametrizations.weight.original, float("inf"))
    return efx.bake(model)


# ---- int8 and export (quantize.py, onnx_export.py) ----------------------------------------

def _pixels(batches: int = 16) -> list[torch.Tensor]:
    """Image-like calibration batches for SmallNet-digits: 16 samples of [0, 1) pixels each."""
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(16, 1, 8, 8, generator=gen) for _ in range(batches)]


def _int8(tmp: Path, calibration: list[torch.Tensor], model: nn.Module | None = None,
          **config: object) -> object:
    from expandfx.models import smallnet_digits

    torch.manual_seed(0)
    model = (model or smallnet_digits()).eval()
    x = _pixels()[0][:4].to(next(model.parameters()).dtype)
    return efx.export_onnx(model, (x,), tmp / "m.onnx", calibration=calibration,
                           quantize=efx.Int8Config(latency_runs=2, **config))


_INT8_FILES = ("m.onnx", "m.int8.onnx")


@case("int8-zero-calibration", "int8 calibration batches that are all zeros",
      efx.ConfigError, "calibration batches are (nearly) constant", "channel 0", "std 0",
      "check_calibration=False", leaves_no=_INT8_FILES)
def _(tmp: Path) -> object:
    return _int8(tmp, [torch.zeros_like(b) for b in _pixels()])


@case("int8-unscaled-pixels", "int8 calibration on 0–255 pixels for a model fed [0, 1]",
      efx.ConfigError, "unlike example_inputs in channel 0", "outside [1/4, 4]×",
      "same scaling", leaves_no=_INT8_FILES)
def _(tmp: Path) -> object:
    return _int8(tmp, [b * 255 for b in _pixels()])


@case("int8-tiny-noise", "int8 calibration on 1e-3-scale noise", efx.ConfigError,
      "unlike example_inputs", "verify_on='held-out'", leaves_no=_INT8_FILES)
def _(tmp: Path) -> object:
    return _int8(tmp, [torch.randn(b.shape) * 1e-3 for b in _pixels()])


@case("int8-unlike-example-inputs", "int8 calibration of the right spread but unlike the "
      "inputs (sign-flipped): the held-out batches agree, `example_inputs` do not",
      efx.VerificationError, "example_inputs SQNR", "held-out set passes",
      "m.int8.failed.onnx", leaves_no=("m.int8.onnx",))
def _(tmp: Path) -> object:
    return _int8(tmp, [-b for b in _pixels()])


@case("int8-too-few-samples", "an int8 verdict resting on 32 held-out samples",
      efx.VerificationError, "32 held-out sample(s)", "min_samples=64",
      "Int8Config(min_samples=...)", leaves_no=("m.int8.onnx",))
def _(tmp: Path) -> object:
    return _int8(tmp, _pixels(8))


@case("int8-wrong-shape-batch", "an int8 calibration batch of another shape",
      efx.ConfigError, "calibration batch 2 has shape (16, 1, 8, 7)", "(4, 1, 8, 8)",
      leaves_no=_INT8_FILES)
def _(tmp: Path) -> object:
    batches = _pixels()
    batches[2] = batches[2][..., :7]
    return _int8(tmp, batches)


@case("int8-nan-batch", "a NaN in an int8 calibration batch", efx.errors.NonFiniteError,
      "non-finite", "'calibration[3][0]'", leaves_no=_INT8_FILES)
def _(tmp: Path) -> object:
    batches = _pixels()
    batches[3][0, 0, 0, 0] = float("nan")
    return _int8(tmp, batches)


@case("int8-half-model", "`quantize=\"int8\"` on a float16 model", efx.ConfigError,
      "int8 calibration needs a float32 model", "float16", "model.float()",
      leaves_no=_INT8_FILES)
def _(tmp: Path) -> object:
    from expandfx.models import smallnet_digits

    return _int8(tmp, [b.half() for b in _pixels()], model=smallnet_digits().half())


def _export_with(tmp: Path, change: Callable[[nn.Module, torch.Tensor], None],
                 model: nn.Module | None = None) -> object:
    model, x = (model or cnn()).eval(), x4()
    with torch.no_grad():
        change(model, x)
    return efx.export_onnx(model, (x,), tmp / "m.onnx")


@case("export-inf-weight", "`export_onnx` of a model with an inf weight (used to say "
      "\"max abs 0.00e+00 … FAIL\")", efx.errors.NonFiniteError, "non-finite",
      "parameter '0.weight'", "1 inf", leaves_no=("m.onnx",))
def _(tmp: Path) -> object:
    return _export_with(tmp, lambda m, x: m[0].weight.view(-1).__setitem__(0, float("inf")))


@case("export-nan-running-var", "`export_onnx` of a model whose `running_var` is NaN",
      efx.errors.NonFiniteError, "non-finite", "buffer '1.running_var'", leaves_no=("m.onnx",))
def _(tmp: Path) -> object:
    return _export_with(tmp, lambda m, x: m[1].running_var.__setitem__(0, float("nan")))


@case("export-nan-input", "`export_onnx` with a NaN in `example_inputs`",
      efx.errors.NonFiniteError, "non-finite", "'example_inputs[0]'", leaves_no=("m.onnx",))
def _(tmp: Path) -> object:
    return _export_with(tmp, lambda m, x: x.view(-1).__setitem__(0, float("nan")))


class _LogOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()  # NaN where x < 0


@case("export-nan-output", "`export_onnx` of a model that outputs NaN",
      efx.errors.NonFiniteError, "non-finite", "'output[0]'", "allow_nonfinite_outputs=True",
      leaves_no=("m.onnx",))
def _(tmp: Path) -> object:
    return _export_with(tmp, lambda m, x: None, model=nn.Sequential(cnn(), _LogOutput()))


class _Counter(nn.Module):
    """Its eager output depends on a Python counter that the export freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


@case("export-fails-verification", "`export_onnx` whose file disagrees with torch (an "
      "earlier run's `m.onnx` is there)", efx.VerificationError, "onnxruntime disagrees",
      "m.failed.onnx", leaves_no=("m.onnx",))
def _(tmp: Path) -> object:
    (tmp / "m.onnx").write_text("an earlier run's file")
    return _export_with(tmp, lambda m, x: None, model=nn.Sequential(cnn(), _Counter()))


# ---- param_groups (issue 30) ----------------------------------------------------------------

@case("no-decay-typo", "a `param_groups(..., no_decay=)` name that is no parameter or module",
      efx.ConfigError, "no_decay= entry '7.wieght'", "closest: '7', '7.weight'")
def _(tmp):
    efx.param_groups(cnn(), lr=0.1, no_decay=["7.wieght"])


@case("rescale-no-optimizer", "`groups.rescale()` without the optimizer (each optimizer holds "
      "copies of the groups)", efx.ConfigError, "groups.rescale(opt)")
def _(tmp):
    efx.param_groups(cnn(), lr=0.1, chain_lr="norm").rescale()


@case("rescale-foreign-optimizer", "`groups.rescale(opt)` with an optimizer not built from "
      "`groups`", efx.ConfigError, "holds none of these", "'expandfx_group'")
def _(tmp):
    efx.param_groups(cnn(), lr=0.1).rescale(torch.optim.SGD(nn.Linear(2, 2).parameters()))


# ---- export_onnx (issue 30) -----------------------------------------------------------------

class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1  # a data-dependent `if`


def _branchy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), _Branchy())


@case("export-data-dependent-if", "`export_onnx` of a forward with a data-dependent `if` (it "
      "raised a raw `GuardOnDataDependentSymNode`)", efx.ConfigError,
      "Module '1' (_Branchy.forward)", "test_error_catalogue.py:", "torch.cond",
      "outside the model", leaves_no=("m.onnx",))
def _(tmp):
    efx.export_onnx(_branchy(), (torch.randn(2, 3),), tmp / "m.onnx")


@case("export-legacy-other-branch", "`export_onnx(exporter=\"legacy\")` of that forward (its "
      "graph is frozen to the traced branch; it warns, and inputs taking the other branch are "
      "verified)", efx.VerificationError, "onnxruntime disagrees",
      "exporter='legacy' froze forward", "take another branch", "m.failed.onnx",
      leaves_no=("m.onnx",))
def _(tmp):
    efx.export_onnx(_branchy(), (torch.randn(2, 3),), tmp / "m.onnx", exporter="legacy")


@case("export-unknown-exporter", "`export_onnx(exporter=\"torchscript\")`", efx.ConfigError,
      "exporter='torchscript'", "'dynamo', 'legacy'")
def _(tmp):
    efx.export_onnx(cnn(), (x4(),), tmp / "m.onnx", exporter="torchscript")


# ---- ExecuTorch (issue 31) ---------------------------------------------------------------------

def _pte(tmp: Path, model: nn.Module | None = None, x: torch.Tensor | None = None,
         **kwargs: object) -> object:
    from expandfx.executorch_export import export_executorch

    return export_executorch((model or cnn()).eval(), (x4() if x is None else x,),
                             tmp / "m.pte", **kwargs)


_PTE_FILES = ("m.pte", "m.int8.pte")


@case("et-int8-zero-calibration", "`export_executorch` int8 calibration batches that are all "
      "zeros", efx.ConfigError, "export_executorch: the calibration batches are (nearly) "
      "constant", "std 0", "check_calibration=False", leaves_no=_PTE_FILES)
def _(tmp: Path) -> object:
    return _pte(tmp, quantize="int8", calibration=[torch.zeros(16, 3, 8, 8)] * 8)


@case("et-int8-percentile", "`export_executorch` with `Int8Config(method=\"percentile\")` "
      "(onnxruntime's calibration)", efx.ConfigError, "XNNPACK's quantizer observes min/max",
      "method='minmax'", leaves_no=_PTE_FILES)
def _(tmp: Path) -> object:
    return _pte(tmp, quantize=efx.Int8Config(method="percentile"),
                calibration=[torch.randn(16, 3, 8, 8)] * 8)


@case("et-inf-weight", "`export_executorch` of a model with an inf weight",
      efx.errors.NonFiniteError, "export_executorch: parameter '0.weight'", "1 inf",
      leaves_no=("m.pte",))
def _(tmp: Path) -> object:
    model = cnn()
    _nan_at(model[0].weight, float("inf"))
    return _pte(tmp, model)


@case("et-batch-over-max", "`export_executorch` with `example_inputs` larger than `max_batch`",
      efx.ConfigError, "batch 4 > max_batch=2", "pass max_batch=4", leaves_no=("m.pte",))
def _(tmp: Path) -> object:
    return _pte(tmp, max_batch=2)


# ---- the command line (issue 30): every flag reaches its verb or is refused -----------------

def cli(*argv: str) -> object:
    """Run a subcommand as the console script does, raising what it raises."""
    from expandfx.cli import build_parser

    args = build_parser().parse_args(list(argv))
    return args.func(args)


def checkpoint(tmp: Path, name: str, state: object) -> str:
    torch.save(state, tmp / name)
    return str(tmp / name)


@case("cli-expanded-checkpoint-no-rule", "`expandfx export` of an expanded checkpoint without "
      "`--rule`", CLIError, "checkpoint of an expanded model", "--rule", "contract first")
def _(tmp):
    from expandfx.models import smallnet_7x7

    big = efx.expand(smallnet_7x7(), "CL", r=2)
    cli("export", "smallnet_7x7", "--weights", checkpoint(tmp, "big.pt", big.state_dict()),
        "--out", str(tmp / "m.onnx"))


@case("cli-wrapped-checkpoint", "`expandfx export` of a training checkpoint "
      "(`{\"model\": sd, \"epoch\": 3}`)", CLIError, "holding ['epoch', 'model']",
      "pass --key model", leaves_no=("m.onnx",))
def _(tmp):
    from expandfx.models import smallnet_7x7

    ckpt = {"model": smallnet_7x7().state_dict(), "epoch": 3}
    cli("export", "smallnet_7x7", "--weights", checkpoint(tmp, "c.pt", ckpt),
        "--out", str(tmp / "m.onnx"))


@case("cli-rule-on-compact-checkpoint", "`--rule` for a compact checkpoint (it was ignored "
      "without a word)", CLIError, "compact checkpoint", "--rule would be ignored")
def _(tmp):
    from expandfx.models import smallnet_7x7

    cli("export", "smallnet_7x7", "--weights",
        checkpoint(tmp, "s.pt", smallnet_7x7().state_dict()), "--rule", "CL",
        "--out", str(tmp / "m.onnx"))


@case("cli-data-without-int8", "`--data` without `--int8`", CLIError,
      "--data would be ignored without --int8")
def _(tmp):
    from expandfx.models import smallnet_7x7

    cli("export", "smallnet_7x7", "--weights",
        checkpoint(tmp, "s.pt", smallnet_7x7().state_dict()), "--data", "x.pt",
        "--out", str(tmp / "m.onnx"))


@case("cli-include-typo", "`expandfx plan --include` with a typo", efx.ConfigError,
      "'clasifier.2' names no layer", "closest: 'classifier.2'")
def _(tmp):
    cli("plan", "smallnet_7x7", "--include", "*,clasifier.2")


# ---- the catalogue's own tests ----------------------------------------------------------------

@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_case(c: Case, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(c.error) as caught:
            c.run(tmp_path)
    message = str(caught.value)
    assert type(caught.value) is c.error or c.error is Exception, (
        f"{c.id}: raised {type(caught.value).__name__}, a subclass of {c.error.__name__}: "
        f"register the exact class")
    for needle in c.contains:
        assert needle in message, f"{needle!r} not in the message:\n{message}"
    assert exit_code(caught.value) == (1 if isinstance(caught.value, efx.VerificationError)
                                       else 2)
    if isinstance(caught.value, efx.ExpandFXError):  # machine-readable too
        data = caught.value.to_dict()
        assert data["code"] and data["message"] and data["error"] == type(caught.value).__name__
    for name in c.leaves_no:
        assert not (tmp_path / name).exists(), f"{name} was left under its final name"


def test_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 1


TABLE_START = "<!-- error table: generated by tests/test_error_catalogue.py -->"
TABLE_END = "<!-- end of error table -->"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def raised(c: Case) -> BaseException:
    """The exception case ``c`` raises (each case runs in a fresh temporary folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            c.run(Path(tmp))
        except c.error as exc:
            return exc
    raise AssertionError(f"case {c.id} raised nothing")


def table() -> str:
    rows = ["| mistake | error | code | exit | the message names |", "|---|---|---|---|---|"]
    for c in CASES:
        exc = raised(c)
        code, exit = getattr(exc, "code", ""), exit_code(exc)
        names = ", ".join(f"`{s}`" for s in c.contains)
        rows.append(f"| {c.what} | `{c.error.__name__}` | `{code}` | {exit} | {names} |")
    return "\n".join([TABLE_START, *rows, TABLE_END])


def test_docs_table_is_current() -> None:
    text = DOCS.read_text()
    found = re.search(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), text, re.S)
    assert found and found.group(0) == table(), (
        "docs/usage.md's error table is stale: run python tests/test_error_catalogue.py")


if __name__ == "__main__":
    text = DOCS.read_text()
    pattern = re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END)
    if re.search(pattern, text, re.S):
        text = re.sub(pattern, lambda _: table(), text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Errors\n\n" + table() + "\n"
    DOCS.write_text(text)
    print(f"wrote {len(CASES)} rows to {DOCS}", file=sys.stderr)
