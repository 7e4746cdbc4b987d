"""How long ``efx.export_onnx`` takes on 1–3 K-parameter models, cold and warm (issue 30).

*Cold* is the first export in a fresh process (a subprocess per repetition: ``import torch,
expandfx`` is reported beside it, not inside it); *warm* is every later export of the same
model in that process. Figures are medians: cold over the fresh processes, warm over all warm
exports of all of them. Each export's stage timings (``report.timings``: prepare, fold,
export, check, reference, verify, save, and their ``total``) are recorded with the wall time
measured around the call; ``unaccounted`` is the wall time no stage holds (the timings of the
code before issue 30 covered about half of it). The structural check is kept: the expanded
models are checked against their compact architecture on every export (``reference`` is the
stage; warm, its summary comes from the per-architecture cache).

The machine is shared: the torch thread count, the load average (``os.getloadavg`` before and
after each process) and the versions are printed and recorded beside every figure. With more
torch threads than free cores every eager forward of the verification waits for a
descheduled thread (tens of ms for a 2 K-parameter conv net); ``--threads 1`` shows the
export without that.

    python benchmarks/export_speed.py                    # both thread settings, 3 processes
    python benchmarks/export_speed.py --threads 1 --reps 2 --warm 3
    python benchmarks/export_speed.py --label before --pythonpath /path/to/old/checkout
    python benchmarks/export_speed.py --quick            # a smoke run (nothing written)

Runs are merged into ``results/export_speed.json`` by (label, threads, model) and the whole
file is rendered to ``results/export_speed.md``. The target (issue 30): warm ≤ 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGET_WARM_S = 2.0
MODELS = ("tiny_conv", "tiny_conv_CL2", "tiny_mlp_FC2", "smallnet_digits_CKFC2")
MARK = "EXPORT_SPEED "


def build(name: str):
    """(model, example inputs, compact parameter count) for a benchmark model."""
    import torch
    from torch import nn

    import expandfx as efx
    from expandfx.models import smallnet_digits

    torch.manual_seed(0)
    if name.startswith("tiny_conv"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        x = torch.randn(2, 3, 16, 16)
    elif name.startswith("tiny_mlp"):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        x = torch.randn(2, 64)
    else:
        model = smallnet_digits()
        x = torch.randn(2, 1, 8, 8)
    compact = sum(p.numel() for p in model.parameters())
    rule = {"tiny_conv_CL2": "CL", "tiny_mlp_FC2": "FC", "smallnet_digits_CKFC2": "CK+FC"}
    if name in rule:
        model = efx.expand(model, rule[name], r=2)
        with torch.no_grad():  # trained-like weights, not the identity-preserving init
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), (x,), compact


def describe(name: str) -> str:
    return {"tiny_conv": "tiny conv net (2 conv + BN + linear), plain",
            "tiny_conv_CL2": "tiny conv net expanded CL r=2 (contracted, structure-checked)",
            "tiny_mlp_FC2": "tiny MLP 64-32-10 expanded FC r=2 (contracted, structure-checked)",
            "smallnet_digits_CKFC2": "expandfx.models.smallnet_digits expanded CK+FC r=2 "
                                     "(8.3 K parameters: above the 1–3 K range, for scale)",
            }[name]


def child(name: str, threads: int | None, warm: int) -> None:
    """One fresh process: import, the cold export, then ``warm`` warm exports."""
    t0 = time.perf_counter()
    import torch

    import expandfx as efx
    imported = time.perf_counter() - t0
    if threads:
        torch.set_num_threads(threads)
    model, inputs, compact = build(name)
    out = tempfile.mkdtemp()
    runs = []
    for i in range(1 + warm):
        t = time.perf_counter()
        report = efx.export_onnx(model, inputs, os.path.join(out, f"m{i}.onnx"))
        wall = time.perf_counter() - t
        stages = {k: v for k, v in report.timings.items() if k != "total"}
        runs.append({"wall": wall, "timings": dict(report.timings),
                     "unaccounted": wall - sum(stages.values()),
                     "structure_matches": report.structure_matches,
                     "reference_cached": getattr(report, "reference_cached", None),
                     "passed": report.passed})
    import onnx
    import onnxruntime
    import onnxscript

    print(MARK + json.dumps({
        "model": name, "import_s": imported, "threads": torch.get_num_threads(),
        "compact_parameters": compact,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "runs": runs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnxscript": onnxscript.__version__}}))


def measure(name: str, threads: int | None, reps: int, warm: int,
            pythonpath: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(ROOT),
                                                    env.get("PYTHONPATH")) if p)
    procs = []
    for _ in range(reps):
        load = os.getloadavg()
        cmd = [sys.executable, __file__, "--child", name, "--warm", str(warm)]
        if threads:
            cmd += ["--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=tempfile.gettempdir(), check=False)
        line = next((s for s in done.stdout.splitlines() if s.startswith(MARK)), None)
        if done.returncode or line is None:
            raise SystemExit(f"{name}: the child failed ({done.returncode}):\n"
                             f"{done.stderr[-3000:]}")
        data = json.loads(line[len(MARK):])
        data["load_before"], data["load_after"] = list(load), list(os.getloadavg())
        procs.append(data)
    cold = [p["runs"][0] for p in procs]
    warm_runs = [r for p in procs for r in p["runs"][1:]]
    return {"model": name, "what": describe(name), "threads": procs[0]["threads"],
            "compact_parameters": procs[0]["compact_parameters"],
            "model_parameters": procs[0]["model_parameters"],
            "versions": procs[0]["versions"], "processes": procs,
            "import_s": statistics.median(p["import_s"] for p in procs),
            "cold": summary(cold), "warm": summary(warm_runs),
            "load": [min(p["load_before"][0] for p in procs),
                     max(p["load_after"][0] for p in procs)]}


def summary(runs: list[dict]) -> dict:
    stages: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["timings"].items():
            stages.setdefault(k, []).append(v)
    return {"n": len(runs), "wall": statistics.median(r["wall"] for r in runs),
            "unaccounted": statistics.median(r["unaccounted"] for r in runs),
            "stages": {k: statistics.median(v) for k, v in stages.items()},
            "passed": all(r["passed"] for r in runs),
            "structure_matches": sorted({str(r["structure_matches"]) for r in runs}),
            "reference_cached": sorted({str(r["reference_cached"]) for r in runs})}


def stages_text(s: dict) -> str:
    parts = [f"{k} {v:.2f}" for k, v in s["stages"].items() if k != "total"]
    if "total" in s["stages"]:
        parts.append(f"**total {s['stages']['total']:.2f}**")
    parts.append(f"unaccounted {s['unaccounted']:.2f}")
    return ", ".join(parts)


def versions_text(v: dict) -> str:
    return (f"torch {v['torch']}, onnx {v['onnx']}, ort {v['onnxruntime']}, "
            f"onnxscript {v['onnxscript']}, py {v['python']}")


def render(data: dict) -> str:
    rows = sorted(data["runs"], key=lambda r: (r["label"] != "before", r["label"],
                                                -r["threads"], MODELS.index(r["model"])))
    lines = ["# export_onnx speed on 1–3 K-parameter models (issue 30)\n",
             f"`python benchmarks/export_speed.py` on {data['machine']}. *Cold*: the first "
             f"export in a fresh process (median over the processes; `import torch, expandfx` "
             f"beside it, not in it). *Warm*: the later exports in the same processes (median "
             f"of all). Stage medians in seconds from `report.timings`; *unaccounted*: wall "
             f"time around the call that no stage holds. Every export passes its checks, the "
             f"structural one included for the expanded models. Target: warm ≤ "
             f"{TARGET_WARM_S:g} s. `before`: the code before issue 30 (one registry build and, "
             f"for an expanded model, a second export of the reference on every call; its "
             f"stages were export, check and verify only).\n",
             *(["Labels ending in *(busy machine)*: the same command about an hour earlier, "
                "while other jobs held the 2 cores (load 4–5).\n"]
               if any("busy" in r["label"] for r in rows) else []),
             "| label | model | parameters (compact / given) | threads | load (1-min, "
             "min–max) | import s | cold s | warm s | warm ≤ 2 s | versions |",
             "|---|---|---:|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        ok = "yes" if r["warm"]["wall"] <= TARGET_WARM_S else "**no**"
        lines.append(f"| {r['label']} | {r['model']} | {r['compact_parameters']:,} / "
                     f"{r['model_parameters']:,} | {r['threads']} | {r['load'][0]:.2f}–"
                     f"{r['load'][1]:.2f} | {r['import_s']:.2f} | {r['cold']['wall']:.2f} | "
                     f"{r['warm']['wall']:.2f} | {ok} | {versions_text(r['versions'])} |")
    lines += ["", "## Stages (median seconds)", "",
              "| label | model | threads | load | cold: stages | warm: stages | "
              "structure | reference cached (warm) |", "|---|---|---:|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['model']} | {r['threads']} | {r['load'][0]:.2f}–"
                     f"{r['load'][1]:.2f} | {stages_text(r['cold'])} | {stages_text(r['warm'])} "
                     f"| {'/'.join(r['warm']['structure_matches'])} | "
                     f"{'/'.join(r['warm']['reference_cached'])} |")
    lines += ["", "## Models", ""]
    lines += [f"- `{m}`: {describe(m)}" for m in MODELS]
    lines += ["", "Where the time went before (cProfile of a warm export of `tiny_conv_CL2`): "
              "`torch.onnx.export` rebuilds its ONNX registry from torchlib on every call "
              "(0.26 s warm, 0.5 s the first time, ~1 s under cProfile: onnxscript parses "
              "the source of ~500 functions with `inspect.getsource`), twice per call for an "
              "expanded model, whose structural reference was a second full export; the "
              "exporter's own trace (`torch.export`, ~0.1 s) and decompositions (~0.3 s) "
              "remain; the verification's eager forwards cost tens of ms each when torch's "
              "threads outnumber the free cores (the `verify` column at 2 threads on the busy "
              "machine). Now the registry is built once per opset and process, and the "
              "reference's summary is cached per architecture. Cold, the first export still "
              "pays torch.export's and the exporter's first-use costs (imports, the first "
              "registry build): about 2 s beside the import.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, action="append",
                    help="torch threads (repeatable; default: torch's default, then 1)")
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per model")
    ap.add_argument("--warm", type=int, default=5, help="warm exports per process")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--label", default="after")
    ap.add_argument("--pythonpath", help="put this first on the children's path (an older "
                                         "checkout, for a before/after comparison)")
    ap.add_argument("--quick", action="store_true", help="one process, 1 warm export, "
                                                         "nothing written")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, (args.threads or [None])[0], args.warm)
        return 0
    if args.quick:
        args.reps, args.warm, args.threads = 1, 1, args.threads or [0]
    started = time.time()
    results = []
    for threads in args.threads or [0, 1]:
        for name in args.models.split(","):
            r = measure(name, threads or None, args.reps, args.warm, args.pythonpath)
            r["label"] = args.label
            results.append(r)
            print(f"[{args.label}] {name}: threads {r['threads']}, load {r['load'][0]:.2f}–"
                  f"{r['load'][1]:.2f}, {versions_text(r['versions'])}: import "
                  f"{r['import_s']:.2f} s, cold {r['cold']['wall']:.2f} s "
                  f"({stages_text(r['cold'])}), warm {r['warm']['wall']:.2f} s "
                  f"({stages_text(r['warm'])})", flush=True)
    if args.quick:
        return 0
    path = RESULTS / "export_speed.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    keep = {(r["label"], r["threads"], r["model"]) for r in results}
    data["runs"] = [r for r in data["runs"]
                    if (r["label"], r["threads"], r["model"]) not in keep] + results
    data["machine"] = (f"{os.cpu_count()} CPU cores (shared), {platform.platform()}, "
                       f"measured {time.strftime('%Y-%m-%d')}")
    data.setdefault("seconds", {})[args.label] = round(time.time() - started)
    path.write_text(json.dumps(data, indent=1))
    (RESULTS / "export_speed.md").write_text(render(data))
    print(f"wrote {path} and export_speed.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
