"""Fold conformance table (issue 17): ``expandfx.fold`` against each zoo's own fusion.

* timm families that ship ``reparameterize()`` / ``fuse()`` / ``switch_to_deploy()`` (found by
  scanning ``timm.models``; the smallest variant of each): fold vs
  ``timm.utils.model.reparameterize_model``;
* torchvision classifiers, a detection backbone, segmentation models and video models: fold vs
  ``torch.fx.experimental.optimization.fuse`` (conv/BN fusion on an FX trace);
* Hugging Face vision models from small configs: fold vs the untouched model (FX cannot trace
  them; the reference figures are those of the model itself).

Every model is built with a fixed seed (no weights downloaded), its BatchNorm running
statistics and affine parameters are randomized with a fixed seed (otherwise folding a
fresh BN, an identity, is trivially exact), then put in eval mode. Per row: fold's status
(``ok`` or the exception's first line), its relative error (the FoldReport's, and recomputed
here: max|fold(x) − model(x)| / max|model(x)| over all output tensors), parameters (sum of
``numel``), MACs at the input shape (``FlopCounterMode`` total / 2), convolutions and batch
norms *executed* (aten ops counted by a ``TorchDispatchMode``: this sees functional calls and
layers inside opaque leaves too; module counts are in the json), for the input model, the
fold output and the reference; and fold's wall time.

    python benchmarks/fold_conformance.py   # all rows: results/fold_conformance.{md,json}
    python benchmarks/fold_conformance.py --kinds timm --only rep
    python benchmarks/fold_conformance.py --out benchmarks/results/fold_conformance_before.md
    python benchmarks/fold_conformance.py --list            # the row names

The json (next to ``--out``, same stem) is keyed by row name and resumable: rows already in it
are skipped unless ``--redo``; the md is rewritten from the whole json after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import conftest  # noqa: E402,F401  (defines the torchvision schemas this machine lacks)

import expandfx as efx  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = 2
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    kind: str  # timm | torchvision | hf
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    note: str = ""


def _timm(name: str, size: int = 64, note: str = "", **kw: Any) -> Row:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    extra = ", ".join([f"{k}={v}" for k, v in kw.items()] + ([note] if note else []))
    return Row(f"timm/{name}", "timm", build, (1, 3, size, size), extra)


# smallest variant of every timm family with reparameterize / fuse / switch_to_deploy
# (byobnet: RepVgg, MobileOne blocks; fastvit; repvit; repghost; ghostnet v3; efficientvit_msra;
# levit; tiny_vit; efficientvim; iformer; lcnetv2; nextvit; shvit) plus mobilenetv4 (BN-heavy,
# no reparameterize: the reference is then the model itself)
TIMM_ROWS = [
    _timm("repvgg_a0"),
    _timm("mobileone_s0"),
    _timm("fastvit_t8"),
    _timm("fastvit_mci0"),
    _timm("repvit_m0_9"),
    _timm("repghostnet_050"),
    _timm("ghostnetv3_050"),
    _timm("efficientvit_m0", img_size=64),
    _timm("levit_128s", img_size=64),
    _timm("tiny_vit_5m_224"),
    _timm("efficientvim_m1", 64),
    _timm("iformer_s", 64),
    _timm("lcnetv2_small", 64),
    _timm("shvit_s1", 64),
    _timm("nextvit_small", 64),
    _timm("mobilenetv4_conv_small", note="no reparameterize: reference = the model"),
]


def _tv(name: str, shape: tuple[int, ...] = (1, 3, 64, 64), part: str = "", note: str = "",
        **kw: Any) -> Row:
    def build() -> nn.Module:
        import torchvision.models as tvm
        import torchvision.models.detection as det
        import torchvision.models.segmentation as seg
        import torchvision.models.video as vid

        for mod in (tvm, det, seg, vid):
            if hasattr(mod, name):
                model = getattr(mod, name)(weights=None, **kw)
                break
        else:
            raise ValueError(f"no torchvision model {name}")
        return getattr(model, part) if part else model

    label = f"tv/{name}" + (f".{part}" if part else "")
    return Row(label, "torchvision", build, shape, note)


TV_ROWS = [
    _tv("resnet18"),
    _tv("mobilenet_v2"),
    _tv("mobilenet_v3_small"),
    _tv("mnasnet0_5"),
    _tv("efficientnet_b0"),
    _tv("regnet_x_400mf"),
    _tv("shufflenet_v2_x0_5"),
    _tv("squeezenet1_1"),
    _tv("googlenet", aux_logits=False, init_weights=False),
    _tv("inception_v3", (1, 3, 80, 80), aux_logits=False, init_weights=False),
    _tv("fasterrcnn_mobilenet_v3_large_fpn", part="backbone", weights_backbone=None,
        note="detection backbone (MobileNetV3 + FPN)"),
    _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, note="whole model"),
    _tv("lraspp_mobilenet_v3_large", weights_backbone=None, note="whole model"),
    _tv("r3d_18", (1, 3, 4, 32, 32)),
    _tv("mc3_18", (1, 3, 4, 32, 32)),
]


def _hf(label: str, model_cls: str, config_cls: str, size: int = 64, **cfg: Any) -> Row:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(num_labels=10, **cfg)
        return getattr(transformers, model_cls)(config)

    return Row(f"hf/{label}", "hf", build, (1, 3, size, size), "small config")


HF_ROWS = [
    _hf("ResNet", "ResNetForImageClassification", "ResNetConfig", embedding_size=16,
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck"),
    _hf("ConvNext", "ConvNextForImageClassification", "ConvNextConfig",
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
    _hf("MobileViT", "MobileViTForImageClassification", "MobileViTConfig", image_size=64,
        hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 96],
        num_attention_heads=2),
    _hf("MobileViTV2", "MobileViTV2ForImageClassification", "MobileViTV2Config",
        image_size=64, width_multiplier=0.5),
    _hf("RegNet", "RegNetForImageClassification", "RegNetConfig", embedding_size=16,
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8),
    _hf("MobileNetV1", "MobileNetV1ForImageClassification", "MobileNetV1Config",
        image_size=64, depth_multiplier=0.25),
    _hf("MobileNetV2", "MobileNetV2ForImageClassification", "MobileNetV2Config",
        image_size=64, depth_multiplier=0.35),
    _hf("EfficientNet", "EfficientNetForImageClassification", "EfficientNetConfig",
        image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    _hf("Levit", "LevitForImageClassification", "LevitConfig", image_size=64,
        hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
        key_dim=[8, 8, 8]),
    _hf("SwiftFormer", "SwiftFormerForImageClassification", "SwiftFormerConfig",
        image_size=64, embed_dims=[16, 24, 32, 48], depths=[1, 1, 1, 1]),
    _hf("TextNet", "TextNetForImageClassification", "TextNetConfig", image_size=[64, 64]),
]

ROWS = TIMM_ROWS + TV_ROWS + HF_ROWS
REFERENCE = {"timm": "timm reparameterize_model", "torchvision": "torch.fx fuse",
             "hf": "untouched model"}


# ----------------------------------------------------------------------------- measuring


class OpCounter(TorchDispatchMode):
    """Counts executed aten convolutions, batch norms and other norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = self.bn = self.other_norm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "convolution" in name and "backward" not in name:
            self.conv += 1
        elif "batch_norm" in name and "backward" not in name and "stats" not in name \
                and "elemt" not in name and "gather" not in name:
            self.bn += 1
        elif ("layer_norm" in name or "group_norm" in name) and "backward" not in name:
            self.other_norm += 1
        return func(*args, **(kwargs or {}))


def randomize_norms(model: nn.Module, seed: int = 0) -> int:
    """Non-trivial BN statistics and affine parameters (fixed seed); how many BNs."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n += 1
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    return n


def tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def rel_err(got: Any, want: Any) -> float:
    a, b = tensors(got), tensors(want)
    if len(a) != len(b) or not b:
        return math.nan
    if any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    diff = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))
    scale = max(float(y.double().abs().max()) for y in b)
    return diff / scale if scale else diff


def measure(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], Any]:
    """params, MACs, executed convs / BNs / other norms, module counts, and the output."""
    counter = OpCounter()
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops, counter:
        out = model(x)
    mods = list(model.modules())
    return {"params": sum(p.numel() for p in model.parameters()),
            "macs": flops.get_total_flops() // 2,
            "convs": counter.conv, "bns": counter.bn, "other_norms": counter.other_norm,
            "conv_modules": sum(isinstance(m, _CONVS) for m in mods),
            "bn_modules": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods),
            }, out


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class RowTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise RowTimeout("row took longer than --timeout")


def reference(row: Row, model: nn.Module) -> nn.Module:
    if row.kind == "timm":
        from timm.utils.model import reparameterize_model

        return reparameterize_model(model, inplace=False)
    if row.kind == "torchvision":
        from torch.fx.experimental.optimization import fuse

        return fuse(model, inplace=False)
    return model


def run_row(row: Row, timeout: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"kind": row.kind, "input": list(row.shape), "note": row.note,
                           "reference": REFERENCE[row.kind]}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        try:
            model = row.build()
        except Exception as exc:  # noqa: BLE001
            rec["status"] = "build failed: " + first_line(exc)
            return rec
        rec["bn_randomized"] = randomize_norms(model)
        model.eval()
        x = torch.randn(row.shape, generator=torch.Generator().manual_seed(1))
        try:
            rec["model"], want = measure(model, x)
        except Exception as exc:  # noqa: BLE001
            rec["status"] = "model forward failed: " + first_line(exc)
            return rec

        t0 = time.perf_counter()
        try:
            gm = efx.fold(model, (x,))
            rec["fold_s"] = time.perf_counter() - t0
            rec["status"] = "ok"
        except RowTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            rec["fold_s"] = time.perf_counter() - t0
            rec["status"] = first_line(exc)
            rec["traceback"] = repo_relative(traceback.format_exc(limit=-3))
            gm = None
        if gm is not None:
            report = gm.meta.get("expandfx.fold")
            rec["report_error"] = getattr(report, "error", None)
            rec["folded_layers"] = len(getattr(report, "folded", []) or [])
            rec["folded_modules"] = sum(len(f.get("modules", ())) for f in
                                        getattr(report, "folded", []) or [])
            rec["kept"] = len(getattr(report, "kept", []) or [])
            rec["fold_type"] = type(gm).__name__
            rec["fold"], got = measure(gm, x)
            rec["fold_error"] = rel_err(got, want)

        t0 = time.perf_counter()
        try:
            ref = reference(row, model)
            rec["ref_s"] = time.perf_counter() - t0
            rec["ref"], got = measure(ref, x)
            rec["ref_error"] = rel_err(got, want)
            rec["ref_status"] = "ok"
        except RowTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            rec["ref_status"] = first_line(exc)
    except RowTimeout as exc:
        rec.setdefault("status", first_line(exc))
        if rec.get("status") == "ok" and "ref_status" not in rec:
            rec["ref_status"] = first_line(exc)
    finally:
        signal.alarm(0)
        rec["row_s"] = time.perf_counter() - start
    return rec


# ----------------------------------------------------------------------------- report


def _n(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit == "M":
        return f"{v / 1e6:.2f}M"
    return str(v)


def _le(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b:
        return "—"
    return "✓" if a[key] <= b[key] else "✗"


def _e(v: Any) -> str:
    return "—" if v is None else f"{v:.1e}"


def _flags(argv: list[str]) -> str:
    """The command line flags, less --note's text (the header quotes the note itself)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--note":
            skip = True
            continue
        if not a.startswith("--note="):
            out.append(a)
    return " ".join(out)


def _short(text: str, n: int = 110) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= n else text[:n - 1] + "…"


def markdown(env: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    when = sorted({r.get("measured", {}).get("date", env["date"]) for r in results.values()})
    code = sorted({f"git {r.get('measured', {}).get('git', env['git'])}, expandfx imported "
                   f"from `{r.get('measured', {}).get('expandfx', env.get('expandfx', '?'))}`"
                   for r in results.values()})
    lines = [
        "# Fold conformance: expandfx.fold vs each zoo's own fusion",
        "",
        f"Measured {when[0]}" + (f" to {when[-1]}" if len(when) > 1 else "") +
        f" with `python benchmarks/fold_conformance.py` (last run: "
        f"{_flags(env['argv']) or 'no flags'}); torch {env['torch']}, timm {env['timm']}, "
        f"transformers {env['transformers']}, torchvision {env['torchvision']}; "
        f"{env['threads']} torch threads, load average {env['load']:.1f} on {env['cpus']} "
        f"cores; {'; '.join(code)}. "
        f"{env.get('note', '')} Random init (fixed seed, no weights), BatchNorm statistics "
        "and affine parameters randomized (seed 0), eval mode, batch 1.",
        "",
        "Reference: timm rows `timm.utils.model.reparameterize_model`; torchvision rows "
        "`torch.fx.experimental.optimization.fuse`; Hugging Face rows the untouched model. "
        "Figures are *input model / fold / reference*. err: max|out − model(x)| / max|model(x)| "
        "(fold: FoldReport.error, then recomputed here; ref: recomputed). MACs: "
        "FlopCounterMode total / 2 at the input shape. convs, BN: aten convolution and batch-"
        "norm ops executed on one forward (TorchDispatchMode). ≤ref: fold ≤ reference on "
        "params / MACs / BN ops; ≤in: fold ≤ input model on params / MACs. ✓ yes, ✗ no, — not "
        "measured (fold or reference failed).",
        "",
        "| row | input | status | fold err (report / here) | ref err | params in / fold / ref "
        "| MACs in / fold / ref | convs in / fold / ref | BN in / fold / ref | fold s | ≤ref P M N "
        "| ≤in P M |",
        "|---|---|---|---|---:|---|---|---|---|---:|---|---|",
    ]
    for name in [r.name for r in ROWS if r.name in results] + \
            [k for k in results if k not in {r.name for r in ROWS}]:
        r = results[name]
        m, f, ref = r.get("model"), r.get("fold"), r.get("ref")

        def trio(key: str, unit: str = "", dicts: tuple = (m, f, ref)) -> str:
            return " / ".join(_n(d[key], unit) if d else "—" for d in dicts)

        status = _short(r.get("status", "?"))
        if r.get("ref_status", "ok") != "ok":
            status += "; ref: " + _short(r["ref_status"], 80)
        shape = "×".join(map(str, r["input"])) + (f" ({r['note']})" if r.get("note") else "")
        ferr = f"{_e(r.get('report_error'))} / {_e(r.get('fold_error'))}" if f else "—"
        fold_s = f"{r['fold_s']:.1f}" if "fold_s" in r else "—"
        lines.append(
            f"| {name} | {shape} | {status} | {ferr} | {_e(r.get('ref_error'))} | "
            f"{trio('params', 'M')} | {trio('macs', 'M')} | {trio('convs')} | {trio('bns')} | "
            f"{fold_s} | {_le(f, ref, 'params')} {_le(f, ref, 'macs')} {_le(f, ref, 'bns')} | "
            f"{_le(f, m, 'params')} {_le(f, m, 'macs')} |")
    ok = {k: r for k, r in results.items() if r.get("status") == "ok"}
    total = sum(r.get("row_s", 0.0) for r in results.values())

    def worse(other: str, keys: tuple[str, ...]) -> list[str]:
        return [k for k, r in ok.items() if r.get(other)
                and any(r["fold"][key] > r[other][key] for key in keys)]

    above_ref = worse("ref", ("params", "macs", "bns"))
    above_in = worse("model", ("params", "macs"))
    failed = [k for k in results if k not in ok]
    lines += ["", f"{len(ok)}/{len(results)} rows folded (failed: {', '.join(failed) or 'none'}). "
              f"fold > reference on params, MACs or BN ops: {len(above_ref)} rows "
              f"({', '.join(above_ref) or 'none'}). fold > input model on params or MACs: "
              f"{len(above_in)} rows ({', '.join(above_in) or 'none'}). Rows' total wall time "
              f"{total:.0f} s. Per-row details (executed other norms, conv/BN module counts, "
              f"folded/kept counts, full error messages, tracebacks) in the json beside this "
              f"file."]
    return "\n".join(lines) + "\n"


def environment(argv: list[str]) -> dict[str, Any]:
    import subprocess

    import timm
    import torchvision
    import transformers

    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        git += " (uncommitted changes)" if dirty else ""
    except OSError:
        git = "?"
    return {"torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "git": git, "argv": argv, "expandfx": repo_relative(str(Path(efx.__file__).parent))}


ROOT = Path(__file__).resolve().parents[1]


def repo_relative(text: str) -> str:
    """``text`` with this machine's absolute paths made relative (results files name paths
    relative to the repository, docs/design.md §8): the repository root becomes nothing,
    a site-packages folder ``<site-packages>/``."""
    text = re.sub(r"/[^\s\"']*?/site-packages/", "<site-packages>/", text)
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run rows whose name contains this")
    parser.add_argument("--kinds", default="timm,torchvision,hf",
                        help="comma list of timm, torchvision (or tv), hf")
    parser.add_argument("--out", type=Path, default=RESULTS / "fold_conformance.md",
                        help="the md to write (the json goes beside it, same stem)")
    parser.add_argument("--redo", action="store_true", help="rerun rows already in the json")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per row")
    parser.add_argument("--note", default="", help="a sentence for the md header")
    parser.add_argument("--list", action="store_true", help="print the row names and stop")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    kinds = {"tv" if k.strip() == "torchvision" else k.strip() for k in args.kinds.split(",")}
    rows = [r for r in ROWS if ("tv" if r.kind == "torchvision" else r.kind) in kinds
            and args.only in r.name]
    if args.list:
        print("\n".join(f"{r.name:45} {'×'.join(map(str, r.shape))}" for r in rows))
        return 0
    torch.set_num_threads(THREADS)
    env = environment(argv)
    env["note"] = args.note
    print(f"torch {env['torch']}, timm {env['timm']}, transformers {env['transformers']}, "
          f"torchvision {env['torchvision']}, {env['threads']} threads, git {env['git']}",
          flush=True)
    out_json = args.out.with_suffix(".json")
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    results: dict[str, dict[str, Any]] = data.get("rows", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ran = 0
    for row in rows:
        if row.name in results and not args.redo:
            print(f"{row.name:45} (done, skipped)", flush=True)
            continue
        rec = run_row(row, args.timeout)
        rec["measured"] = {k: env[k] for k in ("date", "git", "expandfx", "load")}
        ran += 1
        results[row.name] = rec
        f, m = rec.get("fold"), rec.get("model")
        print(f"{row.name:45} {rec['status'][:60]:60} "
              f"err {_e(rec.get('fold_error'))}  params {_n(m and m['params'], 'M')}→"
              f"{_n(f and f['params'], 'M')}  BN {m and m['bns']}→{f and f['bns']}  "
              f"{rec['row_s']:.0f} s", flush=True)
        env["seconds_this_run"] = round(time.perf_counter() - start)
        out_json.write_text(json.dumps({"env": env, "rows": results}, indent=1, default=str))
        args.out.write_text(markdown(env, results))
    if ran:
        env["seconds_this_run"] = round(time.perf_counter() - start)
    else:  # nothing new: keep the environment the rows were measured in
        env = data.get("env", env)
    out_json.write_text(json.dumps({"env": env, "rows": results}, indent=1, default=str))
    args.out.write_text(markdown(env, results))
    print(f"done in {env['seconds_this_run']} s; {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
