"""Execution has one home and one timer; linear/ is pure math (read from the imports)."""

from __future__ import annotations

import ast
import pathlib
import time

import pytest
import torch

from expandfx import execution

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "expandfx"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(level, module) of every import statement, at any depth, in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found.extend((0, alias.name) for alias in node.names)
    return found


def test_linear_imports_nothing_of_the_package_but_its_exceptions():
    files = sorted((PACKAGE / "linear").glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for level, module in _imports(path):
            if level == 1 or (level == 0 and not module.startswith("expandfx")):
                continue  # inside linear/, or torch / the standard library
            where = module if level == 0 else "." * level + module
            assert (level, module) == (2, "errors") or module == "expandfx.linear" \
                or module.startswith("expandfx.linear."), f"{path.name} imports {where}"


def test_block_is_imported_neither_by_linear_nor_by_the_registry():
    for path in [*(PACKAGE / "linear").glob("*.py"), PACKAGE / "layer_types.py"]:
        modules = {m for _, m in _imports(path)}
        assert not modules & {"block", "expandfx.block", "execution", "expandfx.execution"}, path


def test_the_timer_waits_for_the_device_before_starting_and_before_stopping(monkeypatch):
    if torch.cuda.is_available():  # a real accelerator: the queued kernels are in the figure
        device = torch.device("cuda")
        a = torch.randn(4096, 4096, device=device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def work() -> None:
            start.record()
            for _ in range(20):
                a @ a
            end.record()

        seconds = execution.timed(work, device)
        kernels = start.elapsed_time(end) / 1e3  # the events' own figure (seconds)
        assert seconds >= 0.95 * kernels > 0
        return
    # No accelerator on this machine: a stub stands in for torch.cuda.synchronize. It
    # records when it is called and "waits" 50 ms for queued kernels; a timer that did not
    # synchronize, or that stopped the clock before it, would report the launch time only.
    events: list[str] = []

    def synchronize(device=None) -> None:
        events.append("sync")
        time.sleep(0.05)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    seconds = execution.timed(lambda: events.append("launch"), torch.device("cuda"))
    assert events == ["sync", "launch", "sync"]
    assert seconds >= 0.05  # the wait after the launch is timed, the one before it is not
    assert seconds < 0.1 + 0.05


def test_the_timer_on_the_cpu_does_not_synchronize_anything(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda *a: pytest.fail("synchronized for a CPU timing"))
    assert execution.synchronize("cpu") is False
    assert execution.timed(lambda: time.sleep(0.02), torch.device("cpu")) >= 0.02


def test_block_modes_and_kernel_tuning_share_the_timer(monkeypatch):
    """Both clients time through execution.timed: replacing it is seen by both."""
    import torch.nn as nn

    import expandfx as efx

    seen: list[str] = []
    real = execution.timed

    def spy(step, device):
        seen.append(torch.device(device).type)
        return real(step, device)

    monkeypatch.setattr(execution, "timed", spy)
    execution.forget_measurements()
    monkeypatch.delenv(execution.MEASURE_ENV, raising=False)
    big = efx.expand(nn.Sequential(nn.Conv2d(3, 4, 7, padding=3)), "CK", r=2)
    big(torch.randn(2, 3, 12, 12)).sum().backward()
    kernel_pairs = execution.tune_kernels([(f.weight, f.bias) for f in big[0].layers], 1)
    assert kernel_pairs and execution.measurements()
    assert len(seen) >= 2 * 2 + 2 * 2 and set(seen) == {"cpu"}
    execution.forget_measurements()


def _saved_bytes(model, x) -> tuple[int, torch.Tensor]:
    """Bytes of the storages a training forward saves for backward that are not parameters
    (a saved parameter costs no memory), and the output."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(saved.values()), out


@pytest.mark.parametrize("rule", ["CL", "CK"])
def test_collapsed_training_saves_the_compact_layers_tensors_and_the_composed_weight(rule):
    """Backward recomputes the composition: no partial product is kept, the gradients are
    those of the composition differentiated by plain autograd."""
    import torch.nn as nn
    import torch.nn.functional as F

    import expandfx as efx

    torch.manual_seed(0)
    compact = nn.Sequential(nn.Conv2d(8, 16, 7, padding=3))
    big = efx.expand(compact, rule, r=4, mode="collapsed")
    x = torch.randn(4, 8, 16, 16)
    compact_bytes, _ = _saved_bytes(compact, x)
    big_bytes, out = _saved_bytes(big, x)
    composed = 16 * 8 * 7 * 7 * 4  # the composed weight, float32
    assert compact_bytes == x.numel() * 4
    assert big_bytes == compact_bytes + composed
    grad = torch.linspace(-1, 1, out.numel()).view_as(out)
    params = list(big.parameters())
    ours = torch.autograd.grad(out, params, grad)
    w, b = big[0].weight_bias()  # plain autograd through the composition
    plain = torch.autograd.grad(F.conv2d(x, w, b, padding=3), params, grad)
    for g, r in zip(ours, plain, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_recomputed_composition_supports_double_backward():
    """Gradient penalties differentiate the gradient: the recomputing backward must give the
    second-order terms that plain autograd gives (keeping the partial products). In float64:
    the two orders of arithmetic agree to rounding, which in float32 leaves single elements
    of these second-order terms ~1e-4 apart."""
    import copy

    import torch.nn as nn

    import expandfx as efx

    torch.manual_seed(0)
    big = efx.expand(nn.Sequential(nn.Conv2d(3, 4, 5, padding=2)), "CL", r=2,
                     mode="collapsed").double()
    keep = efx.set_mode(copy.deepcopy(big), "collapsed", recompose=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    second = []
    for model in (big, keep):
        params = list(model.parameters())
        grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        second.append(torch.autograd.grad(penalty, params))
    for a, b in zip(*second, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ["CL", "CK", "FC"])
def test_the_recomputing_chain_backward_gives_the_sequential_gradients(rule):
    """A plain chain's backward recomputes only the last step's operands
    (``_RecomposeChain``): gradients equal the sequential execution's to rounding (float64),
    for the point method (CK) and the pairwise one (CL, FC)."""
    import copy

    import torch.nn as nn
    import torch.nn.functional as F

    import expandfx as efx

    torch.manual_seed(0)
    compact = nn.Sequential(nn.Conv2d(8, 16, 7, padding=3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(16 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    big = efx.expand(compact, rule, r=4, mode="collapsed")
    seq = efx.set_mode(copy.deepcopy(big), "sequential")
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 5, 7])
    grads = []
    for model in (big, seq):
        loss = F.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    block = big[0] if rule != "FC" else big[3]
    assert type(block.folded()[0].grad_fn).__name__ == "_RecomposeChainBackward"
    scale = max(g.abs().max() for g in grads[1])
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-10 * scale
