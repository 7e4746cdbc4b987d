"""int8 deployment: static QDQ quantization in onnxruntime, calibrated and verified.

``export_onnx(model, x, path, quantize="int8", calibration=batches)`` runs this after the
fp32 export (contracted and folded copy, verified as usual). The stages, in order:

0. *refuse* what cannot be right, before any file is written (:func:`check_calibration`):
   batches of another shape than ``example_inputs`` (but the batch dimension), NaN/inf in a
   batch, and — a heuristic, see :class:`Int8Config` — batches whose per-channel spread is
   unlike the example inputs' or near-constant;
1. *pre-process* — onnxruntime's ``quant_pre_process`` (shape inference and graph
   optimization, e.g. Conv+BatchNorm fusion) on a copy of the fp32 file;
2. *calibrate and quantize* — ``quantize_static`` in QDQ format, int8 weights (per output
   channel by default) and int8 activations, whose ranges come from the calibration batches;
   the last ``holdout`` batches are kept out of calibration (a fixed split: the same call
   gives the same verdict);
3. *check* — ``onnx.checker`` with the full check on the int8 file;
4. *verify* — fp32 and int8 sessions on ``example_inputs`` and on the held-out batches:
   SQNR in dB (``10·log10(Σ y² / Σ (y − y_int8)²)`` over every output), top-1 agreement when
   the first output is a ``[batch, classes]`` tensor, accuracy of both when labels are given;
5. *measure* — file sizes, and the latency of both sessions (same batch, same threads,
   alternating runs, medians) as one ratio.

An int8 model cannot match fp32 to 1e-5 (docs/design.md §4), so it is verified by its
deviation instead (§6): the verdict fails when *any* set it rests on — ``example_inputs``
and the held-out batches, or the held-out batches alone with ``verify_on="held-out"`` —
is below ``min_sqnr_db`` (or ``min_agreement``, when set), or when fewer than
``min_samples`` samples are held out. ``export_onnx`` then raises ``VerificationError``
with the report, whose ``failures`` are machine-readable (``code``, ``where``,
``numbers``), and keeps the file as ``<stem>.int8.failed.onnx`` only.

Example::

    >>> import torch, tempfile, os, expandfx as efx
    >>> from expandfx.models import smallnet_digits
    >>> x = torch.rand(256, 1, 8, 8)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> report = efx.export_onnx(smallnet_digits().eval(), (x[:4],), path, quantize="int8",
    ...                          calibration=x.split(32))
    >>> report.int8.passed, report.int8.size_bytes["int8"] < report.int8.size_bytes["fp32"]
    (True, True)
    >>> report.int8.verified_on, report.int8.heldout_samples
    (['example_inputs', 'held-out'], 64)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, failure
from .finite import check_inputs

__all__ = ["METHODS", "VERIFY_ON", "Int8Config", "Int8Report", "as_config",
           "check_calibration", "failed_path", "int8_path", "quantize_onnx", "split_samples",
           "sqnr_db"]

#: onnxruntime's calibration methods, by the names ``Int8Config.method`` takes.
#: Not offered: ``Entropy`` (onnxruntime 1.32's quantize_static passes no bin count to its
#: entropy calibrator, whose default of 128 bins for 128 quantized bins can only choose the
#: full range: the scales came out identical to minmax on every model of the study) and
#: ``Distribution`` (meant for float8; 8 dB on int8 here).
METHODS = ("minmax", "percentile")

#: The sets the int8 verdict can rest on (``Int8Config.verify_on``).
VERIFY_ON = {"all": ("example_inputs", "held-out"), "held-out": ("held-out",)}

_SPREAD = (0.25, 4.0)  # calibration std / example_inputs std allowed, per channel
_FLAT = 1e-3  # a channel whose std is at most this × |mean| is (nearly) constant


@dataclass(frozen=True)
class Int8Config:
    """How to quantize and when to refuse the result; checked at construction.

    - ``method``: how activation ranges are taken from the calibration batches
      (onnxruntime's ``CalibrationMethod``): ``"minmax"`` (default; the most robust on the
      study's models, benchmarks/results/quantization.md) or ``"percentile"`` (ranges
      clipped at the 99.999th percentile of a 2048-bin histogram). See ``METHODS``.
    - ``per_channel``: one weight scale per output channel (default) or one per tensor.
    - ``min_sqnr_db``: the SQNR below which the export fails, on every set in ``verify_on``
      (default 20 dB: every trained model of the study is above 25 dB at either
      granularity, a calibration on constant inputs gives about 0 dB on real inputs; 20 dB
      is an output error of 10 % of its RMS). ``None`` turns the check off.
    - ``min_agreement``: the top-1 agreement below which it fails, on the same sets (default
      ``None``: off, since near-ties on random or untrained weights flip without harm).
    - ``verify_on``: the sets the verdict rests on. ``"all"`` (default): ``example_inputs``
      *and* the held-out batches — a calibration unlike the real inputs fails on
      ``example_inputs`` even when the held-out batches, drawn from the same wrong set,
      agree. ``"held-out"``: only the held-out batches, for when ``example_inputs`` are
      only a shape hint (e.g. random); their SQNR is still reported, not gating.
    - ``min_samples``: the fewest held-out samples a verdict may rest on (default 64); with
      fewer the check fails — give more batches or a larger ``holdout``, or lower it.
    - ``holdout``: the last batches kept out of calibration, a count (int ≥ 1) or a
      fraction of the batches (0 < f < 1; default 0.25, at least one batch). The split is
      by position, never random: the same call gives the same verdict.
    - ``check_calibration``: refuse calibration sets that look wrong (default True). This
      is a heuristic, meant to catch the common mistakes (all-zero or constant batches,
      pixels not scaled like the inputs, noise of the wrong scale) before a file is written,
      not a proof: per input channel (dim 1 of a batch of rank ≥ 2, the whole tensor
      otherwise), over the calibration batches and, separately, the held-out ones, the std
      must be within [1/4, 4]× the std of ``example_inputs`` and above 1e-3·|mean|. Where a
      channel of ``example_inputs`` is itself constant (std 0, e.g. one sample of a
      ``[batch, features]`` input) the ratio means nothing and only the second test
      applies; with ``verify_on="held-out"`` (``example_inputs`` a shape hint) the ratio is
      not applied at all. A shift of the mean, or a wrong distribution of the right spread,
      passes it: the SQNR on ``example_inputs`` is what catches those.
    - ``path``: the int8 file (default: ``<fp32 stem>.int8.onnx`` beside the fp32 file).
    - ``latency_runs``, ``threads``: the latency measurement (runs per model, onnxruntime
      intra-op threads).
    """

    method: str = "minmax"
    per_channel: bool = True
    min_sqnr_db: float | None = 20.0
    min_agreement: float | None = None
    verify_on: str = "all"
    min_samples: int = 64
    holdout: float = 0.25
    check_calibration: bool = True
    path: str | None = None
    latency_runs: int = 30
    threads: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Int8Config: unknown calibration method {self.method!r}; use "
                              f"one of {', '.join(METHODS)}.")
        if self.verify_on not in VERIFY_ON:
            raise ConfigError(f"Int8Config: verify_on={self.verify_on!r}; use 'all' "
                              f"(example_inputs and the held-out batches) or 'held-out' (when "
                              f"example_inputs are only a shape hint).")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"Int8Config: min_agreement={self.min_agreement} is a fraction "
                              f"of the held-out samples; give a value in [0, 1] or None.")
        whole = isinstance(self.holdout, int) and not isinstance(self.holdout, bool)
        if not ((whole and self.holdout >= 1) or (not whole and 0.0 < self.holdout < 1.0)):
            raise ConfigError(f"Int8Config: holdout={self.holdout!r}: give a number of batches "
                              f"(int >= 1) or a fraction of them (0 < f < 1).")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ConfigError(f"Int8Config: min_samples={self.min_samples!r}: give the fewest "
                              f"held-out samples a verdict may rest on, an int >= 1.")
        if self.latency_runs < 1 or self.threads < 1:
            raise ConfigError("Int8Config: latency_runs and threads must be >= 1.")


@dataclass
class Int8Report:
    """What the int8 file holds, how far it is from fp32, and what it costs.

    ``failures``: one dict per missed check, ``{"code", "where", "numbers", "message"}``
    (codes ``"sqnr"``, ``"agreement"``, ``"min_samples"``, ``"non_finite"``);
    ``verified_on``: the sets the verdict rests on.
    """

    path: str
    fp32_path: str
    config: dict[str, Any]
    calibration_batches: int = 0
    heldout_batches: int = 0
    heldout_samples: int = 0
    verified_on: list[str] = field(default_factory=list)
    op_histogram: dict[str, int] = field(default_factory=dict)
    quantized_layers: tuple[int, int] = (0, 0)  # (with int8 weights, all Conv/Gemm/MatMul)
    int8_weight_elements: int = 0
    sqnr_db: dict[str, float] = field(default_factory=dict)  # "example_inputs", "held-out"
    agreement: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # "fp32", "int8" (held-out)
    size_bytes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # medians, per batch
    latency_batch: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def latency_ratio(self) -> float:
        return self.latency_ms.get("int8", math.nan) / self.latency_ms.get("fp32", math.nan)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "latency_ratio": self.latency_ratio}

    def __str__(self) -> str:
        c = self.config
        q, n = self.quantized_layers
        lines = [f"int8 export: {self.path} (QDQ, {c['method']} calibration, "
                 f"{'per-channel' if c['per_channel'] else 'per-tensor'} int8 weights)",
                 f"  calibrated on {self.calibration_batches} batch(es); verified on "
                 f"{' and '.join(self.verified_on)} ({self.heldout_batches} held-out "
                 f"batch(es), {self.heldout_samples} samples)",
                 f"  int8 weights: {q}/{n} Conv/Gemm/MatMul layers "
                 f"({self.int8_weight_elements:,} elements); "
                 f"QuantizeLinear×{self.op_histogram.get('QuantizeLinear', 0)}, "
                 f"DequantizeLinear×{self.op_histogram.get('DequantizeLinear', 0)}"]
        for where, value in self.sqnr_db.items():
            agree = self.agreement.get(where)
            lines.append(f"  int8 vs fp32 [{where}]: SQNR {value:.1f} dB"
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
            lines.append(f"  onnxruntime latency (batch {self.latency_batch}, {c['threads']} "
                         f"thread(s), median of {c['latency_runs']}): fp32 "
                         f"{self.latency_ms['fp32']:.3f} ms, int8 {self.latency_ms['int8']:.3f}"
                         f" ms ({self.latency_ratio:.2f}×)")
        rule = [f"SQNR ≥ {c['min_sqnr_db']:g} dB" if c["min_sqnr_db"] is not None else "",
                f"agreement ≥ {c['min_agreement']:g}" if c["min_agreement"] is not None
                else ""]
        rule = " and ".join(t for t in rule if t) or "no threshold"
        lines.append(f"  int8 verdict: {'PASS' if self.passed else 'FAIL'} ({rule} on "
                     f"{' and '.join(self.verified_on)}, ≥ {c['min_samples']} held-out "
                     f"samples)" + "".join(f"\n  FAIL: {f['message']}" for f in self.failures))
        return "\n".join(lines)


def as_config(quantize: str | Int8Config | None, calibration: Any) -> Int8Config | None:
    """The config for ``export_onnx(quantize=...)``; checks that there is calibration data."""
    if quantize is None:
        if calibration is not None:
            raise ConfigError("export_onnx: calibration= is given but quantize= is not; pass "
                              "quantize='int8' to write an int8 model calibrated on it.")
        return None
    if isinstance(quantize, str):
        if quantize != "int8":
            raise ConfigError(f"export_onnx: quantize={quantize!r} is not supported; use "
                              f"'int8' or an expandfx.Int8Config.")
        quantize = Int8Config()
    if not isinstance(quantize, Int8Config):
        raise ConfigError(f"export_onnx: quantize must be 'int8' or an Int8Config, got "
                          f"{type(quantize).__name__}.")
    if calibration is None:
        raise ConfigError("export_onnx: quantize='int8' needs calibration=batches: an iterable "
                          "of input batches (tensors, or tuples as forward takes them), "
                          "e.g. x_train[:512].split(64); the last ones are held out to verify.")
    return quantize


def int8_path(fp32_path: str | os.PathLike, config: Int8Config) -> str:
    if config.path is not None:
        return os.fspath(config.path)
    root, ext = os.path.splitext(os.fspath(fp32_path))
    return f"{root}.int8{ext or '.onnx'}"


def failed_path(path: str | os.PathLike) -> str:
    """Where a file that failed its check is kept: ``m.onnx`` → ``m.failed.onnx``.

    >>> failed_path("out/m.int8.onnx")
    'out/m.int8.failed.onnx'
    """
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.failed{ext or '.onnx'}"


def split_samples(x: torch.Tensor, y: torch.Tensor | None = None, calibrate: int = 256,
                  batch: int = 64) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
    """``(batches, labels, holdout)`` for ``export_onnx``: the first ``calibrate`` samples of
    ``x`` to calibrate on, the rest held out to verify, in batches of ``batch``.

        >>> batches, labels, held = split_samples(torch.zeros(300, 4), calibrate=256)
        >>> len(batches), held
        (5, 1)
    """
    if calibrate < 1 or len(x) <= calibrate:
        raise ConfigError(f"split_samples: {len(x)} samples cannot give {calibrate} to "
                          f"calibrate on and at least one held out: use fewer (--calibrate) or "
                          f"more data.")
    batches = list(x[:calibrate].split(batch)) + list(x[calibrate:].split(batch))
    labels = None if y is None else list(y[:calibrate].split(batch)) + list(
        y[calibrate:].split(batch))
    return batches, labels, len(x[calibrate:].split(batch))


def sqnr_db(reference: Sequence[np.ndarray], quantized: Sequence[np.ndarray]) -> float:
    """``10·log10(Σ ref² / Σ (ref − q)²)`` over all elements of all arrays (inf if equal;
    NaN when either holds NaN or inf, which fails every threshold)."""
    signal = sum(float(np.square(r.astype(np.float64)).sum()) for r in reference)
    noise = sum(float(np.square(r.astype(np.float64) - q.astype(np.float64)).sum())
                for r, q in zip(reference, quantized, strict=True))
    if math.isnan(signal) or math.isnan(noise) or math.isinf(signal):
        return math.nan
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def check_calibration(calibration: Iterable[Any], example_inputs: tuple[torch.Tensor, ...],
                      config: Int8Config, fixed_batch: bool = False
                      ) -> list[tuple[torch.Tensor, ...]]:
    """The calibration batches as tuples, or ConfigError naming the batch and the fix: a
    batch that is not tensors, or not shaped like ``example_inputs`` but for the batch
    dimension (``fixed_batch``: that one too), or holds NaN/inf (NonFiniteError); then,
    with ``config.check_calibration``, the spread heuristic of :class:`Int8Config`."""
    batches = [_as_batch(b, i) for i, b in enumerate(calibration)]
    for i, batch in enumerate(batches):
        _check_shapes(i, batch, example_inputs, fixed_batch)
        check_inputs(batch, "export_onnx (int8 calibration)", f"calibration[{i}]")
    if config.check_calibration:
        calib, held = _split(batches, config.holdout)
        for what, part in (("calibration", calib), ("held-out", held)):
            _check_spread(what, part, example_inputs, ratio=config.verify_on == "all")
    return batches


def _check_shapes(index: int, batch: tuple[torch.Tensor, ...],
                  example_inputs: tuple[torch.Tensor, ...], fixed_batch: bool) -> None:
    if len(batch) != len(example_inputs):
        raise ConfigError(f"export_onnx: calibration batch {index} holds {len(batch)} "
                          f"tensor(s) but the model takes {len(example_inputs)} input(s), as "
                          f"example_inputs do: give each batch as forward takes it (a tuple "
                          f"for several inputs), without labels (pass labels= separately).",
                          code="calibration_shape", where=f"calibration[{index}]")
    for j, (t, e) in enumerate(zip(batch, example_inputs, strict=True)):
        free = 0 if fixed_batch else 1
        if t.dim() != e.dim() or t.shape[free:] != e.shape[free:]:
            which = "" if len(batch) == 1 else f" (input {j})"
            but = "in every dimension (dynamic_batch=False)" if fixed_batch else \
                "in every dimension but the first (the batch)"
            raise ConfigError(f"export_onnx: calibration batch {index} has shape "
                              f"{tuple(t.shape)}{which} but example_inputs have "
                              f"{tuple(e.shape)}: a calibration batch must match them {but}; "
                              f"reshape or preprocess the batches like example_inputs.",
                              code="calibration_shape", where=f"calibration[{index}]",
                              numbers={"batch": index, "input": j, "shape": list(t.shape),
                                       "expected": list(e.shape)})


def _channel_stats(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) over tensors of one input, in float64, in two passes:
    channels along dim 1 of a batch of rank ≥ 2, the whole tensor otherwise."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu().double()
        return t.transpose(0, 1).reshape(t.shape[1], -1) if t.dim() >= 2 else t.reshape(1, -1)

    n = sum(rows(t).shape[1] for t in tensors)
    mean = sum(rows(t).sum(1) for t in tensors) / max(n, 1)
    var = sum(((rows(t) - mean[:, None]) ** 2).sum(1) for t in tensors) / max(n, 1)
    return mean, var.sqrt()


def _check_spread(what: str, part: list[tuple[torch.Tensor, ...]],
                  example_inputs: tuple[torch.Tensor, ...], ratio: bool) -> None:
    """The heuristic of ``Int8Config.check_calibration`` on one part of the batches."""
    for j, e in enumerate(example_inputs):
        if not e.is_floating_point():
            continue
        mean, std = _channel_stats([b[j] for b in part])
        _, e_std = _channel_stats([e])
        flat = std <= _FLAT * mean.abs()
        spread = std / e_std
        unlike = (e_std > 0) & ((spread < _SPREAD[0]) | (spread > _SPREAD[1]))
        bad = flat if flat.any() else unlike if ratio else flat
        if not bad.any():
            continue
        c = int(bad.nonzero()[0])
        name = f"input {j} channel {c}" if len(example_inputs) > 1 else f"channel {c}"
        s, m, es, r, k = (float(std[c]), float(mean[c]), float(e_std[c]), float(spread[c]),
                          int(bad.sum()))
        count = f"{k} of {len(std)} channel(s)"
        if flat.any():
            cause = (f"are (nearly) constant in {name}: std {s:.3g} ≤ {_FLAT:g}·|mean {m:.3g}| "
                     f"({count}); int8 ranges calibrated on them would clip real inputs. "
                     f"Give real inputs, preprocessed like example_inputs (e.g. "
                     f"x_train[:512].split(64)); if this set is right (a channel constant "
                     f"by design)")
        else:
            cause = (f"are unlike example_inputs in {name}: std {s:.3g} is {r:.3g}× "
                     f"example_inputs' {es:.3g}, outside [1/4, 4]× ({count}). Preprocess "
                     f"them exactly like example_inputs (same scaling, e.g. [0, 1] not "
                     f"0–255; same normalization); if example_inputs are only a shape hint, "
                     f"pass Int8Config(verify_on='held-out'); if this set is right")
        raise ConfigError(
            f"export_onnx: the {what} batches {cause}, pass Int8Config(check_calibration=False)"
            f" (a heuristic; the SQNR check still applies).", code="calibration_unlike_inputs",
            where=f"{what} {name}",
            numbers={"input": j, "channel": c, "std": s, "mean": m, "example_std": es,
                     "ratio": r, "channels": k, "of": len(std)})


def quantize_onnx(fp32_path: str, example_inputs: tuple[torch.Tensor, ...], calibration: Any,
                  labels: Any, config: Int8Config, out: str | None = None) -> Int8Report:
    """Quantize the fp32 file, check and verify the int8 file; return the report.

    ``calibration``: an iterable of batches (tensors or tuples of tensors), refused as
    :func:`check_calibration` says; ``labels``: ``None`` or one label tensor per batch;
    ``out``: where to write (default :func:`int8_path`). The report's ``failures`` say which
    check was missed (the caller raises).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph = onnx.load(fp32_path, load_external_data=False).graph
    names = [i.name for i in graph.input]
    fixed = bool(graph.input) and all(not d.dim_param for d in
                                      graph.input[0].type.tensor_type.shape.dim[:1])
    batches = check_calibration(calibration, example_inputs, config, fixed_batch=fixed)
    label_list = None if labels is None else [torch.as_tensor(y) for y in labels]
    calib, held = _split(batches, config.holdout)
    if label_list is not None and len(label_list) != len(batches):
        raise ConfigError(f"export_onnx: labels= has {len(label_list)} entries for "
                          f"{len(batches)} calibration batches; give one label tensor per "
                          f"batch (e.g. y.split(64) beside x.split(64)).")
    out = out or int8_path(fp32_path, config)
    report = Int8Report(path=out, fp32_path=fp32_path, config=asdict(config),
                        calibration_batches=len(calib), heldout_batches=len(held),
                        heldout_samples=sum(_samples(b) for b in held),
                        verified_on=list(VERIFY_ON[config.verify_on]))
    if len(names) != len(example_inputs):
        raise ConfigError(f"export_onnx: every calibration batch must hold the model's "
                          f"{len(names)} input(s) ({', '.join(names)}), as example_inputs do.")

    t0 = time.perf_counter()
    quiet = contextlib.redirect_stdout(io.StringIO())  # the calibrators print progress lines
    with tempfile.TemporaryDirectory() as tmp, quiet:
        pre = os.path.join(tmp, "preprocessed.onnx")
        try:
            quant_pre_process(fp32_path, pre)
        except Exception:  # symbolic shape inference fails on some graphs: ONNX's is enough
            quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, _Reader(names, calib), quant_format=QuantFormat.QDQ,
                        per_channel=config.per_channel, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=_method(config.method))
    report.timings["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ConfigError(f"export_onnx: onnx.checker rejected the int8 model {out}: "
                          f"{str(exc).splitlines()[0]}.") from exc
    _describe(report, onnx.load(out))
    report.size_bytes = {"fp32": os.path.getsize(fp32_path), "int8": os.path.getsize(out)}
    report.timings["check"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fp32, int8 = _session(fp32_path, config.threads), _session(out, config.threads)
    for where, trials in (("example_inputs", [example_inputs]), ("held-out", held)):
        ref = [fp32.run(None, _feeds(names, t)) for t in trials]
        got = [int8.run(None, _feeds(names, t)) for t in trials]
        report.sqnr_db[where] = sqnr_db([a for r in ref for a in r], [a for g in got for a in g])
        if _is_classifier(ref[0][0]):
            top = [(r[0].argmax(-1), g[0].argmax(-1)) for r, g in zip(ref, got, strict=True)]
            report.agreement[where] = float(np.concatenate([a == b for a, b in top]).mean())
            if where == "held-out" and label_list is not None:
                ys = np.concatenate([y.numpy().reshape(-1)
                                     for y in label_list[len(calib):]])
                for name, k in (("fp32", 0), ("int8", 1)):
                    pred = np.concatenate([t[k] for t in top])
                    report.accuracy[name] = float((pred == ys).mean())
    report.timings["verify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = [_samples(b) for b in held]
    report.latency_batch = max(size)  # the largest held-out batch (a last one may be short)
    report.latency_ms = _latency(fp32, int8, _feeds(names, held[size.index(max(size))]),
                                 config.latency_runs)
    report.timings["latency"] = time.perf_counter() - t0
    _judge(report, config)
    return report


def _samples(batch: tuple[torch.Tensor, ...]) -> int:
    return int(batch[0].shape[0]) if batch[0].dim() else 1


def _judge(report: Int8Report, config: Int8Config) -> None:
    """Fill ``report.failures``: every set in ``verified_on`` must pass every threshold."""
    n, least = report.heldout_samples, config.min_samples
    if n < least:
        report.failures.append(failure(
            "min_samples", f"the verdict would rest on {n} held-out sample(s) (the last "
            f"{report.heldout_batches} of {report.heldout_batches + report.calibration_batches}"
            f" batches), fewer than min_samples={least}: give more or larger calibration "
            f"batches or a larger holdout=, or lower Int8Config(min_samples=...) if {n} are "
            f"enough", where="held-out",
            numbers={"samples": n, "min_samples": least}))
    passing = [w for w in report.verified_on if config.min_sqnr_db is None
               or report.sqnr_db[w] >= config.min_sqnr_db]
    for where in report.verified_on:
        sqnr, agree = report.sqnr_db[where], report.agreement.get(where)
        if math.isnan(sqnr):
            report.failures.append(failure(
                "non_finite", f"{where}: the fp32 or int8 outputs hold NaN/inf, so the SQNR "
                f"is undefined: int8 cannot represent them", where=where,
                numbers={"sqnr_db": sqnr}))
        elif config.min_sqnr_db is not None and sqnr < config.min_sqnr_db:
            report.failures.append(failure(
                "sqnr", f"{where} SQNR {sqnr:.1f} dB < min_sqnr_db {config.min_sqnr_db:g} dB: "
                f"{_hint(where, passing, report, config)}", where=where,
                numbers={"sqnr_db": sqnr, "min_sqnr_db": config.min_sqnr_db}))
        if config.min_agreement is None:
            continue
        if agree is None:
            report.failures.append(failure(
                "agreement", "min_agreement is set but the first output is not a "
                "[batch, classes] tensor: use min_sqnr_db", where=where))
        elif agree < config.min_agreement:
            report.failures.append(failure(
                "agreement", f"{where} top-1 agreement {agree:.4f} < min_agreement "
                f"{config.min_agreement:g}", where=where,
                numbers={"agreement": agree, "min_agreement": config.min_agreement}))


def _hint(where: str, passing: list[str], report: Int8Report, config: Int8Config) -> str:
    """What to try for a low SQNR — never an option that is already on."""
    if passing:
        other = passing[0]
        return (f"the {other} set passes ({report.sqnr_db[other]:.1f} dB), so the "
                f"calibration batches are unlike {where}: calibrate on inputs drawn and "
                f"preprocessed like them" + (" (if example_inputs are only a shape hint, pass "
                                             "Int8Config(verify_on='held-out'))"
                                             if where == "example_inputs" else ""))
    tries = ["per_channel=True"] if not config.per_channel else []
    tries.append("method='percentile'" if config.method == "minmax" else "method='minmax'")
    return (f"check that the calibration batches look like real inputs (not constant, same "
            f"preprocessing), or try {' / '.join(tries)}")


def _split(batches: list[tuple[torch.Tensor, ...]], holdout: float
           ) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    """The first batches to calibrate on, the last ``holdout`` held out (by position)."""
    n = len(batches)
    keep = holdout if isinstance(holdout, int) else max(1, round(holdout * n))
    if n < 2 or keep >= n:
        raise ConfigError(f"export_onnx: calibration= has {n} batch(es) and holdout={holdout!r}"
                          f" keeps {keep} out: give at least one batch to calibrate on and one "
                          f"to verify with (e.g. x[:512].split(64): 6 to calibrate, 2 held out).")
    return batches[:n - keep], batches[n - keep:]


def _as_batch(batch: Any, index: int) -> tuple[torch.Tensor, ...]:
    batch = batch if isinstance(batch, tuple | list) else (batch,)
    if not batch or not all(isinstance(t, torch.Tensor) for t in batch):
        raise ConfigError(f"export_onnx: calibration batch {index} is not a tensor or a tuple "
                          f"of tensors (got {[type(t).__name__ for t in batch]}); give batches "
                          f"as forward takes them, without labels (pass labels= separately).")
    return tuple(batch)


def _feeds(names: list[str], batch: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {n: t.detach().cpu().float().numpy() if t.is_floating_point() else t.cpu().numpy()
            for n, t in zip(names, batch, strict=True)}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the calibration batches."""

    def __init__(self, names: list[str], batches: Iterable[tuple[torch.Tensor, ...]]) -> None:
        self._feeds = iter([_feeds(names, b) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[name]


def _session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _latency(fp32: Any, int8: Any, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median ms per run of each session, alternating runs so both see the same machine."""
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i in range(runs + 3):
        for name, session in (("fp32", fp32), ("int8", int8)) if i % 2 else (
                ("int8", int8), ("fp32", fp32)):
            t0 = time.perf_counter()
            session.run(None, feeds)
            if i >= 3:  # warm-up runs are not counted
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _is_classifier(out: np.ndarray) -> bool:
    return out.ndim == 2 and out.shape[1] > 1


def _describe(report: Int8Report, proto: Any) -> None:
    """Operator histogram and which Conv/Gemm/MatMul read int8 weights (through DQ nodes)."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    report.op_histogram = dict(sorted(Counter(n.op_type for n in graph.node).items()))
    int8 = {t.name: t for t in graph.initializer if t.data_type == TensorProto.INT8}
    dq_int8 = {n.output[0]: n.input[0] for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    quantized = [n for n in layers if len(n.input) > 1 and n.input[1] in dq_int8]
    report.quantized_layers = (len(quantized), len(layers))
    report.int8_weight_elements = sum(int(numpy_helper.to_array(int8[dq_int8[n.input[1]]]).size)
                                      for n in quantized)
