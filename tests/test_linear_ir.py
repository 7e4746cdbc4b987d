"""The linear-map IR: random branch topologies fold exactly; illegal ones say why.

Random trees of real conv layers (1-D/2-D/3-D, groups, dilation, stride, every padding mode,
identity branches, chains inside branches) are run module by module and compared with the
single convolution ``fold`` returns (float64), and, wrapped in an ``ExpandedBlock``,
collapsed execution is compared with sequential execution, gradients included.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support import examples, rel_err
from torch import nn

from expandfx.block import ExpandedBlock
from expandfx.errors import FoldError
from expandfx.linear import Affine, Identity, Par, Seq, batchnorm, fold
from expandfx.linear.fold import regroup
from expandfx.linear.ir import map_leaves, multiplicity, pad_from_pairs, run

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ("zeros", "reflect", "replicate", "circular")


def random_case(seed: int) -> dict:
    """A legal sum of branches over one input; every branch is a conv, a chain or identity."""
    rnd = random.Random(seed)
    dims = rnd.choice((1, 2, 2, 3))
    g = rnd.choice((1, 1, 2, 4))
    c_in = g * rnd.randint(1, 3)
    c_out = c_in if rnd.random() < 0.5 else g * rnd.randint(1, 3)
    stride = tuple(rnd.choice((1, 1, 2)) for _ in range(dims))
    dil = tuple(rnd.choice((1, 1, 2)) for _ in range(dims))
    big = tuple(rnd.choice((3, 5)) if dims < 3 else 3 for _ in range(dims))
    extra = tuple(rnd.choice((0, 0, 1)) * d for d in dil)  # over-padding, in dilated taps
    mode = rnd.choice(MODES)
    bias = rnd.random() < 0.7
    identity_ok = c_in == c_out and all(s == 1 for s in stride) and not any(extra)
    branches: dict = {}
    for i in range(rnd.randint(1, 3)):
        kinds = ("conv", "conv", "pre1x1", "post1x1") + (("identity",) if i else ())
        kind = rnd.choice(kinds)  # the first branch has the full kernel
        if kind == "identity" and not identity_ok:
            kind = "conv"
        k = big if i == 0 else tuple(rnd.choice([s for s in (1, 3, 5) if s <= b]) for b in big)
        pad = tuple(d * (s - 1) // 2 + e for d, s, e in zip(dil, k, extra, strict=True))  # centred
        conv_kw = dict(stride=stride, padding=pad, dilation=dil, groups=g, padding_mode=mode)
        make = CONV[dims]
        if kind == "identity":
            branches[f"b{i}"] = nn.Identity()
        elif kind == "conv":
            branches[f"b{i}"] = make(c_in, c_out, k, bias=bias, **conv_kw)
        elif kind == "pre1x1":  # bias-free 1x1 first: the padding moves in front of it
            mid = g * rnd.randint(1, 3)
            branches[f"b{i}"] = [make(c_in, mid, 1, groups=g, bias=False),
                                 make(mid, c_out, k, bias=bias, **conv_kw)]
        else:  # strided spatial conv, then a 1x1 (commutes with the stride)
            mid = g * rnd.randint(1, 3)
            branches[f"b{i}"] = [make(c_in, mid, k, bias=bias, **conv_kw),
                                 make(mid, c_out, 1, groups=g, bias=bias)]
    padding = tuple(d * (s - 1) // 2 + e for d, s, e in zip(dil, big, extra, strict=True))
    original = CONV[dims](c_in, c_out, big, stride=stride, dilation=dil, groups=g, bias=bias,
                          padding_mode=mode, padding=padding)
    size = [rnd.randint(9, 13) for _ in range(dims)]
    return {"branches": branches, "original": original, "x_shape": (2, c_in, *size),
            "seed": seed}


def conv_with(one: Affine, x: torch.Tensor) -> torch.Tensor:
    """Run a folded ``Affine`` with its own geometry (explicit padding, then a valid conv)."""
    g = one.geometry
    pad = pad_from_pairs(g.padding)
    mode = {"zeros": "constant"}.get(g.padding_mode, g.padding_mode)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[g.dims]
    return conv(x, one.weight, one.bias, stride=g.stride, dilation=g.dilation, groups=g.groups)


def block_of(case: dict) -> ExpandedBlock:
    torch.manual_seed(case["seed"])
    return ExpandedBlock(case["original"], case["branches"], rule="test", r=1.0).double()


@settings(max_examples=examples(60, 600), deadline=None)
@given(seed=st.integers(0, 10**6))
def test_random_branch_topologies_fold_exactly(seed: int) -> None:
    case = random_case(seed)
    block = block_of(case)
    x = torch.randn(case["x_shape"], dtype=torch.float64)
    seq = run(block.topology, x, lambda path, y: block.get_submodule(path)(y))
    one = fold(block.linear_map())
    assert rel_err(seq, conv_with(one, x)) < 1e-12
    assert tuple(one.weight.shape) == tuple(case["original"].weight.shape)
    small = block.contract()
    assert rel_err(seq, small(x)) < 1e-12


@settings(max_examples=examples(30, 300), deadline=None)
@given(seed=st.integers(0, 10**6))
def test_collapsed_and_sequential_agree_with_gradients(seed: int) -> None:
    case = random_case(seed)
    block = block_of(case)
    x = torch.randn(case["x_shape"], dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode in ("sequential", "collapsed"):
        block.mode = mode
        block.zero_grad()
        x.grad = None
        y = block(x)
        weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        (y * weights).sum().backward()
        grads[mode] = (y.detach(), x.grad.clone(),
                       [p.grad.clone() for p in block.parameters()])
    (ys, xs, ps), (yc, xc, pc) = grads["sequential"], grads["collapsed"]
    assert rel_err(ys, yc) < 1e-12 and rel_err(xs, xc) < 1e-12
    assert len(ps) == len(pc) > 0
    for a, b in zip(ps, pc, strict=True):  # absolute floor: a gradient may be exactly zero
        assert (a - b).abs().max() <= 1e-10 * max(1.0, a.abs().max().item())


def test_repvgg_by_hand_matches_fold() -> None:
    """3x3 + 1x1 + identity: the folded kernel is K + centred 1x1 + Dirac, biases summed."""
    torch.manual_seed(0)
    k3, k1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
    one = fold(Par((Affine.of(k3), Affine.of(k1), Identity())))
    expected = k3.weight.detach().clone()
    expected[:, :, 1, 1] += k1.weight.detach()[:, :, 0, 0] + torch.eye(4)
    assert torch.allclose(one.weight, expected)
    assert torch.allclose(one.bias, k3.bias + k1.bias)
    assert one.geometry.padding == ((1, 1), (1, 1))


def test_batchnorm_folds_after_conv_and_alone_as_a_branch() -> None:
    torch.manual_seed(0)
    conv, bn, bn_id = nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
    for b in (bn, bn_id):
        b.running_mean.normal_()
        b.running_var.uniform_(0.5, 2)
        b.weight.data.normal_()
        b.bias.data.normal_()
    net = lambda x: bn(conv(x)) + bn_id(x)  # noqa: E731
    for b in (bn, bn_id):
        b.eval()
    one = fold(Par((Seq((Affine.of(conv), batchnorm(bn, 2))), batchnorm(bn_id, 2))))
    assert one.geometry.groups == 3  # BN (6 groups) regrouped to the conv's 3
    x = torch.randn(2, 6, 8, 8)
    assert rel_err(net(x), conv_with(one, x)) < 1e-6


def test_linear_chain_with_batchnorm1d() -> None:
    torch.manual_seed(0)
    a, bn, b = nn.Linear(5, 7), nn.BatchNorm1d(7).eval(), nn.Linear(7, 3)
    bn.running_var.uniform_(0.5, 2)
    one = fold(Seq((Affine.of(a), batchnorm(bn, 0), Affine.of(b))))
    x = torch.randn(4, 5)
    assert rel_err(b(bn(a(x))), F.linear(x, one.weight, one.bias)) < 1e-6


def test_regroup_is_the_same_map() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 2, 3, 3)  # 4 groups
    x = torch.randn(1, 8, 6, 6)
    ref = F.conv2d(x, w, groups=4)
    for to in (1, 2, 4):
        assert rel_err(ref, F.conv2d(x, regroup(w, 4, to), groups=to)) < 1e-6
    with pytest.raises(FoldError, match="cannot regroup a 4-group weight into 3"):
        regroup(w, 4, 3)


@pytest.mark.parametrize("tree, reason", [
    (lambda: Seq((Affine.of(nn.Conv2d(2, 2, 3)), Affine.of(nn.Conv2d(2, 2, 3, padding=1)))),
     "pads after map 0, which is spatial"),
    (lambda: Seq((Affine.of(nn.Conv2d(2, 2, 1)), Affine.of(nn.Conv2d(2, 2, 3, padding=1)))),
     "which is biased"),
    (lambda: Seq((Affine.of(nn.Conv2d(2, 2, 3, stride=2)), Affine.of(nn.Conv2d(2, 2, 3)))),
     "only pointwise maps may follow a stride"),
    (lambda: Par((Affine.of(nn.Conv2d(2, 2, 3, padding=1)),
                  Affine.of(nn.Conv2d(2, 2, 3, padding=1, stride=2)))), "different strides"),
    (lambda: Par((Affine.of(nn.Conv2d(2, 2, 3, padding=1)),
                  Affine.of(nn.Conv2d(2, 2, 1, padding=1)))),
     "different right edges|not a whole number"),
    (lambda: Par((Affine.of(nn.Conv2d(2, 3, 3, padding=1)), Identity())), "equal in and out"),
    (lambda: Par((Affine.of(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")),
                  Affine.of(nn.Conv2d(2, 2, 3, padding=1)))), "different modes"),
    (lambda: Seq((Affine.of(nn.Conv2d(2, 2, 3)), Affine.of(nn.Linear(2, 2)))), "mixes linear"),
    (lambda: Seq((Affine.of(nn.Conv2d(2, 3, 3)), Affine.of(nn.Conv2d(2, 2, 1)))),
     "gives 3 channels but map 1 takes 2"),
    (lambda: Par((Identity(),)), "identities alone"),
])
def test_illegal_trees_say_why(tree, reason: str) -> None:
    with pytest.raises(FoldError, match=reason):
        fold(tree())


def test_padding_moves_through_reflect_padded_biased_pointwise() -> None:
    """Copying pad modes commute with a biased 1x1 (they copy the bias along); zeros do not."""
    torch.manual_seed(0)
    p, k = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")
    one = fold(Seq((Affine.of(p), Affine.of(k))))
    x = torch.randn(2, 3, 7, 7)
    assert rel_err(k(p(x)), conv_with(one, x)) < 1e-6


def test_multiplicity_counts_factors_a_step_moves() -> None:
    tree = Par((Seq(("a", "b", "c")), "d", Identity()))
    assert multiplicity(tree) == 4
    assert map_leaves(tree, str.upper) == Par((Seq(("A", "B", "C")), "D", Identity()))


# --- transposed convolutions (issue #22) --------------------------------------------------

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def transposed_chains(draw):
    """1×1 (bias-free) · ConvTranspose (every hyperparameter) · 1×1 · BatchNorm (eval)."""
    dims = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 1, 2, 3]))
    m, p, q, n = (g * draw(st.integers(1, 3)) for _ in range(4))
    kernel = tuple(draw(st.integers(1, 4 if dims < 3 else 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    # padding crops the output: at most half the dilated kernel keeps it non-empty
    padding = tuple(draw(st.integers(0, d * (k - 1) // 2)) for k, d in zip(kernel, dilation,
                                                                            strict=True))
    # torch: output_padding < max(stride, dilation) per dim
    out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation,
                                                                         strict=True))
    parts = draw(st.sampled_from(["pre", "post", "bn", "pre+post", "pre+post+bn"]))
    layers = []
    if "pre" in parts:
        layers.append(CONV[dims](m, p, 1, groups=draw(st.sampled_from([1, g])), bias=False))
    else:
        p = m
    layers.append(TRANSPOSED[dims](p, q, kernel, stride=stride, padding=padding,
                                   output_padding=out_pad, dilation=dilation, groups=g,
                                   bias=draw(st.booleans())))
    if "post" in parts:
        layers.append(CONV[dims](q, n, 1, groups=draw(st.sampled_from([1, g])),
                                 bias=draw(st.booleans())))
    else:
        n = q
    if "bn" in parts:
        layers.append(BN[dims](n))
    size = [draw(st.integers(1, 5 if dims < 3 else 3)) for _ in range(dims)]
    return layers, (2, m, *size), dims


def transposed_tree(layers, dims):
    return Seq(tuple(batchnorm(layer, dims) if isinstance(layer, nn.modules.batchnorm._NormBase)
                     else Affine.of(layer) for layer in layers))


@settings(max_examples=examples(40, 400), deadline=None)
@given(case=transposed_chains(), seed=st.integers(0, 99), dtype=st.sampled_from(
    [torch.float32, torch.float64]))
def test_chains_through_a_transposed_conv_fold_exactly(case, seed, dtype):
    layers, shape, dims = case
    torch.manual_seed(seed)
    model = nn.Sequential(*layers).to(dtype).eval()
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.modules.batchnorm._NormBase):
                layer.running_mean.normal_()
                layer.running_var.uniform_(0.5, 2)
                layer.weight.normal_()
                layer.bias.normal_()
        x = torch.randn(shape, dtype=dtype)
        one = fold(transposed_tree(layers, dims))
        t = next(m for m in layers if isinstance(m, nn.modules.conv._ConvTransposeNd))
        assert one.geometry.transposed and one.in_channels == shape[1]
        # the folded map is a ConvTranspose of the same class and hyperparameters
        folded = type(t)(one.in_channels, one.out_channels, t.kernel_size, stride=t.stride,
                         padding=t.padding, output_padding=t.output_padding,
                         dilation=t.dilation, groups=one.geometry.groups,
                         bias=one.bias is not None).to(dtype)
        folded.weight.copy_(one.weight)
        if one.bias is not None:
            folded.bias.copy_(one.bias)
        want, got = model(x), folded(x)
    assert got.shape == want.shape
    assert rel_err(want, got) <= (1e-5 if dtype == torch.float32 else 1e-12)


def test_convtranspose_then_batchnorm_folds_to_one_convtranspose():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    up, bn = up.double(), bn.double()
    one = fold(Seq((Affine.of(up), batchnorm(bn, 2))))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        want = bn(up(x))
        got = F.conv_transpose2d(x, one.weight, one.bias, stride=2, padding=1, output_padding=1)
    assert got.shape == (2, 4, 10, 10) and rel_err(want, got) <= 1e-12


@pytest.mark.parametrize(("layers", "match"), [
    ([nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 2, stride=2)], r"map 0.*biased.*unevenly"),
    ([nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 4, 3)], r"map 1.*spatial"),
    ([nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 4, 1, stride=2)], r"map 1.*strided"),
    ([nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ConvTranspose2d(4, 4, 2)], r"through one only"),
])
def test_chains_through_a_transposed_conv_that_do_not_fold_say_why(layers, match):
    with pytest.raises(FoldError, match=match):
        fold(Seq(tuple(Affine.of(layer) for layer in layers)))
    with pytest.raises(FoldError, match=r"sum with a transposed"):
        fold(Par((Affine.of(nn.ConvTranspose2d(4, 4, 2)), Affine.of(nn.ConvTranspose2d(4, 4, 2)))))
