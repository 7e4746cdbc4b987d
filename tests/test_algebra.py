"""compose_chain against running the layers one after another, in float64."""

import pytest
import torch
from torch import nn

from expandfx.linear.compose import compose_chain

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [(3, 1, 2), (1, 3, 2), (1, 2, 1), (2, 2, 1)])
def test_chain_of_convs_is_one_conv(dims, groups, dilation, bias, sizes):
    torch.manual_seed(dims * 10 + groups)
    conv = CONV[dims]
    ks = [(k,) * dims for k in sizes]
    total = sum(sizes) - 2
    widths = [4, 6, 8, 2]
    layers = [conv(widths[i], widths[i + 1], ks[i], dilation=dilation, groups=groups,
                   bias=bias).double() for i in range(3)]
    weight, b = compose_chain([(lay.weight, lay.bias) for lay in layers], groups)
    assert weight.shape == (2, 4 // groups, *(total,) * dims)
    x = torch.randn(2, 4, *(9,) * dims, dtype=torch.float64)
    y = x
    for layer in layers:
        y = layer(y)
    one = conv(4, 2, total, dilation=dilation, groups=groups, bias=bias).double()
    with torch.no_grad():
        one.weight.copy_(weight)
        if bias:
            one.bias.copy_(b)
    assert (b is None) == (not bias)
    torch.testing.assert_close(one(x), y, rtol=1e-12, atol=1e-12)


def test_linear_chain_is_matrix_product():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 7).double(), nn.Linear(7, 3).double()
    w, bias = compose_chain([(a.weight, a.bias), (b.weight, b.bias)])
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(x @ w.T + bias, b(a(x)), rtol=1e-12, atol=1e-12)


def test_pointwise_after_strided_layer_folds():
    torch.manual_seed(1)
    a = nn.Conv2d(3, 5, 3, stride=2).double()
    b = nn.Conv2d(5, 4, 1).double()
    w, bias = compose_chain([(a.weight, a.bias), (b.weight, b.bias)])
    x = torch.randn(1, 3, 11, 11, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, w, bias, stride=2)
    torch.testing.assert_close(y, b(a(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize(("ka", "kb"), [((3, 3), (3, 3)), ((5, 5), (3, 3)), ((3, 5), (3, 1)),
                                        ((1, 1), (3, 3)), ((3, 3), (1, 1)), ((1, 1), (1, 1))])
def test_every_kernel_composition_method_gives_the_same_values_and_gradients(groups, ka, kb):
    """The fold path, the conv path and the pointwise paths against each other (float64)."""
    from expandfx.linear import compose as algebra

    torch.manual_seed(groups)
    wa = torch.randn(4 * groups, 3, *ka, dtype=torch.float64, requires_grad=True)
    wb = torch.randn(5 * groups, 4, *kb, dtype=torch.float64, requires_grad=True)
    ref = algebra.KERNEL_METHODS["conv"](wa, wb, groups)
    ref_grads = torch.autograd.grad(ref, (wa, wb), torch.linspace(-1, 1, ref.numel()).view_as(ref))
    outs = [algebra.compose_pair((wa, None), (wb, None), groups)[0]]  # as chains compose
    if ka != (1, 1) and kb != (1, 1):
        outs.append(algebra.KERNEL_METHODS["fold"](wa, wb, groups))
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out, (wa, wb), torch.linspace(-1, 1, out.numel()).view_as(out))
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_tune_kernels_measures_each_spatial_pair_once_and_leaves_rng_alone():
    """The tuner (execution) times each spatial pair of the chain and records the faster
    method where composition reads it (linear.compose); the caller's RNG and grads stay."""
    from expandfx import execution
    from expandfx.linear import compose

    execution.forget_measurements()
    layers = [nn.Conv2d(3, 6, 3), nn.Conv2d(6, 7, 3), nn.Conv2d(7, 2, 3)]
    factors = [(lay.weight, lay.bias) for lay in layers]
    rng = torch.get_rng_state()
    chosen = execution.tune_kernels(factors, 1, repeats=1)
    assert torch.equal(rng, torch.get_rng_state())
    # two spatial pairs in the chain's best order, both among {(6,3,3,3)->(7,6,3,3), ...}
    shapes = {(6, 3, 3, 3), (7, 3, 5, 5), (7, 6, 3, 3), (2, 7, 3, 3), (2, 6, 5, 5)}
    assert len(chosen) == 2 and all(a in shapes and b in shapes for a, b in chosen)
    assert set(chosen.values()) <= {"conv", "fold"}
    for (a, b), method in chosen.items():
        assert compose.known_kernel_method(a, b, 1, torch.float32, "cpu") == method
        wa, wb = torch.zeros(a), torch.zeros(b)
        assert compose.kernel_method(wa, wb, 1) == method  # what composition now uses
    assert all(lay.weight.grad is None for lay in layers)
    execution.forget_measurements()
    a, b = next(iter(chosen))
    assert compose.known_kernel_method(a, b, 1, torch.float32, "cpu") is None


def _pairwise(weights, groups):
    from expandfx.linear.compose import compose_pair

    out = (weights[0], None)
    for w in weights[1:]:
        out = compose_pair(out, (w, None), groups)
    return out[0]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kernels", [(3, 3, 3), (3, 1, 3), (1, 5, 3, 1), (3, 5), (3, 1, 1, 3),
                                     (3, 3, 1, 3)])
def test_the_point_method_composes_exactly_what_the_pairwise_folding_does(dims, groups, kernels):
    """Evaluation at points, a point-wise matrix chain and interpolation give the pairwise
    kernel to rounding (float64), pointwise factors and groups included; the bias of the
    chain is the pairwise one."""
    from expandfx.linear.compose import chain_bias, compose_pair, compose_points

    torch.manual_seed(dims + 3 * groups)
    widths = [4, 6, 8, 10, 2][:len(kernels) + 1]
    weights = [torch.randn(widths[i + 1], widths[i] // groups, *(k,) * dims,
                           dtype=torch.float64) for i, k in enumerate(kernels)]
    biases = [torch.randn(w.shape[0], dtype=torch.float64) for w in weights]
    ours = compose_points(weights, groups)
    ref = _pairwise(weights, groups)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    pair = (weights[0], biases[0])
    for w, b in zip(weights[1:], biases[1:], strict=True):
        pair = compose_pair(pair, (w, b), groups)
    bias = chain_bias(list(zip(weights, biases, strict=True)), groups)
    assert (bias - pair[1]).abs().max() <= 1e-10 * pair[1].abs().max()


@pytest.mark.parametrize("shapes", [
    [(128, 32, 3, 3), (256, 128, 3, 3), (64, 256, 3, 3)],  # CK: (A2 A1) at 25 points
    [(8, 4, 3, 3), (8, 8, 1, 1), (8, 8, 1, 1), (6, 8, 3, 3)],  # a pointwise sub-product
    [(8, 4, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (6, 8, 1, 1)],  # narrow: no lift pays
    [(32, 4, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (6, 64, 1, 1)],  # lifts 9 -> 25 -> 49
    [(8, 4, 1, 3), (8, 8, 3, 1), (6, 8, 3, 3)],  # per-dimension grids
    [(4, 2, 3, 3, 3), (6, 4, 3, 3, 3)],
])
def test_points_cost_counts_what_the_point_method_multiplies(shapes):
    """``points_cost`` is the products ``compose_points`` runs (torch's FLOP counter, two
    FLOPs per MAC); a sub-product runs at its own kernel's points and is lifted where the
    contracted channels make that cheaper (CK's two first 3x3 factors: 25 points, lifted
    to the 49 of the 7x7 result); lifted or not, the kernel is the pairwise one."""
    from torch.utils.flop_counter import FlopCounterMode

    from expandfx.linear import compose

    torch.manual_seed(len(shapes))
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = compose.compose_points(weights)  # also builds the cached point matrices
    ref = _pairwise(weights, 1)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    with FlopCounterMode(display=False) as counter:
        compose.compose_points(weights)
    assert counter.get_total_flops() == 2 * compose.points_cost(shapes)
    if shapes[:2] == [(8, 4, 3, 3), (8, 8, 3, 3)]:  # nothing lifted: all at the 49 points
        assert compose.points_cost(shapes) == 49 * (8 * 4 * 9 + 2 * 8 * 8 * 9) \
            + 49 * (8 * 8 * 4 + 8 * 8 * 4 + 6 * 8 * 4) + 6 * 4 * 49 ** 2
    if shapes[0] == (128, 32, 3, 3):
        a12 = 25 * (128 * 32 * 9 + 256 * 128 * 9 + 256 * 128 * 32) + 49 * 25 * 256 * 32
        a3 = 49 * 64 * 256 * 9
        assert compose.points_cost(shapes) == a12 + a3 + 49 * 64 * 256 * 32 + 64 * 32 * 49 ** 2


def test_point_matrices_first_built_under_inference_mode_still_train():
    """The point method caches its evaluation, lift and interpolation matrices; built first
    under ``torch.inference_mode`` they must still be plain tensors that a later training
    step can save for backward (1-D 2-, 4- and 2-tap kernels: grids no other test builds)."""
    from expandfx.linear.compose import compose_points

    torch.manual_seed(0)
    weights = [torch.randn(s, dtype=torch.float64) for s in ((6, 3, 2), (24, 6, 4), (2, 24, 2))]
    with torch.inference_mode():
        frozen = compose_points(weights)
    trained = [w.clone().requires_grad_() for w in weights]
    out = compose_points(trained)
    out.square().sum().backward()
    assert torch.equal(out.detach(), frozen) and all(w.grad is not None for w in trained)
    ref = _pairwise(weights, 1)
    assert (out.detach() - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_the_point_method_in_float32_stays_within_its_documented_error():
    """Conditioning of the 7 points (7.4e2): a 7x7 kernel from three 3x3 ones in float32
    agrees with the float64 one to about 3e-6 relative (pairwise: 3e-7)."""
    from expandfx.linear.compose import compose_points

    torch.manual_seed(0)
    shapes = [(128, 32, 3, 3), (256, 128, 3, 3), (64, 256, 3, 3)]
    weights = [torch.randn(s, dtype=torch.float64) / (s[1] * 9) ** 0.5 for s in shapes]
    ref = _pairwise(weights, 1)
    ours = compose_points([w.float() for w in weights]).double()
    assert (ours - ref).norm() <= 2e-5 * ref.norm()


def test_chain_method_takes_points_where_they_cost_fewer_macs_and_can_be_used():
    """CK's 3x3 chains of the Table 6 network: points (about half the MACs of the best
    pairwise order); a chain with one spatial kernel (CL), half precision, or a composed
    kernel over 7 wide: pairwise. ``chain_cost`` is what composition does."""
    from expandfx.linear import compose

    ck = [(128, 32, 3, 3), (256, 128, 3, 3), (64, 256, 3, 3)]
    assert compose.chain_method(ck) == "points"
    assert compose.chain_cost(ck) == compose.points_cost(ck) < compose.pairs_cost(ck) // 1.9
    assert compose.spatial_pairs(ck) == []  # nothing for the kernel-method tuner
    assert compose.chain_method(ck, torch.float16) == "pairs"
    assert compose.chain_method([(128, 32, 1, 1), (256, 128, 7, 7), (64, 256, 1, 1)]) == "pairs"
    wide = [(128, 32, 3, 3), (256, 128, 3, 3), (256, 256, 3, 3), (64, 256, 3, 3)]  # 9x9
    assert compose.chain_method(wide) == "pairs"
    # pair_cost: one MAC per tap pair and channel triple (the padding's zeros not counted)
    assert compose.pair_cost((6, 3, 3, 3), (8, 6, 3, 3)) == 8 * 6 * 3 * 9 * 9
    assert compose.last_step_cost(ck) == 49 * 64 * 256 * 32 + 64 * 32 * 49 * 49


@pytest.mark.parametrize("shapes", [
    [(32, 8, 3, 3), (64, 32, 3, 3), (16, 64, 3, 3)],  # points
    [(32, 8, 1, 1), (64, 32, 7, 7), (16, 64, 1, 1)],  # matmul (a pointwise last factor)
    [(40, 16), (12, 40)],  # matmul (linear)
    [(6, 3, 3, 3), (7, 6, 3, 3)],  # pair
])
def test_finish_grad_is_the_gradient_of_the_last_step(shapes):
    """The operands' gradients of the chain's last composition from ``dW`` and the operands
    alone equal autograd's through ``finish`` (float64)."""
    from expandfx.linear import compose

    torch.manual_seed(len(shapes))
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    step = compose.last_step(weights)
    assert torch.allclose(compose.finish(step), _pairwise(weights, 1), rtol=1e-10, atol=1e-10)
    dw = torch.randn(step.out, dtype=torch.float64)
    ours = compose.finish_grad(step, dw)
    if step.kind == "pair":
        assert ours is None
        return
    first, second = (t.detach().requires_grad_() for t in (step.first, step.second))
    ref = torch.autograd.grad(compose.finish(step._replace(first=first, second=second)),
                              [first, second], dw)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def test_a_recorded_chain_method_is_read_per_shapes_dtype_and_device_and_refused_where_unusable():
    """prefer/known/forget_chain_method: composition reads the recorded preference for its
    weights' shapes, dtype and device; a recorded "points" is refused where points cannot be
    used (half precision, reduced-precision float32 matmuls, a composed kernel over 7)."""
    from expandfx.linear import compose

    compose.forget_chain_methods()
    ck = [(128, 32, 3, 3), (256, 128, 3, 3), (64, 256, 3, 3)]
    assert compose.known_chain_method(ck, torch.float32, "cpu") is None
    compose.prefer_chain_method(ck, torch.float32, "cpu", "pairs")
    assert compose.known_chain_method(ck, torch.float32, "cpu") == "pairs"
    assert compose.chain_method(ck, torch.float32, "cpu") == "pairs"
    assert compose.chain_method(ck, torch.float32, "meta") == "points"  # another device
    assert compose.chain_method(ck) == "points"  # no device: the MAC rule
    assert compose.spatial_pairs(ck, torch.float32, "cpu") != []  # pairs: tuned per pair
    for dtype in (torch.float16, torch.bfloat16):
        compose.prefer_chain_method(ck, dtype, "cpu", "points")
        assert compose.chain_method(ck, dtype, "cpu") == "pairs"
    small = [(12, 3, 3, 3), (32, 12, 3, 3), (8, 32, 3, 3)]  # pairs by MACs
    compose.prefer_chain_method(small, torch.float32, "cpu", "points")
    assert compose.chain_method(small) == "pairs"
    assert compose.chain_method(small, torch.float32, "cpu") == "points"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert compose.chain_method(small, torch.float32, "cpu") == "pairs"
        with pytest.raises(ValueError, match="cannot compose"):
            compose.compose_chain([(torch.zeros(s), None) for s in small], method="points")
    finally:
        torch.set_float32_matmul_precision(before)
    wide = [(8, 4, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (4, 8, 3, 3)]  # 9x9
    compose.prefer_chain_method(wide, torch.float64, "cpu", "points")
    assert compose.chain_method(wide, torch.float64, "cpu") == "pairs"
    with pytest.raises(ValueError, match="must be one of"):
        compose.prefer_chain_method(ck, torch.float32, "cpu", "fold")
    compose.forget_chain_methods([ck])
    assert compose.known_chain_method(ck, torch.float32, "cpu") is None
    assert compose.known_chain_method(small, torch.float32, "cpu") == "points"
    compose.forget_chain_methods()
    assert compose.known_chain_method(small, torch.float32, "cpu") is None


@pytest.mark.parametrize("groups", [1, 2])
def test_pairs_and_points_compose_the_same_chain_to_1e12_in_float64(groups):
    """Both chain methods, forced: the same weight, bias and gradients (float64)."""
    from expandfx.linear import compose

    torch.manual_seed(groups)
    widths = [4, 8, 12, 6]
    factors = [(torch.randn(widths[i + 1], widths[i] // groups, 3, 3, dtype=torch.float64,
                            requires_grad=True),
                torch.randn(widths[i + 1], dtype=torch.float64, requires_grad=True))
               for i in range(3)]
    leaves = [t for pair in factors for t in pair]
    results = {}
    for method in compose.CHAIN_METHODS:
        w, b = compose.compose_chain(factors, groups, method=method)
        grads = torch.autograd.grad((w, b), leaves, (torch.linspace(-1, 1, w.numel()).view_as(w)
                                                     .double(), torch.ones_like(b)))
        results[method] = (w, b, grads)
        step = compose.last_step([w for w, _ in factors], groups, method=method)
        assert step.kind == ("points" if method == "points" else "pair")
        assert (compose.finish(step) - w).abs().max() <= 1e-12 * w.abs().max()
    (wa, ba, ga), (wb, bb, gb) = results["pairs"], results["points"]
    assert (wa - wb).abs().max() <= 1e-12 * wa.abs().max()
    assert (ba - bb).abs().max() <= 1e-12 * ba.abs().max()
    for x, y in zip(ga, gb, strict=True):
        assert (x - y).abs().max() <= 1e-12 * x.abs().max()
    with pytest.raises(ValueError, match="must be one of"):
        compose.compose_chain(factors, groups, method="fold")
