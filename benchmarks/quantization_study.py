"""Quantization study: does expansion (or folding) make a compact net quantize worse?

Part 1 (trained): scikit-learn's 8×8 digits with the demo's SmallNet, trained directly
(``compact``) and expanded with CK+FC, CL (r = 4), RepVGG and ACNet (expandfx's branch
rules, which carry no BatchNorm), plus ``RepVGG-BN``: the published RepVGG block with a
BatchNorm on every branch (k×k+BN, 1×1+BN), the case where the literature reports int8
losses (QARepVGG). Same recipe as the demo (SGD lr 0.05, momentum 0.9, cosine, batch 64,
``efx.param_groups``), seeds 0..4, one thread, deterministic kernels. Each trained model is
contracted, folded (``efx.fold``: BN and branches merged) and exported to fp32 ONNX once;
then quantized by onnxruntime (static QDQ, int8 weights and activations) with each
calibration method × per-channel / per-tensor weights, calibrated on 256 training images
and verified on the 450 test images (held out): accuracy of fp32 and int8, SQNR, top-1
agreement. Weight outlier statistics of the folded layers: max |w| / std(w) per layer,
and the spread of per-output-channel ranges (max over channels of max |w_c| / median of
it), which is what per-tensor scales suffer from.

Part 2 (random weights, only indicative): the fold conformance models (timm RepVGG-A0,
MobileOne-S0, FastViT-T8, RepViT-M1; torchvision resnet18, mobilenet_v2) with random
weights and BatchNorm statistics measured on random images, folded and quantized (minmax,
per-channel and per-tensor), calibrated on random images and verified on others. SQNR on
random-weight networks says little about trained ones; it shows the pipeline runs on
them and flags gross failures.

    python benchmarks/quantization_study.py             # full run (resumable), writes results/
    python benchmarks/quantization_study.py --quick     # 1 seed, 2 epochs, no zoo (tests)

Every finished unit is appended to ``results/quantization.partial.jsonl``; a rerun skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import conftest  # noqa: E402,F401  (torchvision import workaround of this machine)

import expandfx as efx  # noqa: E402
from expandfx.demo import accuracy, digits, fit, reproducible  # noqa: E402
from expandfx.models import smallnet_digits  # noqa: E402
from expandfx.quantize import Int8Config, quantize_onnx  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RULES = ["compact", "CK+FC", "CL", "RepVGG", "ACNet", "RepVGG-BN"]
SEEDS = (0, 1, 2, 3, 4)
EPOCHS = 20
METHODS = ("minmax", "percentile")  # entropy = minmax in onnxruntime 1.32 (expandfx/quantize.py)
ZOO = {
    "timm/repvgg_a0": ("timm", "repvgg_a0"), "timm/mobileone_s0": ("timm", "mobileone_s0"),
    "timm/fastvit_t8": ("timm", "fastvit_t8"), "timm/repvit_m1": ("timm", "repvit_m1"),
    "torchvision/resnet18": ("torchvision", "resnet18"),
    "torchvision/mobilenet_v2": ("torchvision", "mobilenet_v2"),
}


class RepBlockBN(nn.Module):
    """RepVGG's training block as published: k×k conv + BN, 1×1 conv + BN (identity + BN
    where in = out channels and stride 1), summed. ``efx.fold`` merges it into one conv."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        c_in, c_out, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
        self.kxk = nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
                                 nn.BatchNorm2d(c_out))
        self.one = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kxk(x) + self.one(x)
        return y + self.identity(x) if self.identity is not None else y


def build(rule: str) -> nn.Module:
    model = smallnet_digits()
    if rule == "compact":
        return model
    if rule == "RepVGG-BN":
        for i, m in enumerate(model.features):
            if isinstance(m, nn.Conv2d):
                model.features[i] = RepBlockBN(m)
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return efx.expand(model, rule, 4.0 if efx.rules.find(rule).uses_r else None)


def weight_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per conv/linear layer: max |w| / std(w), and max / median of per-channel max |w_c|."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            w = m.weight.detach().double()
            per_channel = w.reshape(w.shape[0], -1).abs().amax(1)
            out.append({"layer": name, "max_over_std": float(w.abs().max() / w.std()),
                        "channel_spread": float(per_channel.max() / per_channel.median())})
    return out


def quantize_all(fp32: str, example: tuple, calib: list, held: list, labels: list | None,
                 methods: tuple[str, ...], tmp: str) -> dict[str, Any]:
    """Every (method, granularity) on one fp32 file; keyed ``method/per-channel|per-tensor``."""
    results = {}
    for method in methods:
        for per_channel in (True, False):
            key = f"{method}/{'per-channel' if per_channel else 'per-tensor'}"
            config = Int8Config(method=method, per_channel=per_channel, min_sqnr_db=None,
                                holdout=len(held), path=os.path.join(tmp, "m.int8.onnx"))
            rep = quantize_onnx(fp32, example, calib + held, labels, config)
            results[key] = {"sqnr_db": rep.sqnr_db["held-out"],
                            "agreement": rep.agreement.get("held-out"),
                            "accuracy": rep.accuracy or None,
                            "size_bytes": rep.size_bytes, "latency_ms": rep.latency_ms,
                            "latency_ratio": rep.latency_ratio,
                            "quantized_layers": list(rep.quantized_layers)}
    return results


def trained_unit(rule: str, seed: int, epochs: int, quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    with reproducible(threads=1):
        xtr, ytr, xte, yte = digits()
        if quick:
            xtr, ytr, xte, yte = xtr[:512], ytr[:512], xte[:128], yte[:128]
        torch.manual_seed(100 + seed)
        model = build(rule)
        hist = fit(model, (xtr, ytr, xte, yte), epochs, seed, f"{rule} s{seed}")
        model.eval()
        deployed = efx.contract(model) if efx.ExpandedBlock in map(type, model.modules()) \
            else model
        folded = efx.fold(deployed, (xte[:4],))
        calib = list(xtr[:256].split(64))
        held = list(xte.split(64))
        labels = list(ytr[:256].split(64)) + list(yte.split(64))
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = os.path.join(tmp, "m.onnx")
            efx.export_onnx(folded, (xte[:4],), fp32, n_random=1)
            results = quantize_all(fp32, (xte[:4],), calib, held, labels,
                                   (METHODS[0],) if quick else METHODS, tmp)
    return {"part": "trained", "rule": rule, "seed": seed, "epochs": epochs, "quick": quick,
            "fp32_accuracy": accuracy(folded, xte, yte), "final_test": hist["test"][-1],
            "diverged": hist["diverged"], "int8": results, "weights": weight_stats(folded),
            "seconds": time.perf_counter() - t0}


def zoo_unit(name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    source, arch = ZOO[name]
    with reproducible(threads=1):
        torch.manual_seed(0)
        if source == "timm":
            import timm

            model = timm.create_model(arch, pretrained=False)
        else:
            import torchvision

            model = getattr(torchvision.models, arch)(weights=None)
        gen = torch.Generator().manual_seed(0)
        size = 64
        with torch.no_grad():  # BatchNorm statistics measured on images, random affine
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.1, generator=gen)
            model.train()
            model(torch.randn(16, 3, size, size, generator=gen))
        model.eval()
        x = torch.randn(2, 3, size, size, generator=gen)
        calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(8)]
        held = [torch.randn(8, 3, size, size, generator=gen) for _ in range(4)]
        rec: dict[str, Any] = {"part": "zoo", "model": name}
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = os.path.join(tmp, "m.onnx")
            # unfolded: the training-time branches kept (onnxruntime's pre-processing still
            # fuses Conv+BN); the comparison says what folding the branches costs in int8
            efx.export_onnx(model, (x,), fp32, n_random=1, verify=False)
            rec["unfolded"] = quantize_all(fp32, (x,), calib, held, None, ("minmax",), tmp)
            try:
                folded = efx.fold(model, (x,))
            except efx.ExpandFXError as exc:
                rec["fold_error"] = str(exc).splitlines()[0][:200]
                return {**rec, "int8": {}, "weights": [], "seconds": time.perf_counter() - t0}
            report = efx.export_onnx(folded, (x,), fp32, n_random=1)
            rec["int8"] = quantize_all(fp32, (x,), calib, held, None, ("minmax",), tmp)
    return {**rec, "weights": weight_stats(folded), "fp32_verified": report.passed,
            "seconds": time.perf_counter() - t0}


def _key(rec: dict[str, Any]) -> tuple:
    if rec["part"] == "zoo":
        return ("zoo", rec["model"])
    return ("trained", rec["rule"], rec["seed"], rec["epochs"], rec["quick"])


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def write(records: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> str:
    trained = [r for r in records if r["part"] == "trained" and not r["diverged"]]
    keys = sorted({k for r in trained for k in r["int8"] if k.split("/")[0] in METHODS},
                  key=lambda k: (
        METHODS.index(k.split("/")[0]), k.endswith("tensor")))
    lines = ["# int8 quantization study", "", f"Setup: {meta['setup']}; onnxruntime "
             f"{meta['onnxruntime']}, onnx {meta['onnx']}, {meta['cpu']}; "
             f"{meta['minutes']:.1f} min. Written by `benchmarks/quantization_study.py`.", "",
             "## Trained on digits 8×8 (SmallNet): test accuracy (%), fp32 and int8", "",
             f"Seeds {sorted({r['seed'] for r in trained})}, "
             f"{trained[0]['epochs'] if trained else 0} epochs; calibrated on 256 training "
             "images, verified on the 450 test images; "
             "mean ± std over seeds. ΔInt8 = int8 − fp32 accuracy (points).", ""]
    head = "| rule | fp32 | " + " | ".join(keys) + " |"
    lines += [head, "|---|---:|" + "---:|" * len(keys)]
    rules = [r for r in RULES if any(t["rule"] == r for t in trained)]
    for rule in rules:
        runs = [t for t in trained if t["rule"] == rule]
        cells = [_ms([100 * t["fp32_accuracy"] for t in runs])]
        for k in keys:
            delta = [100 * (t["int8"][k]["accuracy"]["int8"] - t["int8"][k]["accuracy"]["fp32"])
                     for t in runs]
            acc = [100 * t["int8"][k]["accuracy"]["int8"] for t in runs]
            cells.append(f"{_ms(acc)} (Δ {statistics.fmean(delta):+.2f})")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines += ["", "## Trained: held-out SQNR (dB) and top-1 agreement with fp32", "",
              "| rule | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for rule in rules:
        runs = [t for t in trained if t["rule"] == rule]
        cells = [f"{_ms([t['int8'][k]['sqnr_db'] for t in runs])} dB, "
                 f"{100 * statistics.fmean(t['int8'][k]['agreement'] for t in runs):.2f} %"
                 for k in keys]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines += ["", "## Trained: weight outliers of the folded layers (mean over seeds)", "",
              "max |w| / std(w) per layer, and in brackets the per-channel spread (max over "
              "output channels of max |w_c|, divided by its median).", ""]
    layer_names = [w["layer"] for w in trained[0]["weights"]] if trained else []
    lines += ["| rule | " + " | ".join(layer_names) + " |",
              "|---|" + "---:|" * len(layer_names)]
    for rule in rules:
        runs = [t for t in trained if t["rule"] == rule]
        cells = [f"{statistics.fmean(t['weights'][i]['max_over_std'] for t in runs):.1f} "
                 f"({statistics.fmean(t['weights'][i]['channel_spread'] for t in runs):.2f})"
                 for i in range(len(layer_names))]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    if trained:
        key = "minmax/per-channel"
        ratios = [t["int8"][key]["latency_ratio"] for t in trained]
        sizes = [t["int8"][key]["size_bytes"] for t in trained]
        lines += ["", f"Files ({key}): fp32 {sizes[0]['fp32']:,} B, int8 {sizes[0]['int8']:,} B; "
                  f"onnxruntime latency int8 / fp32 (batch 64, 1 thread): median "
                  f"{statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f})."]
    zoo = [r for r in records if r["part"] == "zoo"]
    if zoo:
        lines += ["", "## Fold conformance models, random weights (indicative only)", "",
                  "Random init, BatchNorm statistics from random images, 64×64, folded by "
                  "`efx.fold`; minmax calibration on 64 random images, verified on 32 others.",
                  "Folded: SQNR (dB) / top-1 agreement, per-channel and per-tensor weights; "
                  "unfolded: the same model exported with its training-time branches "
                  "(onnxruntime's pre-processing fuses Conv+BN), per-channel.",
                  "", "| model | folded per-channel | folded per-tensor | unfolded per-channel "
                  "| worst max\\|w\\|/std (folded) | worst channel spread | size int8/fp32 | "
                  "latency int8/fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        def cell(q: dict[str, Any]) -> str:
            return f"{q['sqnr_db']:.1f} dB / {100 * q['agreement']:.0f} %"

        for r in zoo:
            if "error" in r:
                lines.append(f"| {r['model']} | failed: {r['error'][:120]} |" + " |" * 6)
                continue
            un = cell(r["unfolded"]["minmax/per-channel"])
            if "fold_error" in r:
                lines.append(f"| {r['model']} | fold refused: {r['fold_error'][:90]} | | {un} |"
                             + " |" * 4)
                continue
            pc, pt = r["int8"]["minmax/per-channel"], r["int8"]["minmax/per-tensor"]
            w = r["weights"]
            lines.append(
                f"| {r['model']} | {cell(pc)} | {cell(pt)} | {un} | "
                f"{max(x['max_over_std'] for x in w):.1f} | "
                f"{max(x['channel_spread'] for x in w):.1f} | "
                f"{pc['size_bytes']['int8'] / pc['size_bytes']['fp32']:.2f} | "
                f"{pc['latency_ratio']:.2f}× |")
    text = "\n".join(lines) + "\n"
    (out / "quantization_study.md").write_text(text)
    (out / "quantization_study.json").write_text(json.dumps({"meta": meta, "records": records},
                                                            indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, no zoo")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rules", nargs="*", default=RULES)
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--no-zoo", action="store_true")
    args = parser.parse_args(argv)
    import onnx
    import onnxruntime

    epochs = 2 if args.quick else args.epochs
    units = [("trained", rule, seed) for seed in range(1 if args.quick else args.seeds)
             for rule in args.rules]
    if not (args.quick or args.no_zoo):
        units += [("zoo", name, None) for name in ZOO]
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "quantization.partial.jsonl"
    records = [json.loads(line) for line in partial.read_text().splitlines()] \
        if partial.exists() else []
    want = {("zoo", n) if p == "zoo" else ("trained", n, s, epochs, args.quick)
            for p, n, s in units}
    records = [r for r in records if _key(r) in want]
    done = {_key(r) for r in records}
    with reproducible(threads=1) as setup:
        print(f"{len(units)} units ({len(done)} done); {setup}; onnxruntime "
              f"{onnxruntime.__version__}", flush=True)
    t0 = time.perf_counter()
    for part, name, seed in units:
        key = ("zoo", name) if part == "zoo" else ("trained", name, seed, epochs, args.quick)
        if key in done:
            continue
        try:
            rec = zoo_unit(name) if part == "zoo" else trained_unit(name, seed, epochs,
                                                                    args.quick)
        except Exception as exc:  # a zoo model that does not fold/export: record why
            if part != "zoo":
                raise
            rec = {"part": "zoo", "model": name, "error": f"{type(exc).__name__}: {exc}"[:300],
                   "int8": {}, "seconds": 0.0}
            print(f"{name}: {rec['error']}", flush=True)
        records.append(rec)
        if "error" not in rec:  # a failure is retried by the next run
            with partial.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        best = rec["int8"].get("minmax/per-channel", {})
        print(f"{part} {name} {'' if seed is None else f'seed {seed} '}"
              f"SQNR {best.get('sqnr_db', float('nan')):.1f} dB ({rec['seconds']:.0f} s)",
              flush=True)
    meta = {"setup": setup, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": 1, "minutes": (time.perf_counter() - t0) / 60, "quick": args.quick}
    print(write(records, meta, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
