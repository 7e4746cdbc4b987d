"""``export_executorch``: the deployable compact model as an ExecuTorch program, verified.

Recipe: contract and bake a copy if the model holds expanded blocks or companded weights
(the caller's model is never changed), fold it (:func:`expandfx.fold`: BatchNorms absorbed,
linear subgraphs merged); ``torch.export`` with a dynamic batch ``1..max_batch``;
``to_edge_transform_and_lower`` with the ``XnnpackPartitioner``; ``to_executorch``; write
the ``.pte``; load the *written file* in ExecuTorch's runtime and run it against torch.

Verification runs every trial **in sequence on one loaded Method**, as an app's loop
would: batch 1, ``example_inputs``, random inputs like them at that batch, a batch between
it and ``max_batch``, ``max_batch`` itself, then ``example_inputs`` again. fp32 is held to
``export_onnx``'s scale-aware tolerance (``|ExecuTorch − torch| ≤ atol·max|out| + rtol·|out|``,
:data:`~expandfx.onnx_export.TOLERANCES`); a trial the runtime refuses is a failure too
(code ``runtime_error``). Two traps this catches: ExecuTorch plans each input's memory for
``max(example batch, 15)`` rows, not for the declared maximum, so batch 16+ fails
``set_inputs`` with error 0x10 — the program is therefore exported from the example inputs
re-batched to ``max_batch`` (planned sizes = ``max_batch``, ``report.inputs``); and state
left in a Method by a smaller batch must not change a larger batch's result.

A third, found by this check: for some ``max_batch`` values the program runs *only* at
``max_batch`` (smallnet_digits at ``max_batch=16``: batches 1–15 fail ``execute`` with 0x10,
while 8, 15, 17, 20, 32 and 64 run every batch; ExecuTorch 1.5.1) — the export then fails
with ``runtime_error`` and the message says to try another ``max_batch``.

The program accepts batches ``1..max_batch`` only: a larger batch is refused by the runtime
(``RuntimeError`` from ``Method.execute``, error 0x10 from ``set_inputs``); split it, or export
with a larger ``max_batch`` (the memory-planned arena grows with it). ``max_batch=1`` exports
a static batch of 1.

``quantize="int8"`` (or an :class:`~expandfx.quantize.Int8Config`) also writes
``<stem>.int8.pte``: PT2E quantization with XNNPACK's quantizer (symmetric int8, weights per
output channel by default, activations per tensor, min/max observers), prepared from an export
with the dynamic batch (so calibration batches of any size up to ``max_batch`` run; larger
ones are split), calibrated on the first batches of ``calibration``, converted, exported and
lowered to XNNPACK's int8 kernels. It is verified by ``export_onnx``'s int8 gate
(:func:`expandfx.quantize.check_calibration` before anything is written; SQNR / top-1
agreement against torch's fp32 outputs on ``example_inputs`` and the held-out batches,
``min_samples``) plus one more gating set, ``"other batch sizes"`` (held-out rows re-batched
to 1, a middle size and ``max_batch``), all in sequence on one loaded Method: example_inputs,
the held-out batches, the other sizes growing, example_inputs again. ``Int8Config.method`` must be
``"minmax"`` (XNNPACK's quantizer observes min/max; ``"percentile"`` is onnxruntime's).

The report (:class:`ExecuTorchReport`) says what runs where: the ops inside
``executorch_call_delegate`` (the XNNPACK subgraphs, from the lowered modules' graphs) and
every op left outside (run by ExecuTorch's portable kernels), which conv/linear layers are
delegated and (int8) read int8 weights, the kernels the runtime must register, the file
sizes, the memory-planned arena (``arena_bytes``: what ExecuTorch's memory planning
reserves for inputs, outputs and the tensors between delegate calls — XNNPACK allocates its
own workspace for the tensors inside a delegate at load time, which this does not count;
the weights stay in the file), and latency in the ExecuTorch runtime: medians of
interleaved, warmed-up runs with the thread pool fixed to ``Int8Config.threads`` (1 by
default) via ``_unsafe_reset_threadpool``, beside the *call overhead* — the same timing of a
one-op program on the same inputs (the pybind call, copying the inputs into the planned
buffers, wrapping the outputs), which both figures include.

Files follow ``export_onnx``'s rule: written under a temporary name beside ``path`` and
renamed onto it only when verified; a file that fails is kept as ``<stem>.failed.pte``
(``<stem>.int8.failed.pte``) and named in the :class:`~expandfx.onnx_export.VerificationError`,
which carries the report. Everything the exporter, torchao and the runtime print or log
(FutureWarnings, C++ log lines) is captured into ``report.export_log``.

Thread pool: ExecuTorch's pool is process-wide, and ``_unsafe_reset_threadpool`` replaces it;
this function sets it (when it differs) before loading any program and restores it after
its own programs are gone. A Method the caller loaded earlier in the same process may hold
the replaced pool: load it again after this call.

Example::

    >>> import torch, tempfile, os, expandfx as efx
    >>> from expandfx.models import smallnet_digits
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pte")
    >>> report = efx.export_executorch(smallnet_digits().eval(), (torch.rand(4, 1, 8, 8),),
    ...                                path, max_batch=16)  # doctest: +SKIP
    >>> report.passed, report.inputs[0][1], report.arena_bytes > 0  # doctest: +SKIP
    (True, [16, 1, 8, 8], True)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ExpandFXError, failure
from .finite import check_outputs, finite_rel_error
from .onnx_export import (
    _ANSI,
    VerificationError,
    _captured,
    _check_runs,
    _compare,
    _first_line,
    _folded,
    _kept,
    _like,
    _original,
    _outputs,
    _prepare,
    _remove,
    _settle,
    _staging,
    _worst,
    comparison_failures,
)
from .quantize import (
    VERIFY_ON,
    Int8Config,
    Int8Report,
    _is_classifier,
    _judge,
    _samples,
    _split,
    as_config,
    check_calibration,
    int8_path,
    sqnr_db,
)
from .tolerances import model_dtype, within

__all__ = ["ExecuTorchInt8Report", "ExecuTorchReport", "export_executorch"]

log = logging.getLogger("expandfx")

VERB = "export_executorch"
EXTRA = "pip install 'expandfx[executorch]'"
MAX_SET = "other batch sizes"  # int8: held-out rows at batch 1, a middle one and max_batch
_LAYERS = {"aten.convolution": 1, "aten.linear": 1, "aten.addmm": 2, "aten.mm": 1}  # weight arg
_QUANTIZED = ("quantized_decomposed.dequantize_per_channel",
              "quantized_decomposed.dequantize_per_tensor")
_WARMUP = 3


@dataclass
class ExecuTorchInt8Report(Int8Report):
    """The int8 program: :class:`~expandfx.quantize.Int8Report`'s fields and gate, with
    what runs inside XNNPACK (``quantized_layers``: conv/linear layers inside the delegate
    reading int8 weights, of all conv/linear layers; ``int8_weight_elements``: their int8
    weight bytes) and the program's arena."""

    delegated_ops: dict[str, int] = field(default_factory=dict)
    outside_ops: dict[str, int] = field(default_factory=dict)
    layers_outside: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    arena_bytes: int = 0

    def __str__(self) -> str:
        c = self.config
        q, n = self.quantized_layers
        lines = [f"int8 ExecuTorch program: {self.path} (PT2E, XNNPACKQuantizer, "
                 f"{'per-channel' if c['per_channel'] else 'per-tensor'} int8 weights, "
                 f"min/max calibration)",
                 f"  calibrated on {self.calibration_batches} batch(es); verified on "
                 f"{' and '.join(self.verified_on)} ({self.heldout_batches} held-out "
                 f"batch(es), {self.heldout_samples} samples), in sequence on one Method",
                 f"  int8 weights: {q}/{n} conv/linear layers inside executorch_call_delegate "
                 f"({self.int8_weight_elements:,} int8 weight bytes)"
                 + (f"; outside: {', '.join(self.layers_outside)}" if self.layers_outside
                    else ""),
                 f"  inside the XNNPACK delegate: {_ops(self.delegated_ops)}",
                 f"  outside it: {_ops(self.outside_ops) or 'nothing'}; memory-planned arena "
                 f"{self.arena_bytes:,} B"]
        for where, value in self.sqnr_db.items():
            agree = self.agreement.get(where)
            lines.append(f"  int8 vs torch fp32 [{where}]: SQNR {value:.1f} dB"
                         + (f", top-1 agreement {agree:.4f}" if agree is not None else "")
                         + ("" if where in self.verified_on else
                            " (reported, not gating: verify_on='held-out')"))
        if self.accuracy:
            lines.append(f"  held-out accuracy: fp32 {self.accuracy['fp32']:.4f}, "
                         f"int8 {self.accuracy['int8']:.4f}")
        if self.size_bytes:
            s = self.size_bytes
            lines.append(f"  file size: fp32 {s['fp32']:,} B, int8 {s['int8']:,} B "
                         f"({s['int8'] / s['fp32']:.2f}×)")
        if self.latency_ms:
            ratio = self.latency_ratio
            lines.append(f"  ExecuTorch latency (batch {self.latency_batch}, {c['threads']} "
                         f"thread(s), median of {c['latency_runs']} interleaved runs): fp32 "
                         f"{self.latency_ms['fp32']:.3f} ms, int8 {self.latency_ms['int8']:.3f}"
                         f" ms ({ratio:.2f}×" + (", int8 is NOT faster here)" if ratio >= 1
                                                 else ")"))
        rule = [f"SQNR ≥ {c['min_sqnr_db']:g} dB" if c["min_sqnr_db"] is not None else "",
                f"agreement ≥ {c['min_agreement']:g}" if c["min_agreement"] is not None
                else ""]
        rule = " and ".join(t for t in rule if t) or "no threshold"
        lines.append(f"  int8 verdict: {'PASS' if self.passed else 'FAIL'} ({rule} on "
                     f"{' and '.join(self.verified_on)}, ≥ {c['min_samples']} held-out "
                     f"samples)" + "".join(f"\n  FAIL: {f['message']}" for f in self.failures))
        return "\n".join(lines)


@dataclass
class ExecuTorchReport:
    """What was written, what runs inside XNNPACK, and how closely ExecuTorch agrees with
    torch (``errors[trial][output]``, the trials in the order they ran on one Method)."""

    path: str
    max_batch: int = 64
    transformed: list[str] = field(default_factory=list)
    inputs: list[tuple[str, list[int]]] = field(default_factory=list)  # memory-planned sizes
    outputs: list[tuple[str, list[int]]] = field(default_factory=list)
    delegated_ops: dict[str, int] = field(default_factory=dict)  # inside executorch_call_delegate
    outside_ops: dict[str, int] = field(default_factory=dict)  # portable kernels / prims
    delegates: int = 0
    layers: tuple[int, int] = (0, 0)  # conv/linear inside the delegate, all conv/linear
    layers_outside: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # operators the runtime must register
    arena_bytes: int = 0  # ExecuTorch's memory-planned (non-constant) buffers
    size_bytes: dict[str, int] = field(default_factory=dict)
    rtol: float = 0.0
    atol: float = 0.0
    errors: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    fold_error: float | None = None
    fold_tolerance: float = 1e-5
    latency_ms: dict[str, float] = field(default_factory=dict)  # "fp32", "call overhead"
    latency_batch: int = 0
    threads: int = 1
    latency_runs: int = 30
    timings: dict[str, float] = field(default_factory=dict)
    verified: bool = False
    int8: ExecuTorchInt8Report | None = None
    export_log: str = ""  # what executorch, torchao and the runtime printed and logged

    @property
    def numerics_pass(self) -> bool:
        return all(e["passed"] for trial in self.errors.values() for e in trial.values())

    @property
    def fold_pass(self) -> bool:
        return self.fold_error is None or within(self.fold_error, self.fold_tolerance)

    @property
    def fp32_passed(self) -> bool:
        """The fp32 program's verdict alone (``passed`` also needs the int8 one)."""
        return self.verified and self.numerics_pass and self.fold_pass

    @property
    def passed(self) -> bool:
        return self.fp32_passed and (self.int8 is None or self.int8.passed)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The fp32 checks that failed, ``{"code", "where", "numbers", "message"}`` each
        (codes ``fold_error``, ``numerics``, ``non_finite``, ``runtime_error``); the int8
        ones are ``int8.failures``."""
        return comparison_failures(self, "ExecuTorch")

    def to_json(self) -> str:
        data = asdict(self)
        data.update(passed=self.passed, fp32_passed=self.fp32_passed, failures=self.failures,
                    int8=self.int8.to_dict() if self.int8 is not None else None)
        return json.dumps(data, indent=1, default=str)

    def __str__(self) -> str:
        inside, total = self.layers
        lines = [f"ExecuTorch program: {self.path} (XNNPACK, batch 1..{self.max_batch})"]
        lines += [f"  {t}" for t in self.transformed]
        lines.append("  inputs (memory-planned):  " + ", ".join(f"{n} {s}"
                                                               for n, s in self.inputs))
        lines.append("  outputs (memory-planned): " + ", ".join(f"{n} {s}"
                                                               for n, s in self.outputs))
        lines.append(f"  inside {self.delegates} executorch_call_delegate(s): "
                     f"{_ops(self.delegated_ops)}")
        lines.append(f"  outside: {_ops(self.outside_ops) or 'nothing'}")
        lines.append(f"  conv/linear layers inside the delegate: {inside}/{total}"
                     + (f" (outside: {', '.join(self.layers_outside)})"
                        if self.layers_outside else ""))
        lines.append(f"  runtime kernels: {', '.join(self.kernels) or 'none'}")
        lines.append(f"  file size {self.size_bytes.get('fp32', 0):,} B; memory-planned arena "
                     f"{self.arena_bytes:,} B (XNNPACK's own workspace not included)")
        if self.fold_error is not None:
            lines.append(f"  deployable copy vs given model: max rel {self.fold_error:.2e} "
                         f"({'ok' if self.fold_pass else 'FAIL'} at {self.fold_tolerance:g})")
        for trial, outputs in self.errors.items():
            for name, e in outputs.items():
                bad = e.get("nonfinite")
                text = (f"refused: {e['runtime_error']}" if "runtime_error" in e else
                        f"non-finite where torch is finite ({bad['nan']} NaN, {bad['inf']} inf)"
                        if bad else f"max abs {e['max_abs']:.2e}, max rel {e['max_rel']:.2e}")
                lines.append(f"  ExecuTorch [{trial}] {name}: {text} "
                             f"({'ok' if e['passed'] else 'FAIL'} at rtol={self.rtol:g}, "
                             f"atol={self.atol:g}·max|out|)")
        if self.latency_ms:
            over = self.latency_ms.get("call overhead")
            lines.append(f"  ExecuTorch latency (batch {self.latency_batch}, {self.threads} "
                         f"thread(s), median of {self.latency_runs}): fp32 "
                         f"{self.latency_ms['fp32']:.3f} ms, including the call overhead "
                         f"{over:.3f} ms (a one-op program on the same inputs: pybind call, "
                         f"input copy, output wrap)")
        lines.append("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        verdict = "PASS" if self.fp32_passed else "FAIL" if self.verified else \
            "not verified (verify=False)"
        lines.append(f"  fp32 verdict: {verdict}"
                     + "".join(f"\n  FAIL: {f['message']}" for f in self.failures))
        if self.int8 is not None:
            lines.append(str(self.int8))
        return "\n".join(lines)


def export_executorch(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                      quantize: str | Int8Config | None = None,
                      calibration: Iterable[Any] | None = None,
                      labels: Iterable[Any] | None = None, max_batch: int = 64,
                      verify: bool = True,
                      allow_nonfinite_outputs: bool = False) -> ExecuTorchReport:
    """Write the deployable, folded form of ``model`` as an ExecuTorch program (XNNPACK) at
    ``path`` (a ``.pte``), and verify the written file in ExecuTorch's runtime.

    ``example_inputs``: a tensor or a tuple of ``forward``'s positional arguments, whose
    first dimension is the batch (at most ``max_batch``). The program takes batches
    ``1..max_batch``. ``quantize="int8"`` (or an :class:`~expandfx.quantize.Int8Config`)
    also writes ``<stem>.int8.pte`` calibrated on ``calibration`` (input batches, the last
    ones held out to verify; ``labels``: one label tensor per batch, for accuracies), judged
    by the int8 gate of ``export_onnx`` (see the module docstring). ``verify=False`` skips
    the fp32 trials and the latency (the int8 program is always judged).
    ``allow_nonfinite_outputs`` as in ``export_onnx``.

    Returns an :class:`ExecuTorchReport`; raises
    :class:`~expandfx.onnx_export.VerificationError` carrying it when a check fails, after
    keeping the file as ``<stem>.failed.pte`` (``path`` then does not exist); NaN/inf in
    the parameters, buffers or inputs raise :class:`~expandfx.errors.NonFiniteError`;
    without executorch installed, :class:`~expandfx.errors.ConfigError` naming the extra.
    """
    logs: list[str] = []
    _require_executorch(logs)
    allow = allow_nonfinite_outputs
    with _renamed():
        config = as_config(quantize, calibration)
        if config is not None and config.method != "minmax":
            raise ConfigError(f"{VERB}: Int8Config(method={config.method!r}) is onnxruntime's "
                              f"calibration; XNNPACK's quantizer observes min/max ranges: use "
                              f"method='minmax' (the default).",
                              code="unsupported_calibration_method", where="Int8Config.method")
        inputs, deploy, base = _prepare(model, example_inputs, path, None, None)
    batch = _batch_of(inputs, max_batch)
    threads = (config or Int8Config()).threads
    runs = (config or Int8Config()).latency_runs
    report = ExecuTorchReport(path=base.path, max_batch=max_batch,
                              transformed=base.transformed, rtol=base.rtol, atol=base.atol,
                              fold_tolerance=base.fold_tolerance, threads=threads,
                              latency_runs=runs)
    with _renamed():
        if config is not None:  # refused before anything is written
            if model_dtype(deploy) != torch.float32:
                raise ConfigError(f"{VERB}: int8 calibration needs a float32 model; "
                                  f"{type(model).__name__} is "
                                  f"{str(model_dtype(deploy)).removeprefix('torch.')}: pass "
                                  f"model.float() (and float32 inputs and calibration "
                                  f"batches).", code="int8_needs_float32")
            calibration = check_calibration(calibration, inputs, config, fixed_batch=False)
            if labels is not None:
                labels = [torch.as_tensor(y) for y in labels]
                if len(labels) != len(calibration):
                    raise ConfigError(f"{VERB}: labels= has {len(labels)} entries for "
                                      f"{len(calibration)} calibration batches; give one label "
                                      f"tensor per batch (e.g. y.split(64) beside x.split(64)).")
        _check_runs(deploy, inputs, model, allow)
        deploy = _folded(deploy, inputs, report, allow)
    original = _original(model, report)  # type: ignore[arg-type]  # reads .transformed
    final = report.path
    final_int8 = int8_path(final, config) if config is not None else None
    try:
        with _threads(threads, logs):
            with _staging(final, final_int8) as staged:
                report.path = staged
                t0 = time.perf_counter()
                summary, buffer = _lower(deploy, inputs, max_batch, logs, model)
                report.timings["export"] = time.perf_counter() - t0
                with open(staged, "wb") as f:
                    f.write(buffer)
                _describe(report, summary, staged)
                what = None
                if verify:
                    t0 = time.perf_counter()
                    _verify(deploy, inputs, batch, report, original, allow, logs)
                    report.timings["verify"] = time.perf_counter() - t0
                    what = _problem(report)
                report.path = _settle(staged, final, passed=what is None)
            if what is not None:
                _remove(final_int8)  # an earlier run's int8 file belongs to an earlier program
                raise VerificationError(f"{VERB}: {what}. {_kept(report.path, final)}", report)
            if config is not None:
                with _staging(final_int8) as staged:
                    report.int8 = _quantize(deploy, inputs, calibration, labels, config, report,
                                            staged, logs, measure=verify)
                    report.int8.path = _settle(staged, final_int8, passed=report.int8.passed)
            elif verify:
                t0 = time.perf_counter()
                _measure(report, None, inputs, logs)
                report.timings["latency"] = time.perf_counter() - t0
    finally:
        report.export_log += "".join(logs)
    if report.int8 is not None and not report.int8.passed:
        raise VerificationError(
            f"{VERB}: the int8 program fails its check ({report.int8.failures[0]['message']}). "
            f"{_kept(report.int8.path, final_int8)} The fp32 program {final} passed and is in "
            f"place.", report)
    log.info("%s", report)
    return report


# ---- export and lowering --------------------------------------------------------------------

def _require_executorch(logs: list[str]) -> None:
    """Import executorch (its first import logs torchao's optional kernels it cannot load)."""
    try:
        with _quiet(logs):
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
            from executorch.backends.xnnpack.partition import xnnpack_partitioner  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{VERB}: ExecuTorch is not installed ({exc}); install the extra: "
                          f"{EXTRA} (wheels exist for Linux x86_64 and macOS arm64).",
                          code="missing_dependency", where="executorch") from exc


def _batch_of(inputs: tuple[torch.Tensor, ...], max_batch: int) -> int:
    """The batch of ``example_inputs`` (dim 0 of every input), checked against max_batch."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"{VERB}: max_batch={max_batch!r}: give the largest batch the program "
                          f"must take, an int >= 1 (its memory is planned for it).",
                          code="bad_max_batch", where="max_batch")
    sizes = {int(x.shape[0]) for x in inputs if x.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"{VERB}: every input must have the batch as its first dimension; "
                          f"example_inputs have first dimensions {sorted(sizes) or 'none'}.",
                          code="no_batch_dimension", where="example_inputs")
    batch = sizes.pop()
    if batch > max_batch:
        raise ConfigError(f"{VERB}: example_inputs have batch {batch} > max_batch={max_batch}: "
                          f"pass max_batch={batch} or more (the program takes batches "
                          f"1..max_batch).", code="batch_over_max", where="max_batch",
                          numbers={"batch": batch, "max_batch": max_batch})
    return batch


def _rebatched(inputs: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """The inputs with ``n`` rows, cycling through theirs (the export's example: the memory
    planner sizes each input for the example's batch, not for the declared maximum)."""
    return tuple(x[torch.arange(n) % x.shape[0]] if x.dim() > 0 else x for x in inputs)


def _dynamic(inputs: tuple[torch.Tensor, ...], max_batch: int) -> tuple[Any, ...] | None:
    if max_batch == 1:
        return None
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return tuple({0: batch} if x.dim() > 0 else None for x in inputs)


def _lower(module: nn.Module, inputs: tuple[torch.Tensor, ...], max_batch: int,
           logs: list[str], model: nn.Module | None = None) -> tuple[dict[str, Any], bytes]:
    """``torch.export`` at ``max_batch`` rows with the dynamic batch, lowered to XNNPACK:
    (:func:`_summary` of the lowered edge program, the .pte bytes)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = _rebatched(inputs, max_batch)
    name = type(model if model is not None else module).__name__
    step = "torch.export.export"
    try:
        with _quiet(logs), torch.no_grad():
            ep = torch.export.export(module, example, dynamic_shapes=_dynamic(inputs, max_batch))
            step = "to_edge_transform_and_lower (XNNPACK)"
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            summary = _summary(edge)  # before to_executorch, which rewrites it in place
            step = "to_executorch"
            return summary, edge.to_executorch().buffer
    except Exception as exc:  # the exporter raises many types; name the step and the fix
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = _ANSI.sub("", str(cause))
        hint = (f" The batch is exported as dynamic (1..{max_batch}): a forward that fixes "
                f"the batch cannot be, export with max_batch=1 or make the batch free."
                if any(w in text for w in ("onstraints violated", "specializ")) else "")
        error = ConfigError(f"{VERB}: {step} failed for {name} (eval mode, folded): "
                            f"{type(cause).__name__}: {_first_line(cause)}.{hint} The log is "
                            f"in the exception's export_log.", code="export_failed",
                            where=step)
        error.export_log = "".join(logs)  # type: ignore[attr-defined]
        raise error from exc


def _op(target: Any) -> str:
    """``aten.convolution``, ``aten.sym_size.int``, ``quantized_decomposed.quantize_per_tensor``."""
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
    else:
        name = getattr(target, "__name__", None) or str(target)
        if getattr(target, "__module__", None) == "_operator" and name != "getitem":
            name = f"operator.{name}"  # arithmetic on symbolic sizes
    return name.removesuffix(".default")


def _summary(edge: Any) -> dict[str, Any]:  # an EdgeProgramManager
    """What the lowered program runs where: ops inside the XNNPACK delegates (their original
    graphs) and outside them, the conv/linear layers and which read int8 weights."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    top = edge.exported_program().graph_module
    inside: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    layers, quantized, int8_bytes, out_layers = 0, 0, 0, []
    lowered = get_lowered_submodules(top)
    for _, module, _ in lowered:
        for node in module.original_module.graph.nodes:
            if node.op != "call_function" or _op(node.target) == "getitem":
                continue
            name = _op(node.target)
            inside[name] += 1
            if name in _LAYERS:
                layers += 1
                w = node.args[_LAYERS[name]] if len(node.args) > _LAYERS[name] else None
                if (isinstance(w, torch.fx.Node) and w.op == "call_function"
                        and _op(w.target) in _QUANTIZED):
                    src = w.args[0]
                    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
                    if val is not None and val.dtype == torch.int8:
                        quantized += 1
                        int8_bytes += val.numel() * val.element_size()
    for node in top.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op(node.target)
        if name in ("getitem", "executorch_call_delegate"):
            continue
        outside[name] += 1
        if any(name.startswith(k) for k in _LAYERS) or "convolution" in name:
            out_layers.append(f"{name} ({node.name})")
    return {"inside": dict(sorted(inside.items())), "outside": dict(sorted(outside.items())),
            "delegates": len(lowered), "layers": (layers, layers + len(out_layers)),
            "quantized": quantized, "int8_bytes": int8_bytes, "layers_outside": out_layers}


def _plan(path: str) -> dict[str, Any]:
    """What a written .pte's execution plan says: the memory-planned arena in bytes
    (``non_const_buffer_sizes``, entry 0 reserved), the kernels (``operators``) and the planned
    sizes of the inputs and outputs."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    with open(path, "rb") as f:
        program = deserialize_pte_binary(f.read()).program
    plan = program.execution_plan[0]
    kernels = [op.name + (f".{op.overload}" if op.overload not in ("", "default") else "")
               for op in plan.operators]

    def sizes(indices: list[int], what: str) -> list[tuple[str, list[int]]]:
        return [(f"{what}[{k}]", list(getattr(plan.values[i].val, "sizes", [])))
                for k, i in enumerate(indices)]

    return {"arena": int(sum(plan.non_const_buffer_sizes[1:])), "kernels": sorted(set(kernels)),
            "inputs": sizes(plan.inputs, "input"), "outputs": sizes(plan.outputs, "output")}


def _describe(report: ExecuTorchReport, s: dict[str, Any], path: str) -> None:
    report.delegated_ops, report.outside_ops = s["inside"], s["outside"]
    report.delegates, report.layers = s["delegates"], (s["layers"][0], s["layers"][1])
    report.layers_outside = s["layers_outside"]
    plan = _plan(path)
    report.arena_bytes, report.kernels = plan["arena"], plan["kernels"]
    report.inputs, report.outputs = plan["inputs"], plan["outputs"]
    report.size_bytes = {"fp32": os.path.getsize(path)}


# ---- running the program ----------------------------------------------------------------------

def _load(path: str) -> Any:
    """The ``forward`` Method of the program in the file, freshly loaded."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path).load_method("forward")


def _run(method: Any, trial: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out = method.execute([x.contiguous() for x in trial])
    return [t.detach().float() for t in out if isinstance(t, torch.Tensor)]


def _sequence(inputs: tuple[torch.Tensor, ...], batch: int, max_batch: int
              ) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """The fp32 trials, in the order they run on one Method: growing batches up to
    ``max_batch``, then back to ``example_inputs``."""
    gen = torch.Generator().manual_seed(0)

    def rand(n: int) -> tuple[torch.Tensor, ...]:
        return tuple(_like(x, gen, batch=n) if x.dim() > 0 else x for x in inputs)

    trials = [("random, batch 1", rand(1))] if batch > 1 else []
    trials += [(f"example_inputs, batch {batch}", inputs),
               (f"random, batch {batch}", rand(batch))]
    mid = (batch + max_batch) // 2
    if batch < mid < max_batch:
        trials.append((f"random, batch {mid}", rand(mid)))
    if max_batch > batch:
        trials.append((f"random, batch {max_batch} (max_batch)", rand(max_batch)))
    trials.append((f"example_inputs again, batch {batch}", inputs))
    return trials


def _verify(deploy: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int,
            report: ExecuTorchReport, original: nn.Module | None, allow: bool,
            logs: list[str]) -> None:
    trials = _sequence(inputs, batch, report.max_batch)
    with torch.no_grad():
        expected = []
        for name, trial in trials:
            try:
                expected.append(_outputs(deploy, trial))
            except Exception as exc:  # the example ran: another batch size failed
                raise ConfigError(f"{VERB}: {type(deploy).__name__} fails on the trial "
                                  f"'{name}' ({type(exc).__name__}: {_first_line(exc)}); the "
                                  f"program must take batches 1..max_batch={report.max_batch}."
                                  ) from exc
            check_outputs(expected[-1], None, f"{VERB} ({name})", allow=allow)
        if original is not None:  # the deployable copy must compute what the user's model does
            report.fold_error = _worst(finite_rel_error(_outputs(original, t), want)
                                       for (_, t), want in zip(trials, expected, strict=True))
    with _quiet(logs):
        method = _load(report.path)
        for (name, trial), want in zip(trials, expected, strict=True):
            stats: dict[str, dict[str, Any]] = {}
            try:
                got = _run(method, trial)
            except Exception as exc:  # the runtime raises RuntimeError with its error code
                stats["<execute>"] = {"max_abs": math.inf, "max_rel": math.inf, "passed": False,
                                      "runtime_error": _first_line(exc),
                                      "batch": _samples(trial)}
                report.errors[name] = stats
                continue
            if len(got) != len(want):
                stats["<outputs>"] = {"max_abs": math.inf, "max_rel": math.inf, "passed": False}
            else:
                for i, (g, w) in enumerate(zip(got, want, strict=True)):
                    s = stats.setdefault(f"output[{i}]",
                                         {"max_abs": 0.0, "max_rel": 0.0, "passed": True})
                    _compare(s, w, g, report)  # type: ignore[arg-type]  # rtol/atol duck-typed
            report.errors[name] = stats
        del method
    report.verified = True


def _problem(report: ExecuTorchReport) -> str | None:
    if report.fp32_passed:
        return None
    if not report.fold_pass:
        return "the deployable (contracted/baked/folded) copy differs from the given model"
    refused = sorted({f["numbers"]["batch"] for f in report.failures
                      if f["code"] == "runtime_error"})
    if refused:
        ran = sorted({int(t.rsplit("batch ", 1)[1].split()[0]) for t, e in report.errors.items()
                      if "<execute>" not in e})
        hint = (f"; batch {max(ran)} ran: this ExecuTorch made a program that runs only some "
                f"batches of 1..{report.max_batch} (measured: batch 16 only, for "
                f"smallnet_digits at max_batch=16), try another max_batch"
                if ran and max(ran) > min(refused) else "")
        return (f"the ExecuTorch runtime refused batch(es) {', '.join(map(str, refused))}, "
                f"which the program must take (1..max_batch={report.max_batch}){hint}")
    return "ExecuTorch disagrees with torch"


# ---- int8 -------------------------------------------------------------------------------------

def _chunks(batch: tuple[torch.Tensor, ...], n: int) -> list[tuple[torch.Tensor, ...]]:
    """A batch split into pieces of at most ``n`` rows (the program's max_batch)."""
    rows = _samples(batch)
    return [tuple(t[i:i + n] if t.dim() > 0 else t for t in batch) for i in range(0, rows, n)]


def _quantize(deploy: nn.Module, inputs: tuple[torch.Tensor, ...],
              batches: list[tuple[torch.Tensor, ...]], labels: list[torch.Tensor] | None,
              config: Int8Config, fp32: ExecuTorchReport, out: str, logs: list[str],
              measure: bool) -> ExecuTorchInt8Report:
    """PT2E int8 with XNNPACK's quantizer, lowered, written to ``out``, run and judged."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    n = fp32.max_batch
    calib, held = _split(batches, config.holdout)
    report = ExecuTorchInt8Report(
        path=out, fp32_path=fp32.path, config=asdict(config), calibration_batches=len(calib),
        heldout_batches=len(held), heldout_samples=sum(_samples(b) for b in held),
        verified_on=[*VERIFY_ON[config.verify_on], MAX_SET])
    t0 = time.perf_counter()
    try:  # prepared from the dynamic-batch export: calibration batches of any size <= n run
        with _quiet(logs), torch.no_grad():
            graph = torch.export.export(deploy, _rebatched(inputs, n),
                                        dynamic_shapes=_dynamic(inputs, n)).module()
            quantizer = XNNPACKQuantizer()
            quantizer.set_global(
                get_symmetric_quantization_config(is_per_channel=config.per_channel))
            prepared = prepare_pt2e(graph, quantizer)
            for b in calib:
                for piece in _chunks(b, n):
                    prepared(*piece)
            converted = convert_pt2e(prepared)
    except Exception as exc:  # torchao and torch.export raise many types: name the step
        error = ConfigError(f"{VERB}: PT2E int8 quantization (XNNPACKQuantizer, torchao "
                            f"prepare_pt2e/convert_pt2e) failed for the folded "
                            f"{type(deploy).__name__}: {type(exc).__name__}: "
                            f"{_first_line(exc)}. The fp32 program {fp32.path} passed and is "
                            f"in place; the log is in the exception's export_log.",
                            code="quantize_failed", where="prepare_pt2e")
        error.export_log = "".join(logs)  # type: ignore[attr-defined]
        raise error from exc
    s, buffer = _lower(converted, inputs, n, logs, deploy)
    with open(out, "wb") as f:
        f.write(buffer)
    report.timings["quantize"] = time.perf_counter() - t0
    report.delegated_ops, report.outside_ops = s["inside"], s["outside"]
    report.op_histogram = dict(sorted((Counter(s["inside"]) + Counter(s["outside"])).items()))
    report.quantized_layers = (s["quantized"], s["layers"][1])
    report.int8_weight_elements = s["int8_bytes"]
    report.layers_outside = s["layers_outside"]
    plan = _plan(out)
    report.arena_bytes, report.kernels = plan["arena"], plan["kernels"]
    report.size_bytes = {"fp32": os.path.getsize(fp32.path), "int8": os.path.getsize(out)}

    # one Method, in sequence: example_inputs, the held-out batches, max_batch, example again
    t0 = time.perf_counter()
    rows = tuple(torch.cat([b[j] for b in held]) if held[0][j].dim() > 0 else held[0][j]
                 for j in range(len(inputs)))  # the held-out rows, cycled to each size
    sizes = sorted({1, (_samples(inputs) + n) // 2, n})
    runs = [("example_inputs", inputs)] + [("held-out", p) for b in held for p in _chunks(b, n)]
    runs += [(MAX_SET, _rebatched(rows, k)) for k in sizes] + [("example_inputs", inputs)]
    ref: dict[str, list[np.ndarray]] = {}
    got: dict[str, list[np.ndarray]] = {}
    tops: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    refused: dict[str, str] = {}
    with _quiet(logs):
        method = _load(out)
        for where, trial in runs:
            with torch.no_grad():
                want = [t.numpy() for t in _outputs(deploy, trial)]
            try:
                have = [t.numpy() for t in _run(method, trial)]
            except Exception as exc:  # the runtime raises RuntimeError with its error code
                refused.setdefault(where, f"batch {_samples(trial)}: {_first_line(exc)}")
                continue
            if len(have) != len(want) or any(a.shape != b.shape
                                               for a, b in zip(have, want, strict=True)):
                refused.setdefault(where, "the outputs differ in number or shape from torch's")
                continue
            ref.setdefault(where, []).extend(want)
            got.setdefault(where, []).extend(have)
            if _is_classifier(want[0]):
                tops.setdefault(where, []).append((want[0].argmax(-1), have[0].argmax(-1)))
        del method
    for where in dict.fromkeys(w for w, _ in runs):
        report.sqnr_db[where] = (math.nan if where in refused else
                                 sqnr_db(ref[where], got[where]))
        if where in tops and where not in refused:
            report.agreement[where] = float(np.concatenate([a == b for a, b in tops[where]])
                                            .mean())
    if labels is not None and "held-out" in tops and "held-out" not in refused:
        ys = np.concatenate([y.numpy().reshape(-1) for y in labels[len(calib):]])
        for name, k in (("fp32", 0), ("int8", 1)):
            pred = np.concatenate([t[k] for t in tops["held-out"]])
            if len(pred) == len(ys):
                report.accuracy[name] = float((pred == ys).mean())
    report.timings["verify"] = time.perf_counter() - t0
    if measure:
        t0 = time.perf_counter()
        pieces = [p for b in held for p in _chunks(b, n)]
        sizes = [_samples(p) for p in pieces]
        _measure(fp32, report, pieces[sizes.index(max(sizes))], logs)
        report.timings["latency"] = time.perf_counter() - t0
    _judge(report, config)
    if refused:  # a refused run is a runtime error, not "the outputs hold NaN/inf"
        report.failures[:] = [f for f in report.failures
                              if not (f["code"] == "non_finite" and f["where"] in refused)]
        report.failures[:0] = [failure(
            "runtime_error", f"{where}: the ExecuTorch runtime refused the int8 program's run "
            f"({why})", where=where) for where, why in refused.items()]
    return report


# ---- latency ------------------------------------------------------------------------------------

class _Touch(nn.Module):
    """One cheap op per input: what a call costs beyond the model (the overhead program)."""

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x + 1 for x in xs)


def _measure(report: ExecuTorchReport, int8: ExecuTorchInt8Report | None,
             feeds: tuple[torch.Tensor, ...], logs: list[str]) -> None:
    """Median ms per run of the fp32 (and int8) program and of the overhead program, on the
    same inputs, warmed up and interleaved (the order alternates), fresh Methods."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    with _quiet(logs), torch.no_grad():
        ep = torch.export.export(_Touch(), feeds)
        touch = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]
                                            ).to_executorch().buffer
        methods = {"fp32": _load(report.path)}
        if int8 is not None:
            methods["int8"] = _load(int8.path)
        methods["call overhead"] = Runtime.get().load_program(touch).load_method("forward")
        args = [x.contiguous() for x in feeds]
        times: dict[str, list[float]] = {k: [] for k in methods}
        order = list(methods.items())
        for i in range(report.latency_runs + _WARMUP):
            for name, method in order if i % 2 else order[::-1]:
                t0 = time.perf_counter()
                method.execute(args)
                if i >= _WARMUP:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        del methods, order, method
    medians = {k: statistics.median(v) for k, v in times.items()}
    report.latency_batch = _samples(feeds)
    report.latency_ms = {"fp32": medians["fp32"], "call overhead": medians["call overhead"]}
    if int8 is not None:
        int8.latency_batch = report.latency_batch
        int8.latency_ms = {"fp32": medians["fp32"], "int8": medians["int8"]}


# ---- process state: thread pool, output capture, error wording -----------------------------------

@contextlib.contextmanager
def _threads(n: int, logs: list[str]) -> Iterator[None]:
    """ExecuTorch's thread pool at ``n`` threads for the body, restored afterwards. The pool is
    replaced (``_unsafe_reset_threadpool``), so programs are loaded inside the body only and
    dropped before it ends."""
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )

    with _quiet(logs):  # the pool's creation logs what cpuinfo finds
        before = _threadpool_get_thread_count()
    if before != n:
        with _quiet(logs):  # the runtime logs "Resetting threadpool to n threads."
            _unsafe_reset_threadpool(n)
    try:
        yield
    finally:
        gc.collect()  # no Method of ours may outlive the pool it was loaded with
        if before != n and before > 0:
            with _quiet(logs):
                _unsafe_reset_threadpool(before)


@contextlib.contextmanager
def _quiet(into: list[str]) -> Iterator[None]:
    """What executorch, torchao and the runtime print: Python warnings (recorded once each),
    torch's loggers and sys.stdout/stderr (``_captured``), and the C++ runtime's lines written
    straight to file descriptors 1 and 2 — all appended to ``into``."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    sink = tempfile.TemporaryFile()
    saved: list[int] = []
    try:
        with contextlib.suppress(OSError):
            for fd in (1, 2):
                saved.append(os.dup(fd))
                os.dup2(sink.fileno(), fd)
        with _captured(into), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                seen = dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
                into.extend(f"{line}\n" for line in seen)
    finally:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).fflush(None)  # C stdio buffers, before the descriptors go back
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, old in zip((1, 2), saved, strict=False):
            os.dup2(old, fd)
            os.close(old)
        sink.seek(0)
        into.append(_ANSI.sub("", sink.read().decode(errors="replace")))
        sink.close()


@contextlib.contextmanager
def _renamed() -> Iterator[None]:
    """The checks shared with ``export_onnx`` name it in their messages: say this verb."""
    try:
        yield
    except ExpandFXError as exc:
        text = str(exc)
        if "export_onnx" not in text:
            raise
        new = type(exc)(text.replace("export_onnx", VERB), code=exc.code, where=exc.where,
                        numbers=exc.numbers)
        raise new from exc.__cause__


def _ops(histogram: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in histogram.items())
