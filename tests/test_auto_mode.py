"""``mode="auto"`` decides by measurement where that is safe, and leaves the caller alone."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from support import rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

import expandfx as efx
from expandfx import execution
from expandfx.execution import cheaper_mode
from expandfx.models import smallnet_7x7


def blocks(model: nn.Module) -> list[efx.ExpandedBlock]:
    return [m for m in model.modules() if isinstance(m, efx.ExpandedBlock)]


def reference(model: nn.Module, x: torch.Tensor):
    """Output and gradients in collapsed mode (the function every mode computes)."""
    ref = efx.set_mode(copy.deepcopy(model), "collapsed")
    out = ref(x)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in ref.parameters()]


class _Timed(Sequence):
    """The leaves differentiated by each decision ``auto`` timed since the fixture started
    (read from the public :func:`expandfx.execution.measurements`)."""

    def _now(self) -> list[int]:
        return [m.leaves for m in execution.measurements()]

    def __len__(self) -> int:
        return len(self._now())

    def __getitem__(self, i):
        return self._now()[i]

    def __eq__(self, other) -> bool:
        return self._now() == list(other)


@pytest.fixture
def record_timings(monkeypatch):
    """Measure afresh in every test and list what was timed."""
    execution.forget_measurements()
    monkeypatch.delenv(execution.MEASURE_ENV, raising=False)
    yield _Timed()
    execution.forget_measurements()


def test_measuring_touches_no_grad_graph_hook_or_rng(record_timings):
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CL+FC", r=2)
    x = torch.randn(8, 3, 32, 32)
    out_ref, grads_ref = reference(big, x)
    hooked = blocks(big)[0].layers[0]
    fired: list[int] = []
    hooked.register_forward_hook(lambda *args: fired.append(1))
    rng = torch.get_rng_state()
    out = big(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert record_timings and max(record_timings) > 0  # measured, with backward
    assert all(p.grad is None for p in big.parameters())  # timing never accumulates .grad
    chosen = blocks(big)[0].resolve_mode(x)
    assert len(fired) == (1 if chosen == "sequential" else 0)  # hooks fire only for real
    out.square().sum().backward()
    assert rel_err(out_ref, out.detach()) <= 1e-5
    scale = max(g.abs().max().item() for g in grads_ref)
    for p, g in zip(big.parameters(), grads_ref, strict=True):
        assert (p.grad - g).abs().max().item() <= 1e-4 * scale
    for b in blocks(big):  # one decision per block for this input and grad mode
        assert list(b.auto_decisions.values()) in (["collapsed"], ["sequential"])


def test_choice_is_cached_per_shape_dtype_and_grad_mode(record_timings):
    big = efx.expand(nn.Sequential(nn.Conv2d(3, 8, 5, padding=2)), "CL", r=2)
    block = big[0]
    x = torch.randn(4, 3, 16, 16)
    big(x)
    n = len(record_timings)
    big(x)
    big(torch.randn(4, 3, 16, 16))
    assert len(record_timings) == n  # cached
    with torch.no_grad():
        big(x)
    assert len(record_timings) > n and record_timings[-1] == 0  # forward only under no_grad
    big.double()(x.double())
    assert {k[1] for k in block.auto_decisions} == {torch.float32, torch.float64}
    assert {k[3] for k in block.auto_decisions} == {True, False}
    efx.set_mode(big, "auto")
    assert block.auto_decisions == {}


@pytest.mark.parametrize("switch", ["env", "set_mode"])
def test_measuring_can_be_switched_off(record_timings, monkeypatch, switch):
    """Measuring off: nothing is timed or cached; the MAC model picks the modes and the MAC
    rule how chains compose (no chain method is recorded)."""
    from expandfx.linear import compose

    big = efx.expand(smallnet_7x7(), "CK+FC", r=2)
    if switch == "env":
        monkeypatch.setenv(execution.MEASURE_ENV, "0")
    else:
        efx.set_mode(big, "auto", measure=False)
    x = torch.randn(2, 3, 32, 32)
    big(x).sum().backward()
    assert record_timings == []
    for b in blocks(big):
        assert b.resolve_mode(x) == cheaper_mode(b, tuple(x.shape))
        assert b.auto_decisions == {}  # model decisions are not cached: a later measurement may run
    assert _chains(big)  # CK's 3x3 chains could compose either way
    for shapes in _chains(big):
        assert compose.known_chain_method(shapes, torch.float32, "cpu") is None
        assert compose.chain_method(shapes, torch.float32, "cpu") == compose.chain_method(shapes)


def test_no_measuring_under_compile_functorch_or_meta(record_timings, monkeypatch):
    big = efx.expand(nn.Sequential(nn.Conv2d(3, 8, 5, padding=2)), "CK", r=2)
    block = big[0]
    x = torch.randn(2, 3, 8, 8)
    with torch.device("meta"):
        meta = efx.expand(nn.Sequential(nn.Conv2d(3, 8, 5, padding=2)), "CK", r=2)
    assert meta(torch.empty(2, 3, 8, 8, device="meta")).shape == (2, 8, 8, 8)
    params = dict(big.named_parameters())
    out = torch.func.vmap(lambda v: torch.func.functional_call(big, params, (v,)))(x[:, None])
    with torch.no_grad():
        assert rel_err(efx.set_mode(copy.deepcopy(big), "sequential")(x), out[:, 0]) <= 1e-5
    assert record_timings == [] and block.auto_decisions == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    big(x).sum().backward()
    assert record_timings == [] and block.auto_decisions == {}
    from expandfx.linear import compose  # nor was any chain method timed

    shapes = [tuple(f.weight.shape) for f in block.layers]
    assert compose.points_allowed(shapes) and all(
        compose.known_chain_method(shapes, torch.float32, d) is None for d in ("cpu", "meta"))
    assert execution.tune_chain([(f.weight, f.bias) for f in meta[0].layers], 1) \
        == compose.chain_method(shapes)
    assert compose.known_chain_method(shapes, torch.float32, "meta") is None


def test_measuring_inside_activation_checkpointing(record_timings):
    torch.manual_seed(0)
    big = efx.expand(nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(),
                                   nn.Conv2d(8, 4, 5, padding=2)), "CL", r=2)
    x = torch.randn(4, 3, 12, 12, requires_grad=True)
    out_ref, grads_ref = reference(big, x)
    out = checkpoint(big, x, use_reentrant=False)
    out.square().sum().backward()
    assert record_timings
    assert rel_err(out_ref, out.detach()) <= 1e-5
    for p, g in zip(big.parameters(), grads_ref, strict=True):
        assert rel_err(g, p.grad) <= 1e-4


def test_identical_blocks_share_one_measured_decision(record_timings):
    """A copy (or a checkpoint loaded into a fresh expansion) computes the same bits."""
    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CK+FC", r=2).eval()
    twin = efx.expand(smallnet_7x7(), "CK+FC", r=2).eval()
    twin.load_state_dict(big.state_dict())
    x = torch.randn(2, 3, 32, 32)
    y = big(x)
    n = len(record_timings)
    assert torch.equal(twin(x), y) and len(record_timings) == n  # decided once, not re-timed
    for a, b in zip(blocks(big), blocks(twin), strict=True):
        assert a.auto_decisions == b.auto_decisions


def _chains(model: nn.Module) -> list[list[tuple[int, ...]]]:
    """The weight shapes of every expanded chain of ``model`` that could compose at points."""
    from expandfx.linear import compose

    found = []
    for b in blocks(model):
        if b.is_chain:
            shapes = [tuple(f.weight.shape) for f in b.layers]
            if compose.points_allowed(shapes, torch.float32):
                found.append(shapes)
    return found


def test_training_in_auto_mode_records_how_each_chain_composes(record_timings):
    """A training step in auto mode times every CK chain's composition pairwise and at
    points and records the faster, which is then what the chain composes by; the caller's
    RNG and grads are untouched; forget_measurements and set_mode forget it."""
    from expandfx.linear import compose

    torch.manual_seed(0)
    big = efx.expand(smallnet_7x7(), "CK", r=2)
    chains = _chains(big)
    assert len(chains) == 3  # the three 7x7 convs: three 3x3 kernels each
    x = torch.randn(4, 3, 32, 32)
    rng = torch.get_rng_state()
    big(x).sum().backward()
    assert torch.equal(rng, torch.get_rng_state())
    for shapes in chains:
        known = compose.known_chain_method(shapes, torch.float32, "cpu")
        assert known in compose.CHAIN_METHODS
        assert compose.chain_method(shapes, torch.float32, "cpu") == known
        assert compose.known_chain_method(shapes, torch.float64, "cpu") is None
    before = [p.grad.clone() for p in big.parameters()]
    assert execution.tune_chain([(f.weight, f.bias) for f in blocks(big)[0].layers], 1) \
        == compose.known_chain_method(chains[0], torch.float32, "cpu")  # cached: not re-timed
    assert all(torch.equal(p.grad, g) for p, g in zip(big.parameters(), before, strict=True))
    efx.set_mode(big, "auto")
    assert all(compose.known_chain_method(s, torch.float32, "cpu") is None for s in chains)
    big(x).sum().backward()
    assert all(compose.known_chain_method(s, torch.float32, "cpu") for s in chains)
    execution.forget_measurements()
    assert all(compose.known_chain_method(s, torch.float32, "cpu") is None for s in chains)


@pytest.mark.parametrize("faster", ["pairs", "points"])
def test_the_chain_tuner_times_each_method_where_it_is_told_to(record_timings, faster):
    """``tune_chain(timer=...)`` (what auto passes: the block's own training step) times
    each method with that method recorded, after a warm-up round, and keeps the faster; a
    warm-up over a second is not repeated (the MAC rule decides, as for the modes); a timer
    that fails leaves nothing recorded. The timer here reports seconds by the recorded
    method: the tuner must follow them, whichever way they point."""
    from expandfx.linear import compose

    shapes = [(12, 4, 3, 3), (16, 12, 3, 3), (4, 16, 3, 3)]
    factors = [(torch.randn(s), None) for s in shapes]
    seen: list[str] = []

    def timer(slow: float = 0.0) -> float:
        seen.append(compose.known_chain_method(shapes, torch.float32, "cpu"))
        return slow + (0.001 if seen[-1] == faster else 0.002)

    assert execution.tune_chain(factors, 1, repeats=3, timer=timer) == faster
    assert seen == list(compose.CHAIN_METHODS) * 4  # warm-up + 3 rounds, both methods
    assert compose.known_chain_method(shapes, torch.float32, "cpu") == faster
    execution.forget_measurements()
    seen.clear()
    rule = compose.chain_method(shapes, torch.float32)  # the MAC rule, no device
    assert execution.tune_chain(factors, 1, repeats=3, timer=lambda: timer(1.5)) == rule
    assert seen == list(compose.CHAIN_METHODS)  # too slow to repeat: timed once each
    assert compose.known_chain_method(shapes, torch.float32, "cpu") == rule
    execution.forget_measurements()

    def failing() -> float:
        if len(seen) > 3:
            raise RuntimeError("out of memory in the step")
        return timer()

    with pytest.raises(RuntimeError, match="out of memory"):
        execution.tune_chain(factors, 1, repeats=3, timer=failing)
    assert compose.known_chain_method(shapes, torch.float32, "cpu") is None


def test_timing_a_training_step_hides_nothing_from_the_callers_saved_tensor_hooks(
        record_timings):
    """Auto's first training step times modes and chain methods on copies under its own
    identity hooks: the caller's saved-tensor hooks (checkpointing, offloading) see exactly
    what an already decided step saves, no timing run's tensors."""
    from expandfx.rules import ck

    torch.manual_seed(0)
    block = ck.build(nn.Conv2d(4, 4, 7, padding=3), r=4)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    counts = [0, 0]
    for step in range(2):
        def pack(t: torch.Tensor, step: int = step) -> torch.Tensor:
            counts[step] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x).sum().backward()
    assert len(execution.measurements()) == 1  # the first step measured, the second did not
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("recompose", [True, False])
def test_either_chain_method_trains_the_same_function(record_timings, recompose):
    """Forcing each recorded preference: the same outputs and gradients (float64, 1e-12
    relative), both through collapsed training and through the tuner's own timing path."""
    from expandfx.linear import compose

    torch.manual_seed(1)
    big = efx.set_mode(efx.expand(smallnet_7x7(), "CK", r=2).double(), "collapsed",
                       recompose=recompose)
    chains = _chains(big)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = {}
    for method in compose.CHAIN_METHODS:
        for shapes in chains:
            compose.prefer_chain_method(shapes, torch.float64, "cpu", method)
            assert compose.chain_method(shapes, torch.float64, "cpu") == method
        big.zero_grad(set_to_none=True)
        out = big(x)
        out.square().sum().backward()
        results[method] = (out.detach(), [p.grad.clone() for p in big.parameters()])
    (out_a, grads_a), (out_b, grads_b) = results["pairs"], results["points"]
    assert rel_err(out_a, out_b) <= 1e-12
    scale = max(g.abs().max() for g in grads_a)
    for a, b in zip(grads_a, grads_b, strict=True):  # a bias before a training BN: ~0
        assert (a - b).abs().max() <= 1e-12 * max(a.abs().max(), 1e-2 * scale)
    execution.forget_measurements()
    factors = [(f.weight, f.bias) for f in blocks(big)[0].layers]
    chosen = execution.tune_chain(factors, 1, repeats=1, recompose=recompose)
    shapes = [tuple(w.shape) for w, _ in factors]
    assert chosen == compose.known_chain_method(shapes, torch.float64, "cpu")  # recorded
    assert all(p.grad is None or torch.equal(p.grad, g)
               for p, g in zip(big.parameters(), grads_b, strict=True))
