"""``export_onnx``: the deployable compact model as one ONNX file, checked and verified.

Recipe: contract and bake a copy if the model holds expanded blocks or companded
weights (the caller's model is never changed); export with the current (dynamo)
exporter into a single self-contained file; ``onnx.checker`` with the full check;
run onnxruntime (CPU) with graph optimizations disabled *and* fully enabled on
several inputs (another batch size too, when the batch is dynamic) against the
torch model in eval mode; compare the graph with the original compact
architecture exported the same way. Any mismatch raises :class:`VerificationError`
carrying the report, whose ``failures`` say what failed in machine-readable form
(``code``, ``where``, ``numbers``). With ``fold=True`` the eval-mode copy is first folded by
:func:`expandfx.fold` (BatchNorms absorbed, RepVGG-style branches merged) and the
ONNX file holds the folded graph.

Non-finite values are errors (:class:`~expandfx.errors.NonFiniteError`, naming the tensor):
in the parameters and buffers of the deployable copy, in ``example_inputs``, and in the
outputs — unless ``allow_nonfinite_outputs=True``, where torch's outputs may hold NaN/inf
(masked log-probabilities) and onnxruntime's must hold exactly the same at the same
positions; the errors are then measured over the finite positions.

Files are written under a temporary name beside ``path`` and renamed onto it only when
verified: a file that fails is kept as ``<stem>.failed.onnx`` (``<stem>.int8.failed.onnx``)
and named in the error, and no file from an earlier run is left under the final name.

A forward that makes a Python decision on a tensor's value (``if x.sum() > 0:``) cannot be
one graph for all inputs: the exporter's error becomes one :class:`~expandfx.errors.ConfigError`
naming the module, the file and line, and the fix (``torch.cond``, or the condition computed
outside the model). ``exporter="legacy"`` (the TorchScript exporter) is the explicit opt-in
that exports such a model anyway, frozen to the branch ``example_inputs`` take, with an
:class:`~expandfx.errors.ExpandFXWarning` saying so; verification then also runs inputs
built to take another branch (and fails where the frozen graph computes them wrongly), or
the warning says that it covers only the traced branch.

``report.timings`` holds every stage (prepare, fold, export, check, reference, verify, save,
int8) and their ``total``, the wall time of the call. The structural reference is exported
once per architecture and process: its operator histogram and parameter count are cached
under the reference's structure (module classes and hyperparameters, tensor shapes and
dtypes and which tensors are equal or constant — the exporter merges equal initializers —,
input shapes and dtypes and the export settings), never its weights; and the exporter's ONNX
registry (about 1 s to build from torchlib) is built once per opset. What the exporter and
the int8 quantizer print, log (torch's, onnx's and onnxruntime's loggers and the root
logger) and warn is kept in ``report.export_log``, never shown on the console.

Example::

    >>> import torch, tempfile, os, expandfx as efx
    >>> from expandfx.models import smallnet_3x3
    >>> big = efx.expand(smallnet_3x3(), "CL", r=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "small.onnx")
    >>> report = efx.export_onnx(big, (torch.randn(2, 3, 32, 32),), path)
    >>> report.passed, report.structure_matches
    (True, True)
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import hashlib
import inspect
import io
import json
import linecache
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .compander import bake
from .errors import ConfigError, ExpandFXError, ExpandFXWarning, failure
from .finite import check_inputs, check_model, check_outputs, count_nonfinite, finite_rel_error
from .layer_types import original_template
from .passes.contract import deployable
from .passes.fold import fold
from .quantize import (
    Int8Config,
    Int8Report,
    as_config,
    check_calibration,
    failed_path,
    int8_path,
    quantize_onnx,
)
from .surgery import blocks, replace
from .tolerances import FOLD_TOLERANCES, model_dtype, within

__all__ = ["ExportReport", "FOLD_TOLERANCES", "TOLERANCES", "VerificationError", "check_report",
           "compact_architecture", "export_onnx", "graph_summary", "verify_onnx"]


log = logging.getLogger("expandfx")

# (rtol, atol) of onnxruntime vs torch: docs/design.md §4 for float32, torch.testing's rtol for
# the other dtypes; atol is scaled by the output's max |value| (a fixed atol fails deep nets
# whose outputs are large: timm mobilenetv4_conv_small, 6.1e-5 at magnitude 60), so for the
# half types it is their resolution at that scale (about 2^-10 for float16, 2^-7 for bfloat16).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-7),
              torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}
# contract(model)(x) vs model(x): docs/design.md §4 for float32, scaled for the other dtypes
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with headroom


class VerificationError(ExpandFXError, AssertionError):
    """The exported model disagrees with torch (or with the compact architecture), or the
    int8 model with fp32: ``code``, ``where`` and ``numbers`` are those of the first failed
    check (``report.failures``, then ``report.int8.failures``), ``failures`` all of them."""

    code = "not_verified"

    def __init__(self, message: str, report: ExportReport) -> None:
        found = report.failures + (report.int8.failures if report.int8 is not None else [])
        first = found[0] if found else {}
        super().__init__(f"{message}\n{report}", code=first.get("code"),
                         where=first.get("where"), numbers=first.get("numbers"))
        self.report = report
        self.failures = found


@dataclass
class ExportReport:
    """What was exported, and how closely onnxruntime agrees with torch."""

    path: str
    opset: int | None = None
    transformed: list[str] = field(default_factory=list)
    inputs: list[tuple[str, list[Any]]] = field(default_factory=list)
    outputs: list[tuple[str, list[Any]]] = field(default_factory=list)
    op_histogram: dict[str, int] = field(default_factory=dict)
    parameter_count: int = 0
    reference_op_histogram: dict[str, int] | None = None
    reference_parameter_count: int | None = None
    rtol: float = 0.0
    atol: float = 0.0
    errors: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    fold_error: float | None = None
    fold_tolerance: float = 1e-5
    timings: dict[str, float] = field(default_factory=dict)
    verified: bool = False
    int8: Int8Report | None = None  # export_onnx(quantize="int8"): expandfx/quantize.py
    export_log: str = ""  # what the exporter and quantizer printed, logged and warned (no ANSI)
    exporter: str = "dynamo"  # "legacy": the TorchScript exporter, frozen to the traced branch
    reference_cached: bool = False  # the structural reference's summary came from the cache
    other_branch_inputs: int = 0  # exporter="legacy": check inputs that take another branch

    @property
    def structure_matches(self) -> bool | None:
        if self.reference_op_histogram is None:
            return None
        return (self.op_histogram == self.reference_op_histogram
                and self.parameter_count == self.reference_parameter_count)

    @property
    def numerics_pass(self) -> bool:
        return all(e["passed"] for level in self.errors.values() for e in level.values())

    @property
    def fold_pass(self) -> bool:
        return self.fold_error is None or within(self.fold_error, self.fold_tolerance)

    @property
    def fp32_passed(self) -> bool:
        """The fp32 file's verdict alone (``passed`` also needs the int8 one)."""
        return (self.verified and self.numerics_pass and self.fold_pass
                and self.structure_matches is not False)

    @property
    def passed(self) -> bool:
        return self.fp32_passed and (self.int8 is None or self.int8.passed)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The fp32 checks that failed, ``{"code", "where", "numbers", "message"}`` each
        (codes ``fold_error``, ``numerics``, ``non_finite``, ``structure``); the int8 ones
        are ``int8.failures``."""
        out = comparison_failures(self, "onnxruntime")
        if self.structure_matches is False:
            ref = self.reference_op_histogram or {}
            ops = sorted(set(ref) | set(self.op_histogram))
            diff = {k: [self.op_histogram.get(k, 0), ref.get(k, 0)] for k in ops
                    if self.op_histogram.get(k, 0) != ref.get(k, 0)}
            out.append(failure(
                "structure", f"the exported graph differs from the compact architecture "
                f"({self.parameter_count:,} vs {self.reference_parameter_count:,} parameters"
                + (f"; ops [exported, compact]: {diff}" if diff else "") + ")",
                where="graph", numbers={"parameter_count": self.parameter_count,
                                        "reference_parameter_count":
                                            self.reference_parameter_count, "ops": diff}))
        return out

    def to_json(self) -> str:
        data = asdict(self)
        data.update(passed=self.passed, fp32_passed=self.fp32_passed, failures=self.failures,
                    structure_matches=self.structure_matches,
                    int8=self.int8.to_dict() if self.int8 is not None else None)
        return json.dumps(data, indent=1)

    def __str__(self) -> str:
        lines = [f"ONNX export: {self.path} (opset {self.opset}"
                 + (", legacy TorchScript exporter: frozen to the traced branch"
                    if self.exporter == "legacy" else "") + ")"]
        lines += [f"  {t}" for t in self.transformed]
        lines.append("  inputs:  " + ", ".join(f"{n} {s}" for n, s in self.inputs))
        lines.append("  outputs: " + ", ".join(f"{n} {s}" for n, s in self.outputs))
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(self.op_histogram.items()))
        lines.append(f"  ops: {ops}")
        lines.append(f"  initializer parameters: {self.parameter_count:,}")
        if self.reference_op_histogram is not None:
            verdict = "matches" if self.structure_matches else "DIFFERS FROM"
            lines.append(f"  structure {verdict} the compact architecture "
                         f"({self.reference_parameter_count:,} parameters"
                         + ("; reference from the cache" if self.reference_cached else "")
                         + ")")
        if self.fold_error is not None:
            lines.append(f"  deployable copy vs given model: max rel {self.fold_error:.2e} "
                         f"({'ok' if self.fold_pass else 'FAIL'} at {self.fold_tolerance:g})")
        for level, outputs in self.errors.items():
            for name, e in outputs.items():
                bad = e.get("nonfinite")
                lines.append(f"  onnxruntime [{level:8}] {name}: " + (
                    f"non-finite where torch is finite ({bad['nan']} NaN, {bad['inf']} inf)"
                    if bad else f"max abs {e['max_abs']:.2e}, max rel {e['max_rel']:.2e}")
                    + f" ({'ok' if e['passed'] else 'FAIL'} at rtol={self.rtol:g}, "
                    f"atol={self.atol:g}·max|out|)")
        if self.exporter == "legacy":
            lines.append(f"  check inputs taking another branch than the traced one: "
                         f"{self.other_branch_inputs}"
                         + ("" if self.other_branch_inputs else
                            " (verification covers only the traced branch)"))
        lines.append("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        verdict = "PASS" if self.fp32_passed else "FAIL" if self.verified else \
            "not verified (verify=False)"
        lines.append(f"  fp32 verdict: {verdict}"
                     + "".join(f"\n  FAIL: {f['message']}" for f in self.failures))
        if self.int8 is not None:
            lines.append(str(self.int8))
        return "\n".join(lines)


EXPORTERS = ("dynamo", "legacy")


def comparison_failures(report: Any, runtime: str) -> list[dict[str, Any]]:
    """The fp32 comparison failures of a deploy report (ONNX or ExecuTorch), one home:
    ``fold_error`` (the deployable copy vs the given model), then per trial and output
    ``runtime_error``, ``non_finite`` or ``numerics`` (``report.errors[trial][output]``)."""
    out = []
    if not report.fold_pass:
        out.append(failure(
            "fold_error", f"the deployable copy differs from the given model: max rel "
            f"{report.fold_error:.2e} > {report.fold_tolerance:g}", where="deployable copy",
            numbers={"error": report.fold_error, "tolerance": report.fold_tolerance}))
    for trial, outputs in report.errors.items():
        for name, e in outputs.items():
            if e["passed"]:
                continue
            numbers = {k: e[k] for k in ("max_abs", "max_rel")}
            if "runtime_error" in e:
                out.append(failure(
                    "runtime_error", f"{runtime} [{trial}]: the runtime refused the run "
                    f"({e['runtime_error']})", where=trial, numbers={"batch": e.get("batch")}))
            elif "nonfinite" in e:
                out.append(failure(
                    "non_finite", f"{runtime} [{trial}] {name}: non-finite values where "
                    f"torch's are not ({e['nonfinite']['nan']} NaN, "
                    f"{e['nonfinite']['inf']} inf)", where=f"{name} [{trial}]",
                    numbers={**numbers, **e["nonfinite"]}))
            else:
                out.append(failure(
                    "numerics", f"{runtime} [{trial}] {name}: max abs {e['max_abs']:.2e}, "
                    f"max rel {e['max_rel']:.2e} beyond rtol={report.rtol:g}, "
                    f"atol={report.atol:g}·max|out|", where=f"{name} [{trial}]",
                    numbers={**numbers, "rtol": report.rtol, "atol": report.atol}))
    return out


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_batch: bool = True, verify: bool = True, rtol: float | None = None,
                atol: float | None = None, opset: int | None = None,
                reference: nn.Module | None = None, n_random: int = 3,
                fold: bool | None = None, quantize: str | Int8Config | None = None,
                calibration: Iterable[Any] | None = None,
                labels: Iterable[Any] | None = None,
                allow_nonfinite_outputs: bool = False,
                exporter: str = "dynamo") -> ExportReport | None:
    """Export the deployable form of ``model`` to ``path`` and verify it in onnxruntime.

    ``reference`` is the original compact architecture for the structural check; by
    default it is rebuilt from the expanded blocks' original layers. ``fold=True`` exports
    ``expandfx.fold`` of the eval-mode deployable copy (every linear subgraph one layer);
    the folded graph is no longer the compact architecture, so the default structural check
    is skipped (``structure_matches`` is ``None``); a ``reference`` given explicitly is
    folded the same way and compared. onnxruntime and the "deployable copy vs given model"
    check verify the folded graph as usual. Returns an :class:`ExportReport`; raises
    :class:`VerificationError` on any mismatch, after keeping the file as
    ``<stem>.failed.onnx`` (``path`` itself then does not exist). NaN/inf in the
    parameters, buffers, inputs or outputs raise :class:`~expandfx.errors.NonFiniteError`;
    ``allow_nonfinite_outputs=True`` accepts non-finite outputs where onnxruntime's are the
    same (masked log-probabilities) and measures the finite positions.

    ``quantize="int8"`` (or an :class:`~expandfx.quantize.Int8Config`) also writes a static
    QDQ int8 model (``<stem>.int8.onnx``) calibrated on ``calibration`` (input batches, the
    last ones held out to verify; ``labels``: one label tensor per batch, for accuracies)
    and reports its deviation from the fp32 file, sizes and latencies in ``report.int8``
    (expandfx/quantize.py); ``fold`` then defaults to True. The model must be float32, and
    the batches are checked (shapes, non-finite values, spread) before anything is written.

    ``exporter``: ``"dynamo"`` (default: ``torch.onnx.export(dynamo=True)``) or
    ``"legacy"`` (the TorchScript exporter, ``dynamo=False``), only for a forward with a
    data-dependent ``if`` that the default exporter refuses: its graph is frozen to the
    branch ``example_inputs`` take, which an :class:`~expandfx.errors.ExpandFXWarning`
    says; inputs built to take another branch (negated, zero, all-positive and all-negative
    copies of ``example_inputs``, kept where the traced graph differs) join the
    verification, which then fails where the frozen graph computes them wrongly; where none
    is found the warning says that verification covers only the traced branch.

    A model sharded with FSDP2: call it on every rank. The full parameters are gathered
    collectively into an unsharded copy; rank 0 exports, verifies and returns the report,
    the other ranks wait for it and return ``None``.
    """
    start = time.perf_counter()
    from .sharding import gathered_copy, is_sharded

    if exporter not in EXPORTERS:
        raise ConfigError(f"export_onnx: exporter={exporter!r} is not one of "
                          f"{', '.join(map(repr, EXPORTERS))} ('legacy': the TorchScript "
                          f"exporter, frozen to the branch example_inputs take).",
                          code="unknown_exporter", where="exporter")
    if is_sharded(model):
        plain = gathered_copy(model, "export_onnx")
        rank0 = torch.distributed.get_rank() == 0
        gather = time.perf_counter() - start
        try:
            report = export_onnx(
                plain, example_inputs, path, dynamic_batch=dynamic_batch, verify=verify,
                rtol=rtol, atol=atol, opset=opset, reference=reference, n_random=n_random,
                fold=fold, quantize=quantize, calibration=calibration, labels=labels,
                allow_nonfinite_outputs=allow_nonfinite_outputs,
                exporter=exporter) if rank0 else None
            if report is not None:  # the gathering is a stage of this call too
                total = report.timings.pop("total", 0.0) + gather
                report.timings = {"gather": gather, **report.timings, "total": total}
            return report
        finally:
            torch.distributed.barrier()  # the file exists on every rank's return
    config = as_config(quantize, calibration)
    fold = config is not None if fold is None else fold
    allow = allow_nonfinite_outputs
    inputs, deploy, report = _prepare(model, example_inputs, path, rtol, atol)
    report.exporter = exporter
    clock = _Clock(report.timings, start)
    if config is not None:  # refused before anything is written
        if model_dtype(deploy) != torch.float32:
            raise ConfigError(f"export_onnx: int8 calibration needs a float32 model; "
                              f"{type(model).__name__} is "
                              f"{str(model_dtype(deploy)).removeprefix('torch.')}: pass "
                              f"model.float() (and float32 inputs and calibration batches).",
                              code="int8_needs_float32")
        calibration = check_calibration(calibration, inputs, config,
                                        fixed_batch=not dynamic_batch)
    _check_runs(deploy, inputs, model, allow)
    clock.mark("prepare")
    if fold:
        deploy = _folded(deploy, inputs, report, allow)
        clock.mark("fold")
    final = report.path
    final_int8 = int8_path(final, config) if config is not None else None
    import onnx

    with _staging(final, final_int8) as staged:
        report.path = staged
        _export(deploy, inputs, staged, dynamic_batch, opset, report, exporter=exporter)
        clock.mark("export")
        try:
            onnx.checker.check_model(staged, full_check=True)
        except Exception as exc:  # onnx raises ValidationError / InferenceError
            hint = (" ONNX has no bfloat16 Conv/Gemm: export a float32 copy (model.float())."
                    if model_dtype(deploy) == torch.bfloat16 else "")
            raise ConfigError(f"export_onnx: onnx.checker rejected the exported "
                              f"{type(model).__name__}: {str(exc).splitlines()[0]}.{hint}"
                              ) from exc
        _describe(report, onnx.load(staged))
        clock.mark("check")

        if reference is None and report.transformed and blocks(model) and not fold:
            reference = compact_architecture(model)
        if reference is not None:
            report.reference_op_histogram, report.reference_parameter_count = \
                _reference_summary(reference, inputs, dynamic_batch, opset, fold, allow,
                                   exporter, report)
            clock.mark("reference")
        extra: list[tuple[torch.Tensor, ...]] = []
        if exporter == "legacy":  # outside the captured log: the warning is the user's to see
            extra = _other_branches(deploy, inputs, allow, report) if verify else []
            report.other_branch_inputs = len(extra)
            _warn_legacy(report, verify)
        what = None
        if verify:
            _verify(deploy, inputs, report, dynamic_batch, n_random, _original(model, report),
                    allow, extra)
            report.verified = True
            what = _problem(report)
            clock.mark("verify")
        report.path = _settle(staged, final, passed=what is None)
    clock.mark("save")
    if what is not None:
        _remove(final_int8)  # an earlier run's int8 file belongs to an earlier fp32 file
        raise VerificationError(f"export_onnx: {what}. {_kept(report.path, final)}", report)
    if config is not None:
        captured: list[str] = []
        try:
            with _staging(final_int8) as staged, _captured(captured):
                report.int8 = quantize_onnx(report.path, inputs, calibration, labels, config,
                                            out=staged)
                report.int8.path = _settle(staged, final_int8, passed=report.int8.passed)
        finally:
            report.export_log += "".join(captured)
            clock.mark("int8")
        if not report.int8.passed:
            raise VerificationError(
                f"export_onnx: the int8 model fails its check ("
                f"{report.int8.failures[0]['message']}). {_kept(report.int8.path, final_int8)}"
                f" The fp32 file {final} passed and is in place.", report)
    log.info("%s", report)
    return report


def verify_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_batch: bool = True, rtol: float | None = None,
                atol: float | None = None, n_random: int = 3,
                allow_nonfinite_outputs: bool = False) -> ExportReport:
    """Verify an existing ONNX file against the deployable form of ``model`` (NaN/inf as
    :func:`export_onnx` treats them)."""
    import onnx

    start = time.perf_counter()
    inputs, deploy, report = _prepare(model, example_inputs, path, rtol, atol)
    clock = _Clock(report.timings, start)
    clock.mark("prepare")
    _describe(report, onnx.load(report.path))
    clock.mark("check")
    _verify(deploy, inputs, report, dynamic_batch, n_random, _original(model, report),
            allow_nonfinite_outputs)
    report.verified = True
    clock.mark("verify")
    what = _problem(report)
    if what is not None:
        raise VerificationError(f"export_onnx: {what}.", report)
    return report


class _Clock:
    """Stage timings that add up: each ``mark(stage)`` adds the time since the previous
    mark (or ``start``) to ``timings[stage]`` and sets ``timings["total"]``, kept last, to
    the time since ``start``: every moment of the call is counted in exactly one stage."""

    def __init__(self, timings: dict[str, float], start: float) -> None:
        self.timings, self.start, self.last = timings, start, start

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.timings.pop("total", None)
        self.timings["total"] = now - self.start
        self.last = now


@contextlib.contextmanager
def _staging(final: str, *stale: str | None):
    """A temporary path for ``final`` in a hidden directory beside it (same file system, so
    the rename onto ``final`` is atomic), removed afterwards. If the body raises, ``final``
    and the ``stale`` paths (files derived from it) are removed: no file of an earlier run
    stays under a name this run did not verify."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=parent)
    try:
        yield os.path.join(tmp, os.path.basename(final))
    except BaseException:
        for name in (final, *stale):
            _remove(name)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _settle(staged: str, final: str, passed: bool) -> str:
    """Move the staged file onto ``final`` (verified) or ``<stem>.failed.onnx`` (not), remove
    what an earlier run left under the other name, and return where the file now is."""
    failed = failed_path(final)
    _remove(failed if passed else final)
    _move(staged, final if passed else failed)
    return final if passed else failed


def _move(src: str, dest: str) -> None:
    """Rename an ONNX file and its external data file (``<name>.data``, re-pointed)."""
    data = f"{src}.data"
    if os.path.exists(data):
        import onnx

        proto = onnx.load(src, load_external_data=False)
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = f"{os.path.basename(dest)}.data"
        onnx.save(proto, src)
        os.replace(data, f"{dest}.data")
    os.replace(src, dest)


def _remove(path: str | None) -> None:
    for name in (path, f"{path}.data") if path else ():
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def _kept(where: str, final: str) -> str:
    return (f"The file is kept as {where} for inspection; nothing is left under {final}.")


def _prepare(model: nn.Module, example_inputs: Any, path: str | os.PathLike,
             rtol: float | None, atol: float | None
             ) -> tuple[tuple[torch.Tensor, ...], nn.Module, ExportReport]:
    """Checked inputs, the deployable eval-mode copy, and a report with its tolerances."""
    inputs = _as_inputs(example_inputs)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ConfigError(f"export_onnx: '{meta[0]}' (and {len(meta) - 1} more) is on the meta "
                          f"device and has no values to export. Materialize the model first "
                          f"(model.to_empty(device='cpu') and load_state_dict).")
    check_inputs(inputs, "export_onnx")
    deploy, transformed = deployable(model)
    check_model(deploy, "export_onnx")
    for line in transformed:
        log.info("export_onnx: %s (on a copy)", line)
    deploy.eval()
    dtype = model_dtype(deploy)
    default_rtol, default_atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    report = ExportReport(path=os.fspath(path), transformed=transformed,
                          rtol=default_rtol if rtol is None else rtol,
                          atol=default_atol if atol is None else atol,
                          fold_tolerance=FOLD_TOLERANCES.get(dtype, 1e-5))
    return inputs, deploy, report


def _check_runs(deploy: nn.Module, inputs: tuple[torch.Tensor, ...], model: nn.Module,
                allow: bool) -> None:
    """Run the eval-mode deployable copy eagerly on the inputs first: a shape or type error is
    then reported in one line, not from inside the exporter's trace; NaN/inf outputs too."""
    try:
        with torch.no_grad():
            out = deploy(*inputs)
    except Exception as exc:  # the user's forward may raise anything
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                           for x in inputs)
        raise ConfigError(f"export_onnx: {type(model).__name__} (eval mode) fails on the given "
                          f"inputs [{shapes}]: {type(exc).__name__}: {_first_line(exc)}. Pass "
                          f"inputs its forward accepts.") from exc
    check_outputs(out, None, "export_onnx", allow=allow)


def _first_line(exc: BaseException) -> str:
    return _ANSI.sub("", str(exc)).strip().split("\n")[0] or type(exc).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


_CAPTURED_LOGGERS = ("torch", "onnx", "onnxscript", "onnx_ir", "onnxruntime")


class _OnceHandler(logging.StreamHandler):
    """A handler into the capture buffer that writes each record once, however many of the
    swapped-in handlers (a logger's and the root logger's) it reaches."""

    def __init__(self, stream: io.StringIO, seen: set[int], level: int) -> None:
        super().__init__(stream)
        self.seen = seen
        self.setLevel(level)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) not in self.seen:
            self.seen.add(id(record))
            super().emit(record)


@contextlib.contextmanager
def _captured(into: list[str]):
    """Everything the exporter or the quantizer prints, logs or warns, appended to ``into``.

    - stdout and stderr (Python-level writes);
    - the console handlers of torch's, onnx's, onnxscript's and onnxruntime's loggers (they
      write to stderr through their own handlers, which redirecting sys.stderr does not
      reach) and of the root logger, swapped for the buffer; the buffer is also added to
      the root logger, so that ``logging.warning(...)`` in onnxruntime's quantization tools
      ("Axis 1 is out-of-range ...") is kept rather than printed, and does not install a
      console handler on an unconfigured root logger for good (``basicConfig``);
    - Python warnings, whatever the filters say (each once per place), except expandfx's
      own (:class:`ExpandFXWarning`), which are issued again afterwards, for the user.
    """
    buffer = io.StringIO()
    seen: set[int] = set()
    root = logging.getLogger()
    loggers = [root] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                        if name.split(".")[0] in _CAPTURED_LOGGERS]

    def to_console(h: logging.Handler) -> bool:
        return type(h) is logging.StreamHandler and h.stream in (
            sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)

    saved = [(lg, lg.handlers[:]) for lg in loggers if lg is root or any(map(to_console,
                                                                             lg.handlers))]
    ours: list[warnings.WarningMessage] = []

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if isinstance(category, type) and issubclass(category, ExpandFXWarning):
            ours.append(warnings.WarningMessage(message, category, filename, lineno))
        else:
            buffer.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        for lg, handlers in saved:
            lg.handlers = [_OnceHandler(buffer, seen, h.level) if to_console(h) else h
                           for h in handlers]
        levels = [h.level for h in saved[0][1] if to_console(h)]
        root.addHandler(_OnceHandler(buffer, seen, min(levels, default=logging.WARNING)))
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), \
                warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        for lg, handlers in saved:
            lg.handlers = handlers
        into.append(_ANSI.sub("", buffer.getvalue()))
        for w in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _folded(deploy: nn.Module, inputs: tuple[torch.Tensor, ...],
            report: ExportReport | None = None, allow: bool = False) -> nn.Module:
    """``expandfx.fold`` of the eval-mode deployable copy, noted in the report."""
    folded = fold(deploy, inputs, allow_nonfinite_outputs=allow)
    if report is not None:
        done = folded.meta["expandfx.fold"].folded
        n_in = sum(len(f["modules"]) for f in done)
        report.transformed.append(f"folded {n_in} modules in {len(done)} linear subgraph(s) "
                                  f"into single layers (expandfx.fold)")
        log.info("export_onnx: %s (on a copy)", report.transformed[-1])
    return folded


def _describe(report: ExportReport, proto: Any) -> None:
    report.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                        None)
    report.inputs = [(i.name, _dims(i)) for i in proto.graph.input]
    report.outputs = [(o.name, _dims(o)) for o in proto.graph.output]
    report.op_histogram, report.parameter_count = graph_summary(proto)


def _original(model: nn.Module, report: ExportReport) -> nn.Module | None:
    """An eval-mode copy of the given model, when the deployable copy was transformed."""
    return copy.deepcopy(model).eval() if report.transformed else None


def check_report(deploy: nn.Module, inputs: tuple[torch.Tensor, ...], report: ExportReport,
                 dynamic_batch: bool, n_random: int, original: nn.Module | None = None,
                 allow_nonfinite_outputs: bool = False) -> None:
    """Run onnxruntime at both optimization levels; raise VerificationError on a mismatch."""
    _timed_verify(deploy, inputs, report, dynamic_batch, n_random, original,
                  allow_nonfinite_outputs)
    what = _problem(report)
    if what is not None:
        raise VerificationError(f"export_onnx: {what}.", report)


def _timed_verify(deploy: nn.Module, inputs: tuple[torch.Tensor, ...], report: ExportReport,
                  dynamic_batch: bool, n_random: int, original: nn.Module | None,
                  allow: bool) -> None:
    t0 = time.perf_counter()
    _verify(deploy, inputs, report, dynamic_batch, n_random, original, allow)
    report.timings["verify"] = time.perf_counter() - t0
    report.verified = True


def _problem(report: ExportReport) -> str | None:
    """The first fp32 check that failed, in words (None: it passed)."""
    if report.fp32_passed:
        return None
    legacy = (f" (exporter='legacy' froze forward to the branch example_inputs take, and "
              f"{report.other_branch_inputs} check input(s) take another branch)"
              if report.exporter == "legacy" and report.other_branch_inputs else "")
    return ("the deployable (contracted/baked) copy differs from the given model"
            if not report.fold_pass else f"onnxruntime disagrees with torch{legacy}"
            if not report.numerics_pass else
            "the exported graph differs from the compact architecture")


def compact_architecture(model: nn.Module) -> nn.Module:
    """The original compact model rebuilt from the blocks' original layers (fresh weights)."""
    arch = bake(model)
    for block, paths in blocks(arch).values():
        layer = copy.deepcopy(original_template(block))  # registered classes: their own
        ref = block.factors[0].weight
        layer.to_empty(device=ref.device)
        layer.to(ref.dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        replace(arch, paths, layer)
    return arch


def graph_summary(proto: Any) -> tuple[dict[str, int], int]:
    """(operator histogram, number of initializer elements) of an ONNX model.

    The exporter's optimizer merges initializers of equal value (e.g. untrained
    batch-norm ones and zeros), so compare models whose weights are not all equal.
    """
    import onnx

    ops = Counter(node.op_type for node in proto.graph.node)
    for fn in proto.functions:
        ops.update(node.op_type for node in fn.node)
    params = sum(int(onnx.numpy_helper.to_array(t).size) for t in proto.graph.initializer)
    return dict(sorted(ops.items())), params


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: str,
            dynamic_batch: bool, opset: int | None, report: ExportReport | None = None,
            exporter: str = "dynamo") -> None:
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    captured: list[str] = []
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    try:
        noisy.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." lines
        with _captured(captured), torch.no_grad():
            if exporter == "legacy":
                _export_legacy(model, inputs, path, dynamic_batch, opset)
            else:
                shapes = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch", min=1)
                    shapes = tuple({0: batch} if x.dim() > 0 else None for x in inputs)
                with _reused_registry():
                    torch.onnx.export(model, inputs, path, dynamo=True, external_data=big,
                                      dynamic_shapes=shapes, opset_version=opset,
                                      verbose=False)
    except Exception as exc:  # the exporter raises many types; name the model and the fix
        cause = exc  # the exporter wraps the real error ("step 1/3 of exporting ...")
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = _ANSI.sub("", str(cause))
        batch = dynamic_batch and any(w in text for w in ("onstraints violated", "specializ"))
        hint = (" The batch dimension is exported as dynamic: try dynamic_batch=False for a "
                "model with a fixed batch." if batch else "")
        message = (f"export_onnx: torch.onnx.export{'(dynamo=False)' * (exporter == 'legacy')}"
                   f" failed for {type(model).__name__} (eval mode): {type(cause).__name__}: "
                   f"{_first_line(cause)}.")
        branch = _data_dependent(cause, text, model)
        if branch is not None:
            sentence, where, numbers = branch
            error = ConfigError(f"{message} {sentence} The exporter's log is in the "
                                f"exception's export_log.", code="data_dependent_control_flow",
                                where=where, numbers=numbers)
        else:
            error = ConfigError(f"{message}{hint} The exporter's log is in the exception's "
                                f"export_log.")
        error.export_log = "".join(captured)  # type: ignore[attr-defined]
        raise error from exc
    finally:
        noisy.setLevel(level)
    if report is not None:
        report.export_log += "".join(captured)


def _export_legacy(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: str,
                   dynamic_batch: bool, opset: int | None) -> None:
    """``torch.onnx.export(dynamo=False)``: inputs named as forward's arguments, outputs
    ``output_<i>``, the batch dimension dynamic where the inputs and outputs have it."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(inputs))]
    outputs = _outputs(model, inputs)
    out_names = [f"output_{i}" for i in range(len(outputs))]
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch and inputs[0].dim() > 0:
        n = inputs[0].shape[0]
        axes = {name: {0: "batch"} for name, x in zip(names, inputs, strict=True) if x.dim()}
        axes.update({name: {0: "batch"} for name, y in zip(out_names, outputs, strict=True)
                     if y.dim() and y.shape[0] == n})
    torch.onnx.export(model, inputs, path, dynamo=False, input_names=names,
                      output_names=out_names, dynamic_axes=axes or None, opset_version=opset)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _data_dependent(cause: BaseException, text: str, model: nn.Module
                    ) -> tuple[str, str, dict[str, Any]] | None:
    """For an exporter error about data-dependent control flow: the sentence naming the
    module whose forward holds it, the file and line, and the fix; its ``where`` and
    ``numbers``. None for any other error.

    The user's frame is the innermost one of the exception's traceback outside torch; the
    module the innermost frame whose ``self`` is one of the model's modules. Without a
    traceback, the last ``File "...", line N`` of the message, matched against the lines of
    the model's modules' forward code."""
    if type(cause).__name__ != "GuardOnDataDependentSymNode" and not re.search(
            r"data-dependent|dynamic control flow", text, re.I):
        return None
    paths = {id(m): path for path, m in model.named_modules()}
    file = line = module = None
    tb = cause.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and not name.startswith("<"):
            file, line = name, tb.tb_lineno
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in paths and isinstance(owner, nn.Module):
            module = paths[id(owner)], type(owner).__name__
        tb = tb.tb_next
    if file is None:
        found = re.findall(r'File "([^"]+)", line (\d+)', text)
        if found:
            file, line = found[-1][0], int(found[-1][1])
    if file is not None and module is None:
        for path, m in model.named_modules():
            code = getattr(type(m).forward, "__code__", None)
            if code is not None and code.co_filename == file and line in {
                    n for _, _, n in code.co_lines() if n is not None}:
                module = path, type(m).__name__
                break
    source = linecache.getline(file, line).strip() if file else ""
    where = (f"module '{module[0]}' ({module[1]}.forward)" if module and module[0] else
             f"the model's own forward ({module[1]}.forward)" if module else "its forward")
    at = f" at {file}:{line}" + (f" (`{source}`)" if source else "") if file else ""
    sentence = (f"{where[0].upper()}{where[1:]} makes a Python decision on a tensor's value"
                f"{at}: a data-dependent `if` (or bool(), .item() of a tensor) cannot be "
                f"exported as one graph for every input. Write the branch with torch.cond("
                f"pred, true_fn, false_fn, operands) (torch.where for an elementwise choice), "
                f"or compute the condition outside the model and pass in what it decides. "
                f"exporter='legacy' exports only the branch example_inputs take (an explicit "
                f"opt-in, with a warning).")
    numbers: dict[str, Any] = {"file": file, "line": line} if file else {}
    return sentence, module[0] if module else (f"{file}:{line}" if file else "forward"), numbers


_REGISTRY_LOCK = threading.Lock()
_REGISTRIES: dict[Any, Any] = {}
_REGISTRY_USERS = [0]


@contextlib.contextmanager
def _reused_registry():
    """``torch.onnx.export(dynamo=True)`` builds its ONNX registry from torchlib on every
    call (about 1 s: onnxscript parses the source of ~500 functions), and then only reads
    it. During our export the registry is built once per opset and handed out as a copy
    (its table of functions copied, so that a caller's ``custom_translation_table`` never
    writes into the cached one). On a torch without this private hook, export as usual."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass: type, *args: Any, **kwargs: Any) -> Any:
        key = (klass, args, tuple(sorted(kwargs.items())))
        with _REGISTRY_LOCK:
            cached = _REGISTRIES.get(key)
        if cached is None:
            cached = build(klass, *args, **kwargs)
            with _REGISTRY_LOCK:
                _REGISTRIES[key] = cached
        fresh = copy.copy(cached)
        fresh.functions = {op: list(metas) for op, metas in cached.functions.items()}
        return fresh

    with _REGISTRY_LOCK:
        if _REGISTRY_USERS[0] == 0:
            cls.from_torchlib = classmethod(from_torchlib)
        _REGISTRY_USERS[0] += 1
    try:
        yield
    finally:
        with _REGISTRY_LOCK:
            _REGISTRY_USERS[0] -= 1
            if _REGISTRY_USERS[0] == 0:
                cls.from_torchlib = original


_REFERENCES: OrderedDict[Any, tuple[dict[str, int], int]] = OrderedDict()
_REFERENCES_KEPT = 64
_REFERENCES_LOCK = threading.Lock()


def _reference_summary(reference: nn.Module, inputs: tuple[torch.Tensor, ...],
                       dynamic_batch: bool, opset: int | None, fold: bool, allow: bool,
                       exporter: str, report: ExportReport) -> tuple[dict[str, int], int]:
    """(operator histogram, parameter count) of the reference exported as the model was,
    from the cache when this architecture was exported before in this process."""
    import onnx

    ref, _ = deployable(reference)
    ref.eval()
    key = _structure_key(ref, inputs, (dynamic_batch, opset, bool(fold), exporter))
    with _REFERENCES_LOCK:
        cached = _REFERENCES.get(key) if key is not None else None
        if cached is not None:
            _REFERENCES.move_to_end(key)
    if cached is not None:
        report.reference_cached = True
        return cached
    if fold:
        ref = _folded(ref, inputs, allow=allow)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "reference.onnx")
        _export(ref, inputs, ref_path, dynamic_batch, opset, exporter=exporter)
        summary = graph_summary(onnx.load(ref_path))
    if key is not None:
        with _REFERENCES_LOCK:
            _REFERENCES[key] = summary
            while len(_REFERENCES) > _REFERENCES_KEPT:
                _REFERENCES.popitem(last=False)
    return summary


class _Unkeyable(Exception):
    """An attribute the structure key cannot represent: the reference is not cached."""


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
          torch.layout, torch.memory_format, type, enum.Enum, types.FunctionType,
          types.BuiltinFunctionType)


def _frozen(value: Any) -> Any:
    if isinstance(value, _ATOMS):
        return type(value), value  # 1, 1.0 and True are equal keys otherwise
    if isinstance(value, (tuple, list)):
        return type(value), tuple(map(_frozen, value))
    if isinstance(value, dict):
        return dict, tuple((_frozen(k), _frozen(v)) for k, v in value.items())
    if isinstance(value, functools.partial):
        return functools.partial, value.func, _frozen(value.args), _frozen(value.keywords)
    if isinstance(value, torch.Tensor):  # an unregistered tensor: a constant of the graph
        return torch.Tensor, tuple(value.shape), value.dtype, _digest(value)
    raise _Unkeyable(type(value).__name__)


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.blake2b(data.view(torch.uint8).numpy() if data.numel() else b"",
                           digest_size=16).hexdigest()


def _structure_key(ref: nn.Module, inputs: tuple[torch.Tensor, ...],
                   settings: tuple[Any, ...]) -> Any:
    """What the reference's exported graph depends on, weights left out: for every module
    its path, class, public attributes (the hyperparameters) and hooks; for every parameter
    and buffer its name, shape and dtype, which earlier tensor it equals (the exporter
    merges initializers of equal value, e.g. untrained LayerNorm ones) and its value if it
    is constant; the inputs' shapes and dtypes; the export settings. None (no caching)
    when a module holds an attribute of another kind."""
    try:
        modules = tuple(
            (path, type(m), tuple((k, _frozen(v)) for k, v in sorted(vars(m).items())
                                  if not k.startswith("_") and k != "training"),
             tuple(m._forward_pre_hooks.values()), tuple(m._forward_hooks.values()))
            for path, m in ref.named_modules(remove_duplicate=False))
    except _Unkeyable:
        return None
    first: dict[tuple[Any, ...], int] = {}
    tensors = []
    named = [*ref.named_parameters(remove_duplicate=False),
             *ref.named_buffers(remove_duplicate=False)]
    for i, (name, t) in enumerate(named):
        content = (tuple(t.shape), t.dtype, _digest(t))
        flat = t.detach().reshape(-1)
        constant = (flat[0].item() if flat.numel() and bool((flat == flat[0]).all())
                    else None)
        tensors.append((name, content[:2], first.setdefault(content, i), constant))
    shapes = tuple((tuple(x.shape), x.dtype) for x in inputs)
    return modules, tuple(tensors), shapes, settings


def _other_branches(model: nn.Module, inputs: tuple[torch.Tensor, ...], allow: bool,
                    report: ExportReport) -> list[tuple[torch.Tensor, ...]]:
    """exporter="legacy": inputs of example_inputs' shapes built to take other branches
    (negated; zero; all-positive and all-negative, larger than the inputs), kept where
    TorchScript's trace of forward differs from the example inputs' one (another path
    through forward, or another value frozen into the graph) and the eager outputs are
    usable; their traces' warnings go to the export log."""
    def build(f: Any) -> tuple[torch.Tensor, ...]:
        return tuple(f(x) if x.is_floating_point() else x for x in inputs)

    scale = [3 * (x.abs().max().item() + 1) if x.is_floating_point() and x.numel() else 1.0
             for x in inputs]
    candidates = [build(torch.neg), build(torch.zeros_like),
                  tuple(x.abs() + s if x.is_floating_point() else x
                        for x, s in zip(inputs, scale, strict=True)),
                  tuple(-(x.abs() + s) if x.is_floating_point() else x
                        for x, s in zip(inputs, scale, strict=True))]
    captured: list[str] = []
    found = []
    with _captured(captured), torch.no_grad():
        def graph(trial: tuple[torch.Tensor, ...]) -> str:
            traced = torch.jit.trace(model, trial, check_trace=False, strict=False)
            return re.sub(r"___torch_mangle_\d+\.", "", str(traced.inlined_graph))

        try:
            traced = graph(inputs)
        except Exception:  # the export traced it; a probe that fails finds nothing
            traced = None
        for trial in candidates if traced is not None else []:
            try:
                if graph(trial) == traced:
                    continue
                check_outputs(_outputs(model, trial), None, "export_onnx", allow=allow)
            except Exception:  # the forward refuses this input, or its outputs are NaN/inf
                continue
            found.append(trial)
    report.export_log += "".join(captured)
    return found


def _warn_legacy(report: ExportReport, verify: bool) -> None:
    n = report.other_branch_inputs
    tracer = "TracerWarning" in report.export_log
    coverage = ("verify=False: nothing was verified." if not verify else
                f"{n} check input(s) built to take another path (negated, zero, all-positive "
                f"or all-negative copies of example_inputs) do, and verification runs them: "
                f"it fails where the frozen graph computes them wrongly." if n else
                "None of the check inputs built to take another path (negated, zero, "
                "all-positive and all-negative copies of example_inputs) does: verification "
                "covers only the traced branch.")
    warnings.warn(
        "export_onnx(exporter='legacy'): the TorchScript exporter traces forward on "
        "example_inputs and freezes every data-dependent `if` to the branch they take: "
        "the ONNX graph computes that branch for every input"
        + (" (the trace warned of a tensor turned into a Python value; see "
           "report.export_log)" if tracer else "") + f". {coverage} Prefer torch.cond and "
        f"the default exporter.", ExpandFXWarning, stacklevel=3)


def _verify(model: nn.Module, inputs: tuple[torch.Tensor, ...], report: ExportReport,
            dynamic_batch: bool, n_random: int, original: nn.Module | None = None,
            allow: bool = False, extra: Iterable[tuple[torch.Tensor, ...]] = ()) -> None:
    """onnxruntime at both optimization levels against torch on the example inputs,
    ``n_random`` inputs like them, the ``extra`` ones (exporter="legacy": inputs taking
    another branch) and, for a dynamic batch, a batch of another size (the last trial)."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    trials = [inputs] + [tuple(_like(x, gen) for x in inputs) for _ in range(n_random)]
    trials += list(extra)
    if dynamic_batch:
        other = max(1, inputs[0].shape[0] + 3) if inputs[0].dim() else 1
        trials.append(tuple(_like(x, gen, batch=other) for x in inputs))
    names = [n for n, _ in report.inputs]
    out_names = [n for n, _ in report.outputs]
    with torch.no_grad():
        try:
            expected = [_outputs(model, trial) for trial in trials]
        except Exception as exc:  # the inputs themselves ran: another batch size failed
            raise ConfigError(f"export_onnx: {type(model).__name__} fails at batch size "
                              f"{trials[-1][0].shape[0]} ({type(exc).__name__}: "
                              f"{_first_line(exc)}), which the dynamic-batch check runs; pass "
                              f"dynamic_batch=False for a model with a fixed batch.") from exc
        for i, want in enumerate(expected):
            check_outputs(want, None, "export_onnx" if i == 0 else
                          f"export_onnx (check input {i}: random, like example_inputs)",
                          allow=allow)
        if original is not None:  # the deployable copy must compute what the user's model does
            report.fold_error = _worst(finite_rel_error(_outputs(original, trial), want)
                                       for trial, want in zip(trials, expected, strict=True))
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    for level, flag in levels.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = flag
        opts.log_severity_level = 3
        session = ort.InferenceSession(report.path, opts, providers=["CPUExecutionProvider"])
        stats: dict[str, dict[str, Any]] = {}
        for trial, want in zip(trials, expected, strict=True):
            feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, trial, strict=True)}
            got = session.run(None, feeds)
            if len(got) != len(want):
                stats["<outputs>"] = {"max_abs": math.inf, "max_rel": math.inf, "passed": False}
                continue
            for name, g, w in zip(out_names, got, want, strict=True):
                s = stats.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "passed": True})
                _compare(s, w, torch.from_numpy(g), report)
        report.errors[level] = stats


def _compare(s: dict[str, Any], want: torch.Tensor, got: torch.Tensor,
             report: ExportReport) -> None:
    """Accumulate one output's errors into ``s``, over the positions where torch's output is
    finite; onnxruntime's must be non-finite exactly where torch's is (else it fails)."""
    if got.shape != want.shape:
        s.update(max_abs=math.inf, max_rel=math.inf, passed=False)
        return
    rel = finite_rel_error(want, got)
    if rel == math.inf:  # non-finite where torch's is finite, or not the same non-finite
        nan, inf = count_nonfinite(got)
        s.update(max_abs=math.inf, max_rel=math.inf, passed=False,
                 nonfinite={"nan": nan, "inf": inf})
        return
    keep = torch.isfinite(want)
    w, g = want[keep].double(), got.to(want.dtype)[keep].double()
    diff = (g - w).abs()
    s["max_abs"] = _worst([s["max_abs"], float(diff.max()) if diff.numel() else 0.0])
    s["max_rel"] = _worst([s["max_rel"], rel])
    # atol is relative to the output's scale (§4), like contract's 1e-5 · max |out|
    scale = float(w.abs().max()) if w.numel() else 0.0
    ok = bool((diff <= report.atol * scale + report.rtol * w.abs()).all())
    s["passed"] = bool(s["passed"] and ok)


def _worst(errors: Iterable[float]) -> float:
    """The largest error, NaN if any is NaN (``max`` would drop it: max(0.0, nan) == 0.0)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)


def _outputs(model: nn.Module, trial: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every tensor the model returns (dicts and nested tuples flattened), as float tensors."""
    from torch.utils._pytree import tree_leaves

    return [t.detach().cpu().float() for t in tree_leaves(model(*trial))
            if isinstance(t, torch.Tensor)]


def _like(x: torch.Tensor, gen: torch.Generator, batch: int | None = None) -> torch.Tensor:
    shape = (batch, *x.shape[1:]) if batch is not None else x.shape
    if x.is_floating_point():
        std = x.float().std().item() if x.numel() > 1 else 1.0
        return (torch.randn(shape, generator=gen) * (std or 1.0) + x.float().mean()).to(x.dtype)
    low, high = int(x.min()), int(x.max()) + 1
    return torch.randint(low, max(high, low + 1), shape, generator=gen, dtype=x.dtype)


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    bad = [type(x).__name__ for x in inputs if not isinstance(x, torch.Tensor)]
    if bad or not inputs:
        raise ConfigError(f"export_onnx: example_inputs must be a tensor or a tuple of tensors "
                          f"(the positional arguments of forward); got {bad or 'nothing'}.")
    return inputs


def _dims(value: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
