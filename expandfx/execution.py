"""Execution of expanded blocks: the modes, the measured ``auto`` decision, one timer.

How an :class:`~expandfx.block.ExpandedBlock` runs is decided here, not in the block:

- the modes (``"auto"``, ``"collapsed"``, ``"sequential"``), :func:`set_mode`;
- ``auto``'s decision (:func:`resolve_mode`): measured once per input key and block
  structure where that is safe, else the MAC model (:func:`cheaper_mode`, from
  :mod:`expandfx.linear.costs`); the process-wide decision cache;
- the kernel-method tuner (:func:`tune_kernels`), which records in
  :mod:`expandfx.linear.compose` which of two equal compositions of spatial kernels is faster,
  and the chain-method tuner (:func:`tune_chain`), which records whether a whole chain
  composes faster pairwise or at points;
- :func:`timed`, the one timer both use: on an accelerator it synchronizes the device before
  starting and before stopping the clock (so it times kernels, not their launches); on the
  CPU, ``time.perf_counter`` alone;
- the frozen cache (:func:`frozen`, :func:`folded`).

Every measurement leaves a :class:`Measurement` in :func:`measurements`;
:func:`forget_measurements` drops the decisions and the kernel and chain preferences (a
benchmark that wants fresh decisions, a test).

Example::

    >>> import torch, expandfx as efx
    >>> from expandfx import execution
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.expand(smallnet_7x7(), "CL", r=2)
    >>> execution.resolve_mode(big.features[0], (128, 3, 32, 32))   # a shape: the MAC model
    'collapsed'
    >>> execution.timed(lambda: torch.ones(3).sum(), torch.device("cpu")) >= 0
    True
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from . import layer_types
from .errors import ConfigError
from .layer_types import layer_signature
from .linear import compose
from .linear.compose import WeightBias
from .linear.costs import fold_macs, layer_macs, topology_macs
from .linear.fold import fold
from .linear.ir import run

if TYPE_CHECKING:  # the block calls into this module; this module only walks blocks
    from .block import ExpandedBlock

__all__ = ["MEASURE_ENV", "MODES", "Measurement", "cheaper_mode", "check_mode",
           "collapsed_macs", "compose_macs", "folded", "forget_measurements", "frozen",
           "measurements", "measuring_enabled", "recomposed", "resolve_mode",
           "sequential_macs", "set_mode", "structure", "synchronize", "timed", "tune_chain",
           "tune_kernels"]


MODES = ("auto", "collapsed", "sequential")
# Blocks inside efx.frozen(): block -> [depth, (key, folded weights) or None]. Kept outside
# the blocks so that deepcopy / pickle never carry a cache or the frozen state along.
_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"execution mode must be one of {MODES}, got {mode!r}.")
    return mode


# Set to "0" to make ``mode="auto"`` decide by the MAC model alone (reproducible runs).
MEASURE_ENV = "EXPANDFX_AUTO_MEASURE"


def measuring_enabled() -> bool:
    """Whether ``auto`` blocks may time their modes (the ``EXPANDFX_AUTO_MEASURE`` switch)."""
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# (block structure, input key) -> the measured mode, shared by identical blocks of a process
_DECISIONS: dict[tuple[Any, ...], str] = {}


def set_mode(model: nn.Module, mode: str, *, measure: bool | None = None,
             recompose: bool | None = None) -> nn.Module:
    """A mode setter, like ``nn.Module.train()``: switches every expanded block of ``model``
    to ``mode`` in place and returns ``model`` (it sets how blocks run, not what they
    compute, so it is not a transformation that copies).

    ``measure`` (for ``"auto"``): ``True``/``False`` lets the blocks time both executions
    or makes them decide by the MAC model alone; ``None`` keeps each block's setting
    (default: follow ``EXPANDFX_AUTO_MEASURE``, on unless set to ``0``). Forgets the
    decisions ``auto`` measured so far for blocks of these structures, and the chain
    methods measured for their chains' shapes (:func:`tune_chain`). ``recompose``
    (collapsed training): ``True`` (the default) keeps only the factors for backward and
    recomputes the composition there (:func:`recomposed`: the compact layer's memory);
    ``False`` keeps the composition's partial products (more memory, no recomputation);
    ``None`` keeps each block's setting.

    >>> import expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.set_mode(efx.expand(smallnet_7x7(), "CL", r=2), "collapsed")
    >>> big.features[0].mode
    'collapsed'
    """
    check_mode(mode)
    for module in _blocks(model):
        module.mode = mode
        if measure is not None:
            module.measure = bool(measure)
        if recompose is not None:
            module.recompose = bool(recompose)
        module._auto.clear()
        for key in [k for k in _DECISIONS if k[0] == structure(module)]:
            del _DECISIONS[key]
        if module.__dict__.get("_plain_chain"):
            compose.forget_chain_methods([[tuple(f.weight.shape) for f in module.layers]])
    return model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Inference with folded weights cached between forwards (eval mode, ``no_grad``).

    Inside the block, collapsed blocks compose their factors once instead of at every
    forward. Do not edit weights through ``.data`` inside it (version counters cannot
    see such edits); optimizer steps and ``load_state_dict`` are detected.

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.expand(smallnet_7x7(), "CL", r=2, mode="collapsed").eval()
    >>> with efx.frozen(big), torch.no_grad():
    ...     y = big(torch.randn(2, 3, 32, 32))
    """
    found = _blocks(model)
    for block in found:  # [nesting depth, cached fold]; copies of a block are not in here
        _FROZEN.setdefault(block, [0, None])[0] += 1
    try:
        yield model
    finally:
        for block in found:
            state = _FROZEN.get(block)
            if state is not None:
                state[0] -= 1
                if state[0] <= 0:
                    del _FROZEN[block]


def resolve_mode(block: ExpandedBlock, x: torch.Tensor | Sequence[int]) -> str:
    """``"sequential"`` or ``"collapsed"`` for this input (a tensor, or just its shape).

    ``auto`` decides once per input shape, dtype, device, grad mode and autocast state
    and caches the choice — shared by every block of the same structure in the process,
    so identical blocks (copies, a checkpoint loaded into a fresh expansion) run the same
    mode and compute the same bits. Given a tensor in ordinary eager execution it *measures*:
    both executions run on detached copies of the input and of the factor weights
    (forward, plus backward through ``torch.autograd.grad`` when gradients are needed;
    a warm-up round, then one timed round, or three interleaved ones when the two are
    within 3× and a step takes under 0.1 s — 0.5 s when the two are within 1.5×; median),
    so no autograd graph, ``.grad``, hook or RNG state of the caller
    is touched. When gradients are needed, sequential must be at least
    ``SEQUENTIAL_MEMORY_PREMIUM`` (10 %) faster to be chosen: it keeps r× wider activations
    for backward than collapsed execution, which keeps only the compact layer's. A block
    whose warm-up takes over a second is not timed further (the MAC model decides). It
    falls back to the MAC model of :mod:`expandfx.linear.costs` (and does not cache) under
    ``torch.compile``, FX or JIT tracing, functorch transforms, CUDA graph capture, for
    meta/fake/subclass tensors, when given a shape only, and when measuring is switched off
    (``set_mode(model, "auto", measure=False)`` or ``EXPANDFX_AUTO_MEASURE=0``). When
    the MAC model already sees one mode 8× cheaper, that decides without timing the modes
    (in training a collapsed chain still times its chain method in its step,
    :func:`tune_chain`). Both modes compute the same function; only the speed depends on
    the choice.
    """
    if block.mode != "auto":
        if block.mode == "collapsed":
            block._refuse_collapsed()
        return block.mode
    if block.batch_statistics():  # training-mode BN branches: not a linear map
        return "sequential"
    if not isinstance(x, torch.Tensor):
        return cheaper_mode(block, tuple(x))
    grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in block.parameters()))
    key = (tuple(x.shape), x.dtype, x.device, grad, _autocast(x))
    found = block._auto.get(key)
    if found is not None:
        return found
    if not _may_measure(block, x):
        return cheaper_mode(block, tuple(x.shape))
    # one decision per block structure in the process: identical blocks (a copy, a
    # checkpoint loaded into a fresh expansion) run the same mode, so compute the same bits
    shared = (structure(block), key)
    choice = _DECISIONS.get(shared)
    if choice is None:
        choice = _DECISIONS[shared] = _measure(block, x, grad)
    block._auto[key] = choice
    _KNOWN_BLOCKS.add(block)
    return choice


def structure(block: ExpandedBlock) -> tuple[Any, ...]:
    """What a measured decision depends on: identical blocks share one."""
    return (layer_signature(block.template), tuple(block.signatures), block.topology,
            None if block.pre_pad is None else tuple(block.pre_pad), block.pad_mode,
            tuple(p.requires_grad for p in block.parameters()))


def _may_measure(block: ExpandedBlock, x: torch.Tensor) -> bool:
    measure = block.__dict__.get("measure")  # absent on blocks pickled before it existed
    enabled = measure if measure is not None else measuring_enabled()
    if not enabled or _tracing_or_transformed():
        return False
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules()):
        return False  # eval-mode branch BNs: the MAC model decides (timing runs convs)
    tensors = [x, *block.parameters()]
    if any(type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta
           or t.device != x.device for t in tensors):
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _measure(block: ExpandedBlock, x: torch.Tensor, grad: bool) -> str:
    seq_macs = sequential_macs(block, x.shape)
    col_macs = collapsed_macs(block, x.shape)
    lopsided = seq_macs > 8 * col_macs or col_macs > 8 * seq_macs  # no need to time modes
    if lopsided and not (grad and col_macs <= seq_macs):
        return "collapsed" if col_macs <= seq_macs else "sequential"
    paths = block.factor_paths
    params = [(layer.weight, layer.bias) for layer in block.factors]
    with torch.no_grad():  # current values (through any parametrization), as new leaves
        weights = [(w.detach(), None if b is None else b.detach()) for w, b in params]
    if grad:
        for (w, b), (w0, b0) in zip(weights, params, strict=True):
            w.requires_grad_(w0.requires_grad)
            if b is not None:
                b.requires_grad_(b0.requires_grad)
    x = x.detach().requires_grad_(grad and x.requires_grad)
    leaves = [t for pair in weights for t in pair if t is not None and t.requires_grad]
    if grad and x.requires_grad:
        leaves.append(x)
    by_path = dict(zip(paths, weights, strict=True))

    def apply(path: str, y: torch.Tensor) -> torch.Tensor:
        layer, (w, b) = block.get_submodule(path), by_path[path]
        return layer_types.layer_call(layer, y, w, b)

    def sequential() -> torch.Tensor:
        y = x if block.pre_pad is None else F.pad(x, block.pre_pad, mode=block.pad_mode)
        return run(block.topology, y, apply)

    def collapsed() -> torch.Tensor:  # as forward runs it (with the recomputing backward)
        if grad and block.__dict__.get("recompose", True):
            w, b = recomposed(block, by_path)
        else:
            one = fold(block.linear_map(params=by_path))
            w, b = one.weight, one.bias
        return layer_types.layer_call(block.template, x, w, b)

    runs = {"sequential": sequential, "collapsed": collapsed}
    # identity hooks on top: the caller's saved-tensor hooks (checkpointing) never see ours
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        if grad:  # collapsed training composes at every step: its fastest method, timed in
            # the block's own step (timed alone, the composition can rank its methods the
            # other way: the layer's convolution changes what the caches hold)
            _tune_composition(block, weights, timer=lambda: _timed_step(collapsed, leaves,
                                                                        x.device))
        if lopsided:  # collapsed without timing the modes
            return "collapsed"
        warm = {name: _timed_step(fn, leaves, x.device) for name, fn in runs.items()}
        if max(warm.values()) > 1.0:  # too slow to time twice: the MAC model decides
            choice = cheaper_mode(block, tuple(x.shape))
            _MEASURED.append(Measurement(structure(block), tuple(x.shape), grad, len(leaves),
                                         {k: (v,) for k, v in warm.items()}, choice))
            return choice
        first = {name: _timed_step(fn, leaves, x.device) for name, fn in runs.items()}
        if max(first.values()) > 3 * min(first.values()):  # plain after the warm-up
            choice = min(first, key=lambda name: first[name] * _premium(name, grad))
            _MEASURED.append(Measurement(structure(block), tuple(x.shape), grad, len(leaves),
                                         {k: (v,) for k, v in first.items()}, choice))
            return choice
        # two more interleaved rounds unless slow (deciding must stay cheap); a close call
        # gets them up to 0.5 s a step: one round on a loaded machine picks on noise
        weighted = [t * _premium(name, grad) for name, t in first.items()]
        close = max(weighted) < 1.5 * min(weighted)
        slowest = max(first.values())
        times = {name: [t] for name, t in first.items()}
        for _ in range(2 if slowest <= 0.1 or (close and slowest <= 0.5) else 0):
            for name, fn in runs.items():
                times[name].append(_timed_step(fn, leaves, x.device))
    choice = min(times, key=lambda n: statistics.median(times[n]) * _premium(n, grad))
    _MEASURED.append(Measurement(structure(block), tuple(x.shape), grad, len(leaves),
                                 {k: tuple(v) for k, v in times.items()}, choice))
    return choice


def _tune_composition(block: ExpandedBlock, weights: Sequence[WeightBias],
                      timer: Callable[[], float] | None = None) -> None:
    """Tune how a chain block composes in training (kernel pairs; for a plain chain, whose
    collapsed forward is ``compose_chain``, also pairs vs points, by ``timer`` if given: see
    :func:`tune_chain`) before it is timed or run."""
    if not block.is_chain:
        return
    groups = getattr(block.template, "groups", 1)
    if block.__dict__.get("_plain_chain") and getattr(block, "act", None) is None:
        tune_chain(weights, groups, recompose=block.__dict__.get("recompose", True),
                   timer=timer)
    else:
        tune_kernels(weights, groups)


# In training, sequential execution keeps every factor's activations (r× the compact layer's
# width) for backward, collapsed execution only the compact layer's input: auto weighs
# memory by choosing sequential only when it is at least this much faster.
SEQUENTIAL_MEMORY_PREMIUM = 0.10


def _premium(mode: str, grad: bool) -> float:
    return 1.0 + SEQUENTIAL_MEMORY_PREMIUM if grad and mode == "sequential" else 1.0


def folded(block: ExpandedBlock) -> WeightBias:
    """:meth:`weight_bias` in the working dtype; cached only inside :func:`frozen`.

    Even there the cache key holds the identity, version counter, storage, dtype and
    device of every parameter and buffer, so an optimizer step, ``load_state_dict``,
    ``.to()`` or a reassigned ``.data`` invalidates it; in-place edits through ``.data``
    are invisible to version counters, which is why caching is opt-in.
    """
    state = _FROZEN.get(block)
    if state is None or block.training or torch.is_grad_enabled():
        if (torch.is_grad_enabled() and block.__dict__.get("recompose", True)
                and not _tracing_or_transformed()):
            return recomposed(block)
        return block.weight_bias()
    key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                for t in (*block.parameters(), *block.buffers()))
    if state[1] is None or state[1][0] != key:
        state[1] = (key, block.weight_bias())
    return state[1][1]


def recomposed(block: ExpandedBlock, params: dict[str, WeightBias] | None = None
               ) -> WeightBias:
    """:meth:`~expandfx.block.ExpandedBlock.weight_bias`, differentiable, saving for backward
    only the factors (which are parameters: no memory) instead of the composition's partial
    products, which backward recomputes (:class:`_Recompose`). Same values and gradients;
    the memory of a training step drops by the partial products of every collapsed block,
    for the time of composing once more in backward."""
    paths = block.factor_paths
    pairs = ([params[p] for p in paths] if params is not None
             else [(layer.weight, layer.bias) for layer in block.factors])
    flat = [t for pair in pairs for t in pair]
    if not any(t is not None and t.requires_grad for t in flat):
        return block.weight_bias(params=params)

    if block.__dict__.get("_plain_chain") and getattr(block, "act", None) is None \
            and len(pairs) > 1:
        out = _RecomposeChain.apply(getattr(block.template, "groups", 1), None, *flat)
        return out[0], (out[1] if len(out) > 1 else None)

    def compose(tensors: Sequence[torch.Tensor | None]) -> WeightBias:
        return block.weight_bias(params={p: (tensors[2 * i], tensors[2 * i + 1])
                                         for i, p in enumerate(paths)})

    out = _Recompose.apply(compose, *flat)
    return out[0], (out[1] if len(out) > 1 else None)


class _Recompose(torch.autograd.Function):
    """``compose(tensors)`` whose backward recomputes the composition instead of keeping its
    intermediates: a checkpoint of one block's kernel composition."""

    @staticmethod
    def forward(ctx: Any, compose: Callable, *tensors: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        ctx.compose = compose
        ctx.save_for_backward(*tensors)
        weight, bias = compose(tensors)
        return (weight,) if bias is None else (weight, bias)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[1:]
        # grad mode is on inside backward only under create_graph=True (double backward):
        # then differentiate through the saved tensors themselves, keeping their history
        higher = torch.is_grad_enabled()
        with torch.enable_grad():
            inputs = [t if t is None or higher else t.detach().requires_grad_(need)
                      for t, need in zip(ctx.saved_tensors, needs, strict=True)]
            weight, bias = ctx.compose(inputs)
            outs = [weight] if bias is None else [weight, bias]
            wrt = [t for t, need in zip(inputs, needs, strict=True) if t is not None and need]
            found = iter(torch.autograd.grad(outs, wrt, grads[:len(outs)], allow_unused=True,
                                             create_graph=higher))
        return (None, *(next(found) if t is not None and need else None
                        for t, need in zip(inputs, needs, strict=True)))


class _RecomposeChain(torch.autograd.Function):
    """A plain chain's :func:`~expandfx.linear.compose.compose_chain` whose backward
    recomputes only what the gradients need: the two operands of the last composition
    (:func:`~expandfx.linear.compose.last_step`); the last, largest product and the
    interpolation are not run again (:func:`~expandfx.linear.compose.finish_grad` gives the
    operands' gradients from ``dW`` and the operands). Saves only the factors.

    Arithmetic for a chain ``W = A3 ∘ A2 ∘ A1`` composed as ``A3 ∘ (A2 ∘ A1)``: the
    backward of the kept version needs ``A12 = A2 ∘ A1``; each factor's gradient in any
    other order (``dA3 = (dW ∘ A1ᵀ) ∘ A2ᵀ``, ...) costs more for the shapes of CL and CK
    (wide middle layers), so recomputing ``A12`` — and nothing else — is the cheapest
    backward that keeps no partial product.

    ``method`` (``"pairs"``, ``"points"``, or ``None``: what ``chain_method`` picks) is
    fixed in forward, so backward recomputes the same steps even if a preference is recorded
    in between."""

    @staticmethod
    def forward(ctx: Any, groups: int, method: str | None, *tensors: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        weights = tensors[0::2]
        if method is None:
            method = compose.chain_method([tuple(w.shape) for w in weights], weights[0].dtype,
                                          weights[0].device)
        ctx.groups, ctx.method = groups, method
        ctx.save_for_backward(*tensors)
        weight, bias = compose.compose_chain(list(zip(weights, tensors[1::2], strict=True)),
                                             groups, method=method)
        return (weight,) if bias is None else (weight, bias)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[2:]
        higher = torch.is_grad_enabled()  # create_graph=True: keep the saved tensors' history
        with torch.enable_grad():
            inputs = [t if t is None or higher else t.detach().requires_grad_(need)
                      for t, need in zip(ctx.saved_tensors, needs, strict=True)]
            weights, biases = inputs[0::2], inputs[1::2]
            method = ctx.method
            if method == "points" and not compose.points_allowed(
                    [tuple(w.shape) for w in weights], weights[0].dtype):
                method = "pairs"  # matmul precision lowered since forward: same gradients
            step = compose.last_step(weights, ctx.groups, method=method)
            operands = compose.finish_grad(step, grads[0])
            if operands is None:  # a "pair" step: differentiate the last composition
                outs, outgrads = [compose.finish(step)], [grads[0]]
            else:
                outs, outgrads = [step.first, step.second], list(operands)
            if len(grads) > 1:
                outs.append(compose.chain_bias(list(zip(weights, biases, strict=True)),
                                               ctx.groups))
                outgrads.append(grads[1])
            kept = [(o, g) for o, g in zip(outs, outgrads, strict=True) if o.requires_grad]
            wrt = [t for t, need in zip(inputs, needs, strict=True) if t is not None and need]
            found = iter(torch.autograd.grad([o for o, _ in kept], wrt, [g for _, g in kept],
                                             allow_unused=True, create_graph=higher)
                         if kept and wrt else [None] * len(wrt))
        return (None, None, *(next(found) if t is not None and need else None
                              for t, need in zip(inputs, needs, strict=True)))


def _tracing_or_transformed() -> bool:
    """True under torch.compile, FX / JIT tracing or scripting, or a functorch transform."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_scripting()
                or torch.jit.is_tracing() or _fx_tracing()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _fx_tracing() -> bool:
    trace = torch.fx._symbolic_trace
    check = getattr(trace, "is_fx_symbolic_tracing", None) or trace.is_fx_tracing
    return bool(check())


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


# ---------------------------------------------------------------------------- the timer

def synchronize(device: torch.device | str) -> bool:
    """Wait for every kernel queued on ``device``; ``False`` (and nothing done) on the CPU
    or for a device type torch has no ``synchronize`` for."""
    device = torch.device(device)
    if device.type == "cpu":
        return False
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if sync is None:
        return False
    if device.type == "cuda":
        sync(device)
    else:
        sync()
    return True


def timed(step: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds that ``step()`` takes to *finish* on ``device``.

    On an accelerator, work is queued asynchronously: the device is synchronized before the
    clock starts (earlier work is not counted) and before it stops (this work is), so the
    figure is the kernels' time, not their launches'. On the CPU, ``time.perf_counter``
    around the call.
    """
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def _timed_step(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
                device: torch.device) -> float:
    """Seconds of ``run()`` plus, if there are leaves, the backward to them."""
    def step() -> None:
        out = run()
        if leaves:
            torch.autograd.grad(out, leaves, torch.ones_like(out))
    return timed(step, device)


# --------------------------------------------------------------- what auto has measured

@dataclass(frozen=True)
class Measurement:
    """One timed decision of ``auto``: the block structure, input shape, whether backward
    was timed (``grad``; ``leaves`` tensors differentiated), the seconds of every round per
    mode, and the choice."""

    structure: tuple[Any, ...]
    shape: tuple[int, ...]
    grad: bool
    leaves: int
    seconds: dict[str, tuple[float, ...]]
    choice: str


_MEASURED: deque[Measurement] = deque(maxlen=10_000)


def measurements() -> list[Measurement]:
    """The decisions ``auto`` measured in this process (oldest first; the last 10 000)."""
    return list(_MEASURED)


def forget_measurements() -> None:
    """Forget every measured decision and kernel preference: blocks measure afresh."""
    _DECISIONS.clear()
    _MEASURED.clear()
    compose.forget_kernel_methods()
    compose.forget_chain_methods()
    for block in list(_KNOWN_BLOCKS):
        block._auto.clear()


_KNOWN_BLOCKS: weakref.WeakSet = weakref.WeakSet()  # blocks holding per-block decisions


# ------------------------------------------------------------------- kernel-method tuner

def tune_kernels(factors: Sequence[WeightBias], groups: int, repeats: int = 3
                 ) -> dict[tuple[tuple[int, ...], tuple[int, ...]], str]:
    """Time both kernel-composition methods (forward + backward) for every spatial pair
    :func:`~expandfx.linear.compose.compose_chain` folds in this chain when it composes
    pairwise (whatever :func:`tune_chain` then prefers), once per
    shape/dtype/device, with :func:`timed`, and record the faster in
    :mod:`expandfx.linear.compose` (:func:`~expandfx.linear.compose.kernel_method` reads it).
    Returns ``{(shape A, shape B): method}`` for every spatial pair of the chain. Works on
    constant kernels of the same shapes: no graph, grad or RNG of the caller is touched."""
    weights = [w.detach() for w, _ in factors]
    ref = weights[0]
    chosen = {}
    for sa, sb in compose.spatial_pairs([tuple(w.shape) for w in weights], method="pairs"):
        known = compose.known_kernel_method(sa, sb, groups, ref.dtype, ref.device)
        if known is not None:
            chosen[sa, sb] = known
            continue
        # constant kernels: the timing of these kernels does not depend on the values
        wa = torch.full(sa, 0.01, dtype=ref.dtype, device=ref.device, requires_grad=True)
        wb = torch.full(sb, 0.01, dtype=ref.dtype, device=ref.device, requires_grad=True)
        times: dict[str, list[float]] = {m: [] for m in compose.KERNEL_METHODS}
        for rep in range(repeats + 1):
            for name, fn in compose.KERNEL_METHODS.items():
                seconds = _timed_step(lambda fn=fn, wa=wa, wb=wb: fn(wa, wb, groups),
                                      [wa, wb], ref.device)
                if rep:  # the first round warms up
                    times[name].append(seconds)
        best = min(times, key=lambda m: sorted(times[m])[len(times[m]) // 2])
        compose.prefer_kernel_method(sa, sb, groups, ref.dtype, ref.device, best)
        chosen[sa, sb] = best
    return chosen


def tune_chain(factors: Sequence[WeightBias], groups: int, repeats: int = 3, *,
               recompose: bool = True, timer: Callable[[], float] | None = None) -> str:
    """Time the whole composition of this chain (forward + backward) pairwise and at points
    (:data:`~expandfx.linear.compose.CHAIN_METHODS`) where both can be used, once per weight
    shapes/dtype/device, with :func:`timed` and :func:`tune_kernels`' repeat policy (a
    warm-up round, then ``repeats`` interleaved ones; median), and record the faster in
    :mod:`expandfx.linear.compose` (:func:`~expandfx.linear.compose.chain_method` reads it).
    The pairs are timed with their tuned kernel methods (:func:`tune_kernels` runs first);
    ``recompose`` times the recomputing backward that collapsed training runs
    (:func:`recomposed`), else plain autograd. Returns the method the chain now composes by.
    Without ``timer`` it works on constant kernels of the same shapes: no graph, grad or
    RNG of the caller is touched; both methods compute the same weight (to rounding). Times
    and records nothing for meta tensors or under ``torch.compile``, tracing and functorch
    transforms.

    ``timer`` (what ``auto`` passes: the seconds of one training step of the block's layer
    on its real input, on detached copies of the weights, composed by the recorded method)
    times each method where it runs instead: in a step, the layer's convolution leaves other
    data in the caches, and a composition timed alone can rank the methods the other way
    (CK's 3x3 chains on a CPU: equal alone, the point method 30 % faster in the block's
    step). As for the modes, a warm-up round over a second is not timed again: the MAC rule
    decides (and is recorded). If ``timer`` raises, nothing stays recorded for these shapes.

    >>> import torch
    >>> ck = [torch.zeros(12, 4, 3, 3), torch.zeros(16, 12, 3, 3), torch.zeros(4, 16, 3, 3)]
    >>> from expandfx.linear.compose import known_chain_method
    >>> tune_chain([(w, None) for w in ck], 1) == known_chain_method(
    ...     [tuple(w.shape) for w in ck], torch.float32, "cpu")  # timed, then recorded
    True
    >>> forget_measurements()
    """
    weights = [w.detach() for w, _ in factors]
    ref = weights[0]
    shapes = [tuple(w.shape) for w in weights]
    if ref.is_meta or _tracing_or_transformed():  # nothing to time: the MAC rule decides
        return compose.chain_method(shapes, ref.dtype)
    if len(weights) < 2 or not compose.points_allowed(shapes, ref.dtype):
        tune_kernels(factors, groups, repeats)
        return "pairs"
    if compose.known_chain_method(shapes, ref.dtype, ref.device) is not None:
        return compose.chain_method(shapes, ref.dtype, ref.device)
    tune_kernels(factors, groups, repeats)
    seconds = _chain_timer(shapes, groups, ref, recompose) if timer is None else \
        _recorded_then(timer, shapes, ref)
    times: dict[str, list[float]] = {m: [] for m in compose.CHAIN_METHODS}
    try:
        for rep in range(max(repeats, 1) + 1):
            took = {name: seconds(name) for name in compose.CHAIN_METHODS}
            if not rep and max(took.values()) > 1.0:  # too slow to time again: the MAC rule
                best = compose.chain_method(shapes, ref.dtype)
                break
            if rep:  # the first round warms up
                for name, t in took.items():
                    times[name].append(t)
        else:
            best = min(times, key=lambda m: sorted(times[m])[len(times[m]) // 2])
    except BaseException:  # a failed step: no untimed preference stays recorded
        compose.forget_chain_methods([shapes])
        raise
    compose.prefer_chain_method(shapes, ref.dtype, ref.device, best)
    return best


def _chain_timer(shapes: Sequence[tuple[int, ...]], groups: int, ref: torch.Tensor,
                 recompose: bool) -> Callable[[str], float]:
    """Seconds of composing constant kernels of these shapes by a method, forward and
    backward (the recomputing one if ``recompose``)."""
    kernels = [torch.full(s, 0.01, dtype=ref.dtype, device=ref.device, requires_grad=True)
               for s in shapes]
    flat = [t for w in kernels for t in (w, None)]

    def run(method: str) -> torch.Tensor:
        if recompose:
            return _RecomposeChain.apply(groups, method, *flat)[0]
        return compose.compose_chain([(w, None) for w in kernels], groups, method=method)[0]

    return lambda method: _timed_step(lambda: run(method), kernels, ref.device)


def _recorded_then(timer: Callable[[], float], shapes: Sequence[tuple[int, ...]],
                   ref: torch.Tensor) -> Callable[[str], float]:
    """Seconds of ``timer()`` with a method recorded for these shapes (what it runs by)."""
    def seconds(method: str) -> float:
        compose.prefer_chain_method(shapes, ref.dtype, ref.device, method)
        return timer()

    return seconds


# --------------------------------------------------------------------- the MAC model

def cheaper_mode(block: ExpandedBlock, input_shape: Sequence[int]) -> str:
    """``"collapsed"`` unless running the factors one by one costs fewer MACs.

    >>> import torch.nn as nn
    >>> from expandfx.rules import cl
    >>> block = cl.build(nn.Conv2d(3, 8, 7, padding=3), r=4)
    >>> cheaper_mode(block, (128, 3, 32, 32)), cheaper_mode(block, (1, 3, 1, 1))
    ('collapsed', 'sequential')
    """
    seq = sequential_macs(block, input_shape)
    col = collapsed_macs(block, input_shape)
    return "collapsed" if col <= seq else "sequential"


def sequential_macs(block: ExpandedBlock, input_shape: Sequence[int]) -> int:
    """MACs of running the block's factors one by one on an input of ``input_shape``."""
    shape = list(input_shape)
    if block.pre_pad is not None:
        for i in range(len(block.pre_pad) // 2):
            shape[-1 - i] += block.pre_pad[2 * i] + block.pre_pad[2 * i + 1]
    return topology_macs(block.topology, block.get_submodule, shape)[1]


def collapsed_macs(block: ExpandedBlock, input_shape: Sequence[int]) -> int:
    """MACs of the original layer on the input plus those of composing the factors."""
    _, macs = layer_macs(block.template, list(input_shape))
    return macs + compose_macs(block)


def compose_macs(block: ExpandedBlock) -> int:
    """MACs of folding the block's factors (independent of the batch)."""
    def weight_shape(path: str) -> tuple[int, ...]:
        layer = block.get_submodule(path)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # folds as a depthwise 1×…×1
            dims = len(getattr(block.template, "kernel_size", ()))
            return (layer.num_features, 1, *(1,) * dims)
        if layer_types.is_transposed(layer):  # [in, out/g, *k]: the same products as a conv's
            return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        return tuple(layer.weight.shape)

    return fold_macs(block.topology, weight_shape)


def _blocks(model: nn.Module) -> list[ExpandedBlock]:
    from .block import ExpandedBlock  # at call time: block.py imports this module

    return [m for m in model.modules() if isinstance(m, ExpandedBlock)]
