"""The ``expandfx`` command line: try expandfx on a model without writing code.

    expandfx demo                                   # the main job (see README)
    expandfx plan smallnet_7x7 --rule CK+FC --r 4 --input 1,3,32,32
    expandfx check tiny_resnet --rule CL --r 2 --input 2,3,32,32
    expandfx export smallnet_7x7 --weights big.pt --rule CL --r 4 --input 1,3,32,32 --out m.onnx
    expandfx export smallnet_digits --weights m.pt --out m.onnx --int8 --data x.pt --calibrate 256
    expandfx rules                                  # the registered rules, one line each

MODEL is an in-repo model name (``expandfx models``) or ``package.module:factory``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import expandfx as efx

from .demo import run_demo
from .errors import ExpandFXError
from .models import EXAMPLE_SHAPES, MODELS
from .restoring import training_flags
from .rules import RULES
from .surgery import blocks
from .tolerances import rel_error

__all__ = ["BLOCK_KEY", "CLIError", "EPILOG", "block_keys", "build_parser", "cmd_check",
           "cmd_demo", "cmd_export", "cmd_models", "cmd_plan", "cmd_rules", "default_input",
           "example_input", "load_model", "main", "parse_shape", "patterns", "positive"]


EPILOG = """\
MODEL: an in-repo model ({models}) or 'package.module:factory' (a zero-argument callable
returning an nn.Module). RULE: a registered rule ({rules}) or one per layer kind joined
by '+', e.g. CK+FC or ACNet+FC. Exit codes: 0 ok, 1 a check failed, 2 bad input."""


BLOCK_KEY = re.compile(r"\.(layers\.\d+|branches(\.\w+)+?)\."
                       r"(weight|bias|parametrizations\.weight\.original)$")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def load_model(spec: str) -> nn.Module:
    """An in-repo model by name, or ``package.module:factory``."""
    if ":" not in spec:
        if spec not in MODELS:
            raise CLIError(f"unknown model {spec!r}: use one of {', '.join(MODELS)} or "
                           f"'package.module:factory'")
        return MODELS[spec]()
    module_name, _, attr = spec.partition(":")
    here = os.getcwd()  # `python -m` puts it on sys.path; the console script does not
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CLIError(f"cannot load {spec!r}: {exc} (looked in the current directory "
                       f"{here!r} and on sys.path)") from None
    finally:
        if added:
            sys.path.remove(here)
    try:
        model = factory()
    except Exception as exc:  # a user factory may raise anything: report it in one line
        raise CLIError(f"{spec!r} failed when called with no arguments: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                       ) from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CLIError(f"bad --input {text!r}: give positive integers separated by commas, "
                       f"e.g. 1,3,32,32")
    return shape


def default_input(name: str, given: str | None) -> tuple[int, ...]:
    if given:
        return parse_shape(given)
    if name in EXAMPLE_SHAPES:
        return EXAMPLE_SHAPES[name]
    raise CLIError(f"--input is required for {name!r} (e.g. --input 1,3,32,32)")


def example_input(model: nn.Module, name: str, given: str | None) -> torch.Tensor:
    """A random input of the model's shape, checked by one forward pass."""
    shape = default_input(name, given)
    x = torch.randn(shape)
    try:
        with training_flags(model), torch.no_grad():
            model.eval()
            model(x)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"{name} cannot run on an input of shape {','.join(map(str, shape))} "
                       f"({type(exc).__name__}: {first[:200]}); pass --input with the shape it "
                       f"expects") from None
    return x


def unwrap_checkpoint(state: Any, path: str, key: str | None) -> dict[str, Any]:
    """The state_dict in a checkpoint file: the file itself, ``state[key]`` (``--key``), or
    ``state["state_dict"]``; a training checkpoint that wraps it otherwise is refused naming
    its keys and the one to pass."""
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            held = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CLIError(f"--key {key!r}: {path!r} holds no such entry (it holds {held})")
        state = state[key]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CLIError(f"{path!r} holds {type(state).__name__}, not a state_dict")
    nested = [k for k, v in state.items() if isinstance(v, dict)
              and v and all(isinstance(t, torch.Tensor) for t in v.values())]
    if nested and not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{path!r} is a training checkpoint holding {sorted(state)}, not a "
                       f"state_dict; the weights are probably under {nested[0]!r}: pass "
                       f"--key {nested[0]}")
    return state


def block_keys(keys: list[str], own: set[str]) -> bool:
    """Whether state_dict keys hold expanded blocks of the model's conv/linear layers."""
    for key in keys:
        match = BLOCK_KEY.search(key)
        if match and f"{key[:match.start()]}.weight" in own:  # <layer>.layers.<i>, .branches
            return True
    return False


def patterns(args: argparse.Namespace) -> dict[str, list[str] | None]:
    """``include=`` / ``exclude=`` from ``--include a,b --include c`` (comma-separated globs)."""
    def split(values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        return [p.strip() for v in values for p in v.split(",") if p.strip()]
    return {"include": split(getattr(args, "include", None)),
            "exclude": split(getattr(args, "exclude", None))}


def cmd_plan(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    x = example_input(model, args.model, args.input)
    print(efx.plan(model, args.rule, args.r, example_inputs=(x,), **patterns(args)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    model = load_model(args.model).eval()
    x = example_input(model, args.model, args.input)
    big = efx.expand(model, args.rule, args.r, mode=args.mode, strict=args.strict,
                     example_inputs=(x,), **patterns(args)).eval()
    n_blocks = sum(isinstance(m, efx.ExpandedBlock) for m in big.modules())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # randomize the factors: a check on trained-like weights
        for block in (m for m in big.modules() if isinstance(m, efx.ExpandedBlock)):
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype)
                        / max(1.0, p[0].numel() ** 0.5 if p.dim() > 1 else 10.0))
    small = efx.contract(big) if n_blocks else big
    with torch.no_grad():  # NaN stays NaN (max() over errors would drop it)
        err = rel_error(big(x), small(x))
    same_keys = list(small.state_dict()) == list(model.state_dict())
    labels = sorted({b.label for b, _ in blocks(big).values()})
    print(f"{args.model}: {n_blocks} layer(s) expanded with {'; '.join(labels)}")
    shown = f"{err:.2e}" if math.isfinite(err) else f"{err} (non-finite)"
    print(f"contract(big) vs big: max |diff| / max |out| = {shown} (limit 1e-5)")
    print(f"state_dict keys identical to the original: {same_keys}")
    out_path = Path(args.out or f"{args.model.replace(':', '_').replace('.', '_')}.onnx")
    ok = err <= 1e-5 and same_keys
    try:
        report = efx.export_onnx(big, (x,), out_path)
        print(report)
    except efx.VerificationError as exc:
        print(exc.report)
        ok = False
    except ExpandFXError as exc:  # the export itself failed: a failed check, not bad input
        print(f"export failed: {str(exc).splitlines()[0]}")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    path = Path(args.weights)
    if not path.is_file():
        raise CLIError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"cannot read checkpoint {str(path)!r} with weights_only=True: "
                       f"{str(exc).splitlines()[0]}") from None
    state = unwrap_checkpoint(state, str(path), args.key)
    own = set(model.state_dict())
    foreign = [k for k in state if k not in own]
    expanded = block_keys(foreign, own)
    if expanded:
        if args.rule is None:
            raise CLIError(f"{str(path)!r} is a checkpoint of an expanded model: pass the rule "
                           f"and r it was expanded with (--rule ... --r ...; r defaults to 4), "
                           f"or contract first (save efx.contract(big).state_dict())")
        model = efx.expand(model, args.rule, args.r, **patterns(args))
    else:
        given = [f for f, v in (("--rule", args.rule), ("--r", args.r),
                                ("--include", args.include), ("--exclude", args.exclude))
                 if v is not None]
        if given:
            raise CLIError(f"{str(path)!r} is a compact checkpoint (no expanded blocks), so "
                           f"{', '.join(given)} would be ignored: drop {given[0]}")
    companded_keys = any(k.endswith(".parametrizations.weight.original")
                         and k not in model.state_dict() for k in state)
    if companded_keys:
        model = efx.compand(model, psi=args.psi or "arctan", inplace=True)
    elif args.psi is not None:
        raise CLIError(f"--psi {args.psi} would be ignored: {str(path)!r} holds no companded "
                       f"weights; drop --psi")
    if args.target != "executorch" and args.max_batch is not None:
        raise CLIError("--max-batch would be ignored without --target executorch (an ONNX "
                       "file's batch is dynamic): add --target executorch or drop --max-batch")
    args.max_batch = 64 if args.max_batch is None else args.max_batch
    if not args.int8:
        extra = [f for f, v in (("--data", args.data), ("--calibrate", args.calibrate))
                 if v is not None]
        if extra:
            raise CLIError(f"{', '.join(extra)} would be ignored without --int8: add --int8 "
                           f"or drop {extra[0]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # torch's header, then one problem per line: ours come first
        lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
        problems = lines[1:] or lines
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CLIError(f"checkpoint does not fit {args.model}: {problems[0]}{more}") from None
    x = example_input(model, args.model, args.input)
    x, int8 = _int8_arguments(args, x) if args.int8 else (x, {})
    try:
        if args.target == "executorch":
            report = efx.export_executorch(model, (x,), args.out, max_batch=args.max_batch,
                                           **int8)
        else:
            report = efx.export_onnx(model, (x,), args.out, **int8)
    except efx.VerificationError as exc:
        print(exc.report)
        print(f"FAIL: {str(exc).splitlines()[0]}")
        if args.report:
            Path(args.report).write_text(exc.report.to_json())
        return 1
    print(report)
    if args.report:
        Path(args.report).write_text(report.to_json())
    return 0


def _int8_arguments(args: argparse.Namespace, x: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The example input and export_onnx's int8 keywords. With --data (a tensor, or
    {"x": ..., "y": ...} / (x, y) with labels): its first ``len(x)`` samples are the example
    input and its samples the calibration and held-out batches. Without: random inputs like
    ``x``, so ``x`` is only a shape hint and the verdict rests on the (random) held-out
    batches alone — a smoke test of the pipeline."""
    from .quantize import Int8Config, split_samples

    y, calibrate = None, args.calibrate or 256
    if args.data:
        try:
            data = torch.load(args.data, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CLIError(f"cannot read --data {args.data!r} with weights_only=True: "
                           f"{str(exc).splitlines()[0]}") from None
        data, y = ((data.get("x"), data.get("y")) if isinstance(data, dict) else
                   tuple(data) if isinstance(data, tuple | list) and len(data) == 2 else
                   (data, None))
        if not isinstance(data, torch.Tensor):
            raise CLIError(f"--data {args.data!r}: save a tensor of inputs, or {{'x': inputs, "
                           f"'y': labels}}, with torch.save")
        data = data.float()
        x, verify_on = data[:len(x)], "all"
    else:
        print(f"--int8 without --data: calibrating on {calibrate} random inputs and "
              f"verifying on 64 more, so the int8 verdict rests on random inputs (a smoke test "
              f"of the pipeline, not of the model's accuracy); pass --data with real inputs "
              f"for a deployment")
        data = torch.randn(calibrate + 64, *x.shape[1:], generator=torch.Generator()
                           .manual_seed(0)) * x.std() + x.mean()
        verify_on = "held-out"
    try:
        batches, labels, held = split_samples(data, y, calibrate, batch=32)
    except ExpandFXError as exc:
        raise CLIError(str(exc).replace("split_samples", f"--data {args.data!r}")) from None
    return x, {"quantize": Int8Config(holdout=held, verify_on=verify_on),
               "calibration": batches, "labels": labels}


def cmd_models(args: argparse.Namespace) -> int:
    for name in MODELS:
        print(f"{name:24} input {','.join(map(str, EXAMPLE_SHAPES[name]))}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    for rule in RULES.values():
        options = f" (options: {', '.join(sorted(rule.options))})" if rule.options else ""
        print(f"{rule.name:10} {rule.kind:6} {rule.summary}{options}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(out=Path(args.out), rule=args.rule, r=args.r, epochs=args.epochs,
                    seeds=args.seeds, quick=args.quick)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expandfx", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train compact networks over-parameterized (ExpandNets), then fold them "
                    "back exactly and export a verified ONNX file.",
        epilog=EPILOG.format(models=", ".join(MODELS), rules=", ".join(RULES)))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train compact vs expanded on real data, contract, export")
    d.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--rule", default="CK", help="expansion rule (default: CK)")
    d.add_argument("--r", type=float, default=None,
                   help="expansion rate of CL, CK, FC (default: 4; branch rules take none)")
    d.add_argument("--epochs", type=positive, default=40, help="epochs per run (default: 40)")
    d.add_argument("--seeds", type=positive, default=5, help="training seeds (default: 5)")
    d.add_argument("--quick", action="store_true", help="a few epochs, one seed (for tests)")
    d.set_defaults(func=cmd_demo)

    def common(p: argparse.ArgumentParser, rule_default: str | None = "CL") -> None:
        p.add_argument("model", metavar="MODEL", help="model name or package.module:factory")
        p.add_argument("--rule", default=rule_default, help=f"rule (default: {rule_default})")
        p.add_argument("--r", type=float, default=None,
                       help="expansion rate of CL, CK, FC (default: 4; branch rules take none)")
        p.add_argument("--input", help="input shape, e.g. 1,3,32,32 (in-repo models: known)")
        p.add_argument("--include", action="append", metavar="GLOBS",
                       help="expand only layers matching these module-path globs, comma-"
                            "separated (repeatable); an exact path is an explicit request, "
                            "e.g. --include '*,classifier.2' also expands the output layer")
        p.add_argument("--exclude", action="append", metavar="GLOBS",
                       help="leave layers matching these globs alone (comma-separated)")

    p = sub.add_parser("plan", help="the per-layer expansion plan")
    common(p)
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("check", help="expand, randomize, contract, export, verify: pass/fail")
    common(c)
    c.add_argument("--mode", default="auto", choices=["auto", "collapsed", "sequential"])
    c.add_argument("--out", help="ONNX file to write (default: MODEL.onnx)")
    c.add_argument("--strict", action="store_true",
                   help="fail (exit 2) when the rule expands no layer, instead of a warning")
    c.set_defaults(func=cmd_check)

    e = sub.add_parser("export", help="contract/bake/export/verify a trained checkpoint")
    common(e, rule_default=None)
    e.add_argument("--weights", required=True, help="state_dict file (torch.save)")
    e.add_argument("--out", required=True, help="ONNX file to write")
    e.add_argument("--psi", default=None,
                   help="compander Ψ of a companded checkpoint (default: arctan)")
    e.add_argument("--key", help="the entry of a training checkpoint that holds the "
                                 "state_dict (e.g. --key model for {'model': ..., 'epoch': 3})")
    e.add_argument("--report", help="also write the JSON report here")
    e.add_argument("--target", default="onnx", choices=["onnx", "executorch"],
                   help="onnx (default: verified in onnxruntime) or executorch (a .pte "
                        "program for XNNPACK, verified in ExecuTorch's runtime)")
    e.add_argument("--max-batch", type=positive, default=None, metavar="N",
                   help="the largest batch the ExecuTorch program accepts (default 64)")
    e.add_argument("--int8", action="store_true",
                   help="also write OUT's stem + .int8.onnx: static int8 (QDQ, per-channel "
                        "weights), verified against fp32 on held-out samples")
    e.add_argument("--calibrate", type=positive, default=None, metavar="N",
                   help="samples to calibrate on (default 256); the rest are held out")
    e.add_argument("--data", help="torch.save'd inputs for --int8: a tensor, or {'x': ..., "
                                  "'y': labels} for accuracies (default: random inputs)")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list the in-repo models")
    m.set_defaults(func=cmd_models)
    rl = sub.add_parser("rules", help="list the registered expansion rules")
    rl.set_defaults(func=cmd_rules)
    return parser


def exit_code(exc: BaseException) -> int:
    """The command line's exit code for an error: 1 for a check that failed
    (``VerificationError``: the model was exported but is not verified), 2 for bad input."""
    return 1 if isinstance(exc, efx.VerificationError) else 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ExpandFXError) as exc:
        # the library's messages name keyword arguments; here they are flags
        first = re.sub(r"\b([Dd]rop) r=", r"\1 --r", str(exc).splitlines()[0])
        first = re.sub(r"\br=(\S+) would be ignored", r"--r \1 would be ignored", first)
        print(f"expandfx: error: {first}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


def _main() -> Any:  # console-script entry point
    raise SystemExit(main())
