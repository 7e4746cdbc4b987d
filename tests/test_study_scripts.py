"""The paper-reproduction scripts run end to end in a reduced mode and write their outputs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expandfx as efx
from expandfx.diagnostics import gradient_confusion
from expandfx.rules import unregister_rule

BENCH = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_study_quick_run(tmp_path):
    pytest.importorskip("mnist1d", reason="mnist1d not installed")
    study = load("accuracy_study")
    records = study.run(quick=True, out=tmp_path)
    variants = study.VARIANTS
    per_data = len(variants) + len(study.AUTHORS_VARIANTS)  # sweep (1 lr when quick) + authors
    assert len(records) == len(study.DATASETS) * per_data
    for r in records:
        assert 0.0 <= r["last"] <= 1.0 and 0.0 <= r["val_last"] <= 1.0
        assert len(r["test"]) == len(r["val"]) == (4 if r["variant"].endswith("+Init") else 2)
        if not r["diverged"]:  # the deployed (contracted) model is the trained model
            assert abs(r["deployed"] - r["last"]) <= 1 / 256 + 1e-9
    table = study.summarize(records)
    assert {k[0] for k in table} == {"sweep", "authors"}
    assert table[("sweep", "MNIST-1D (CNN1D)", "CK")]["lr"] == 0.05
    for run in table[("sweep", "MNIST-1D (CNN1D)", "CK")]["runs"]:  # measured, not a default
        assert math.isfinite(run["confusion"]) and run["confusion"] != 0.0
    text = (tmp_path / "accuracy_study.md").read_text()
    assert "CK+FC+Init" in text and "compander+CK" in text and "thread" in text
    assert (tmp_path / "accuracy_study.png").stat().st_size > 0
    assert json.loads((tmp_path / "accuracy_study.json").read_text())["runs"]


def test_branch_study_quick_run_resumes(tmp_path):
    pytest.importorskip("mnist1d", reason="mnist1d not installed")
    study = load("branch_study")  # registers its rule "Single": unregistered at the end
    try:
        _branch_study_resumes(study, tmp_path)
    finally:
        unregister_rule("Single")


def _branch_study_resumes(study, tmp_path):
    study.main(["--quick", "--out", str(tmp_path), "--variants", "compact,DBB/bn,ACNet"])
    records = [json.loads(line) for line in
               (tmp_path / "branch_study.partial.jsonl").read_text().splitlines()]
    assert sorted((r["data"][:5], r["variant"]) for r in records) == [  # ACNet: 2-D only
        ("MNIST", "DBB/bn"), ("MNIST", "compact"), ("digit", "ACNet"), ("digit", "DBB/bn"),
        ("digit", "compact")]
    for r in records:
        if not r["diverged"]:  # the contracted compact model is the trained one
            assert abs(r["deployed"] - r["last"]) <= 1 / 256 + 1e-9
    text = (tmp_path / "branch_study.md").read_text()
    assert "Δ vs compact" in text and "DBB/bn" in text and "5 of 5 planned" in text
    study.main(["--quick", "--out", str(tmp_path), "--variants", "compact,DBB/bn,ACNet"])
    assert len((tmp_path / "branch_study.partial.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "branch_study.png").stat().st_size > 0


def test_gradient_confusion_against_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]
    grads = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()]))
    cos = [F.cosine_similarity(grads[i], grads[j], dim=0).item()
           for i in range(3) for j in range(i + 1, 3)]
    assert math.isclose(gradient_confusion(model, F.cross_entropy, batches), min(cos),
                        abs_tol=1e-6)


def test_gradient_confusion_sees_expanded_parameters():
    torch.manual_seed(0)
    big = efx.expand(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "FC", r=2)
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(4)]
    value = gradient_confusion(big, F.cross_entropy, batches)
    factors = [p for n, p in big.named_parameters() if ".layers." in n]
    assert factors, "the expanded model's factors are parameters"
    grads = []
    for x, y in batches:  # by hand, over every parameter the expanded model trains
        big.zero_grad()
        F.cross_entropy(big(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in big.parameters()]))
    cos = [F.cosine_similarity(grads[i], grads[j], dim=0).item()
           for i in range(4) for j in range(i + 1, 4)]
    assert math.isclose(value, min(cos), abs_tol=1e-6)


def write_tiny_cifar(root: Path, name: str, n_train: int = 40, n_test: int = 16) -> None:
    """A few random images in CIFAR's on-disk format (python pickles of uint8 rows)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: rng.integers(0, classes, n).tolist()}

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)}
        files |= {"test_batch": batch(n_test),
                  "batches.meta": {"label_names": [f"c{i}" for i in range(10)]}}
    else:
        folder = root / "cifar-100-python"
        files = {"train": batch(n_train), "test": batch(n_test),
                 "meta": {"fine_label_names": [f"c{i}" for i in range(100)]}}
    folder.mkdir(parents=True)
    for fname, obj in files.items():
        (folder / fname).write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize(("dataset", "model", "variant"), [
    ("cifar10", "smallnet_7x7", "CK+FC+Init"), ("cifar100", "mobilenet_v1", "CL+FC")])
def test_cifar_script_end_to_end_on_tiny_on_disk_data(tmp_path, dataset, model, variant):
    pytest.importorskip("torchvision", reason="torchvision not installed")
    write_tiny_cifar(tmp_path / "data", dataset)
    cifar = load("cifar")
    code = cifar.main(["--dataset", dataset, "--model", model, "--variant", variant,
                       "--epochs", "1", "--batch-size", "16", "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "run"), "--no-download",
                       "--skip-integrity-check", "--workers", "0", "--device", "cpu"])
    assert code == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["onnx_passed"]
    assert len(result["history"]) == (2 if variant.endswith("+Init") else 1)  # +Init: 2 phases
    assert 0.0 <= result["deployed_test_acc"] <= 1.0
    assert abs(result["deployed_test_acc"] - result["final_test_acc"]) <= 1 / 16 + 1e-9
    assert result["params_test"] < result["params_train"]
    assert (tmp_path / "run" / "model.onnx").stat().st_size > 0


def test_cifar_script_refuses_data_that_is_not_cifar_without_the_flag(tmp_path):
    pytest.importorskip("torchvision", reason="torchvision not installed")
    write_tiny_cifar(tmp_path / "data", "cifar10")
    with pytest.raises(RuntimeError, match="corrupted"):
        load("cifar").main(["--data", str(tmp_path / "data"), "--no-download", "--epochs", "1",
                            "--workers", "0"])


def test_training_inside_reproducible_is_bitwise_repeatable_and_state_is_restored():
    pytest.importorskip("sklearn", reason="scikit-learn not installed")
    import os

    from expandfx.demo import digits, fit, reproducible
    from expandfx.models import smallnet_digits

    xtr, ytr, xte, yte = digits()
    data = (xtr[:256], ytr[:256], xte[:64], yte[:64])
    threads = torch.get_num_threads()
    states = []
    for _ in range(2):
        with reproducible(threads=1) as setup:
            assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
            torch.manual_seed(0)
            model = efx.expand(smallnet_digits(), "CK+FC", r=4)  # auto mode by MAC model
            out = fit(model, data, 2, seed=0, desc="t", lr=0.1)
            states.append(model.state_dict())
    assert "1 thread" in setup and not out["diverged"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert "EXPANDFX_AUTO_MEASURE" not in os.environ


def test_quantization_study_quick_run_resumes(tmp_path):
    study = load("quantization_study")
    assert study.main(["--quick", "--out", str(tmp_path), "--rules", "compact", "RepVGG-BN"]) == 0
    lines = (tmp_path / "quantization.partial.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["rule"] for r in records] == ["compact", "RepVGG-BN"]
    for r in records:  # per-branch BNs folded away: the compact net's 4 layers, int8 measured
        assert len(r["weights"]) == 4 and all(w["max_over_std"] > 1 for w in r["weights"])
        for q in r["int8"].values():
            assert q["quantized_layers"] == [4, 4] and q["sqnr_db"] > 15
            assert q["size_bytes"]["int8"] < q["size_bytes"]["fp32"]
    assert set(records[0]["int8"]) == {"minmax/per-channel", "minmax/per-tensor"}
    assert "| RepVGG-BN |" in (tmp_path / "quantization_study.md").read_text()
    assert study.main(["--quick", "--out", str(tmp_path), "--rules", "compact"]) == 0  # resumed
    assert (tmp_path / "quantization.partial.jsonl").read_text().splitlines() == lines


def test_does_it_help_quick_pipeline_schema_and_resume(tmp_path):
    pytest.importorskip("mnist1d", reason="mnist1d not installed")
    pytest.importorskip("scipy", reason="scipy not installed")
    study = load("does_it_help")
    assert study.main(["--quick", "--out", str(tmp_path), "--jobs", "1"]) == 0
    log = tmp_path / "does_it_help.runs.jsonl"
    lines = log.read_text().splitlines()
    doc = json.loads((tmp_path / "does_it_help.json").read_text())
    assert doc["meta"]["quick"] and doc["meta"]["complete"]
    assert doc["meta"]["unit"] == "percentage points"
    assert len(doc["runs"]) == len(lines) > 0
    for r in doc["runs"]:  # the per-run record of the protocol, accuracy in percent
        for k in ("task", "regime", "variant", "lr", "wd", "seed", "epochs", "train_acc",
                  "val_acc", "test_acc", "train_loss", "val_curve", "seconds", "load_1min"):
            assert k in r, k
        assert all(0.0 <= r[k] <= 100.0 for k in ("train_acc", "val_acc", "test_acc"))
        assert len(r["train_loss"]) == len(r["val_curve"]) == r["epochs"] * r["phases"]
        if not r["diverged"]:  # the contracted model scores what the trained one scored
            assert r["contract_ok"] is True
            assert r["confusion_folded"]["p5"] <= r["confusion_folded"]["mean"]
    assert {r["regime"] for r in doc["runs"]} == {"a", "b"}
    assert any(r["protocol"] == "authors" for r in doc["runs"])
    assert any(r["task"] == "b1-wide" and r["wd"] != 5e-4 for r in doc["runs"])  # wd tuned
    assert {r["epochs"] for r in doc["runs"]} == {2, 4}  # and the doubling check
    assert doc["comparisons"]
    for c in doc["comparisons"]:
        for k in ("task", "variant", "baseline", "n", "delta", "ci95", "p_holm", "p_wilcoxon"):
            assert k in c, k
        assert len(c["ci95"]) == 2 and c["ci95"][0] <= c["delta"] <= c["ci95"][1]
    assert {(c["variant"], c["baseline"], c["family"]) for c in doc["comparisons"]} == {
        ("CK", "compact", "primary"), ("CK", "compact", "authors"),
        ("compander", "compact", "primary")}
    assert {m["family"] for m in doc["mechanisms"]} == {"confusion", "weights"}
    assert doc["convergence"] and doc["regime_checks"]
    text = (tmp_path / "does_it_help.md").read_text()
    assert "QUICK RUN" in text and "p_holm" in text and "**" not in text  # nothing bold
    assert (tmp_path / "does_it_help.png").stat().st_size > 0
    assert study.main(["--quick", "--out", str(tmp_path), "--jobs", "1"]) == 0  # resumed:
    assert log.read_text().splitlines() == lines  # no new run


def test_does_it_help_statistics_against_hand_computation():
    pytest.importorskip("scipy", reason="scipy not installed")
    study = load("does_it_help")
    # d = 1, 2, 3, 4: mean 2.5, sd √(5/3), t_{0.975,3} = 3.182446 (t table), so the CI is
    # 2.5 ± 3.182446 · 0.645497 = [0.44574, 4.55426]; t = 3.87298, two-sided p = 0.030466;
    # Wilcoxon, 4 positive differences: exact two-sided p = 2/2^4 = 0.125
    p = study.paired([1.0, 3.0, 3.5, 9.0], [0.0, 1.0, 0.5, 5.0])
    assert p["n"] == 4 and math.isclose(p["delta"], 2.5)
    assert math.isclose(p["sd"], math.sqrt(5 / 3), rel_tol=1e-12)
    assert math.isclose(p["ci95"][0], 0.445740, abs_tol=1e-5)
    assert math.isclose(p["ci95"][1], 4.554260, abs_tol=1e-5)
    assert math.isclose(p["p_t"], 0.030466, abs_tol=1e-5)
    assert math.isclose(p["p_wilcoxon"], 0.125, abs_tol=1e-12)
    # Holm: sorted 0.01·4 = 0.04, 0.03·3 = 0.09, 0.04·2 = 0.08 → 0.09 (monotone), 0.5·1
    assert study.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert study.holm([0.2, 0.6]) == pytest.approx([0.4, 0.6])
    # the smallest effect 10 paired seeds detect (α 0.05, power 0.8): (2.262157 + 0.883404)/√10
    assert math.isclose(study.mde(1.0, 10), 0.994714, abs_tol=1e-5)
    assert math.isclose(study.mde(2.0, 10), 2 * 0.994714, abs_tol=1e-5)
    # the ×√2 grid and the decay grid
    assert [study.lr_of(k) for k in (-2, 0, 1)] == [0.05, 0.1, 0.141421]
    assert [study.wd_of(j) for j in (None, -1, 0, 2)] == [0.0, 1.25e-4, 5e-4, 8e-3]
