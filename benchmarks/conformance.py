"""Conformance table over the model zoo (random init): torchvision / timm classifiers
(input 2x3x64x64), Hugging Face transformers from tiny configs, torchvision detection
(backbone and head outputs compared) and a Conv3d video model.

For every model and applicable rule (r = 2): layers expanded, layers skipped with their
reasons, parameters at train and test time, expand and contract wall time, and the largest
relative error, per layer and end to end, after randomizing the expanded factors.

    python benchmarks/conformance.py       # writes benchmarks/results/conformance.md (~5 min)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import conftest  # noqa: E402,F401  (torchvision import workaround of this machine)
from conformance import (  # noqa: E402
    FAMILIES,
    ZOO,
    ZOO_INPUT,
    applicable_rules,
    build_zoo_model,
    roundtrip_record,
)

RESULTS = Path(__file__).parent / "results"


def short_reason(reason: str) -> str:
    for key in ("does not apply", "no odd size", "overrides", "inside", "tied",
                "never called", "used directly", "even size", "output layer",
                "parametrizations"):
        if key in reason:
            return key
    return reason[:40]


def main() -> int:
    torch.set_num_threads(2)
    rows = []
    cases = [(name, lambda n=name: build_zoo_model(n), lambda: torch.randn(ZOO_INPUT), None,
              None) for name in ZOO]
    cases += [(name, f.build, f.inputs, f.probe, f.rules) for name, f in FAMILIES.items()]
    for name, build, inputs, probe, only in cases:
        torch.manual_seed(0)
        model = build().eval()
        x = inputs()
        for rule in applicable_rules(model):
            if only is not None and rule not in only:
                continue
            rec = roundtrip_record(model, rule, 2, x, probe=probe)
            reasons = Counter(short_reason(r) for r in rec["skipped"].values())
            rows.append({"model": name, "rule": rule, "expanded": rec["expanded"],
                         "skipped": dict(reasons), "params_train": rec["params_train"],
                         "params_test": rec["params_test"], "expand_s": rec["expand_s"],
                         "contract_s": rec["contract_s"], "layer_error": rec["layer_error"],
                         "output_error": rec["output_error"],
                         "layers_checked": rec["layers_checked"],
                         "exact": rec["layer_error"] <= 1e-5 and rec["output_error"] <= 1e-5
                         and rec["keys_equal"] and rec["class_equal"]
                         and rec["layers_checked"] == rec["expanded"]})
            print(f"{name:38} {rule}  {rec['expanded']:4d} expanded  "
                  f"err {rec['layer_error']:.1e}/{rec['output_error']:.1e}", flush=True)
    lines = ["| model | rule | expanded | skipped (reason × count) | params train | params test "
             "| expand s | contract s | max layer err | output err | exact |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        skipped = ", ".join(f"{k} ×{v}" for k, v in r["skipped"].items()) or "—"
        lines.append(f"| {r['model']} | {r['rule']} | {r['expanded']} | {skipped} | "
                     f"{r['params_train'] / 1e6:.2f}M | {r['params_test'] / 1e6:.2f}M | "
                     f"{r['expand_s']:.2f} | {r['contract_s']:.2f} | {r['layer_error']:.1e} | "
                     f"{r['output_error']:.1e} | {'yes' if r['exact'] else 'NO'} |")
    RESULTS.mkdir(exist_ok=True)
    import transformers

    header = (f"# Conformance: torchvision, timm and Hugging Face models\n\nMeasured "
              f"{time.strftime('%Y-%m-%d')} (load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores), torch {torch.__version__}, transformers "
              f"{transformers.__version__}, r = 2, eval mode, factors randomized after "
              f"expansion (`python benchmarks/conformance.py`). Classifiers: input "
              f"{list(ZOO_INPUT)}. `hf/*`: transformers models built from tiny configs "
              f"(2 layers, width 32; token ids 2×8, images 2×3×32×32, Whisper features "
              f"2×16×32, Wav2Vec2 audio 2×400), planned and expanded with example_inputs "
              f"(FX cannot trace them; call sites recorded on one forward). `tv/*` "
              f"detection (input 2×3×64×64): backbone features and head outputs compared "
              f"(post-NMS detections reorder on ties; FasterRCNN also box head and predictor "
              f"on pooled features); FasterRCNN FC is not run here (its 12544→1024 fc6 "
              f"expands to ~110 M parameters). `tv/mc3_18`: input 1×3×4×32×32. Errors are max "
              f"|diff| / max |out|, per expanded layer on its own input and end to end; exact "
              f"means both ≤ 1e-5, every expanded layer was checked, and the contracted model "
              f"has the original class and state_dict keys. Skip reasons: 'does not apply' = "
              f"the rule is for the other layer type; 'no odd size' = CK on k ≤ 3; "
              f"'overrides' = a subclass with its own forward; 'output layer' = FC leaves the "
              f"model's output layer alone; 'parametrizations' = a weight-normed layer.\n\n")
    (RESULTS / "conformance.md").write_text(header + "\n".join(lines) + "\n")
    (RESULTS / "conformance.json").write_text(json.dumps(rows, indent=1))
    print(f"{sum(r['exact'] for r in rows)}/{len(rows)} model×rule cases exact")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
