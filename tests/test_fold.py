"""expandfx.fold: every linear subgraph of a traced model folded into one layer, verified.

Hand-written blocks (conv→BN, ACNet, RepVGG, DBB, grouped/depthwise, Linear→BN1d, residual),
what must not fold (with its reason), timm's RepVGG/MobileOne against timm's own
``reparameterize_model``, and ONNX export with ``fold=True``.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.fx as fx
from support import rel_err, state_equal
from torch import nn

import expandfx as efx

TOL = 1e-5  # docs/design.md §4, float32
pytestmark = pytest.mark.usefixtures("one_thread")


def rbn(bn: nn.Module, seed: int = 0, spread: float = 1.0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (``spread`` scales how far
    from the identity map they are)."""
    gen = torch.Generator().manual_seed(seed + bn.num_features)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5 * spread)
        bn.running_var.copy_(1 + (torch.rand(n, generator=gen) * 1.5 - 0.5) * spread)
        bn.weight.copy_(1 + (torch.randn(n, generator=gen) - 1) * spread)
        bn.bias.copy_(torch.randn(n, generator=gen) * spread)
    return bn


def randomize_bns(model: nn.Module, spread: float = 1.0) -> nn.Module:
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            rbn(m, seed=i, spread=spread)
    return model


def calibrated(model: nn.Module) -> nn.Module:
    """Real running statistics (from random images) and random BatchNorm affine parameters,
    in eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average
                m.weight.uniform_(0.1, 0.4, generator=gen)
                m.bias.normal_(0, 0.05, generator=gen)
        model.train()
        model(torch.randn(8, 3, 32, 32, generator=gen))
    return model.eval()


def count(model: nn.Module, *types: type) -> int:
    return sum(isinstance(m, types) for m in model.modules())


BN = nn.modules.batchnorm._BatchNorm


def folded(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """Fold, and check the result: a GraphModule, within tolerance, the model untouched."""
    before = copy.deepcopy(model.state_dict())
    gm = efx.fold(model, (x,))
    assert state_equal(before, model.state_dict())
    assert isinstance(gm, fx.GraphModule)
    with torch.no_grad():  # on copies: a training-mode BatchNorm updates its statistics
        want, got = copy.deepcopy(model)(x), copy.deepcopy(gm)(x)
    for a, b in zip(*((w,) if torch.is_tensor(w) else w for w in (want, got)), strict=True):
        assert rel_err(a, b) <= TOL
    assert gm.meta["expandfx.fold"].error <= TOL
    return gm


def reasons(gm: fx.GraphModule) -> str:
    return "\n".join(f"{k['node']}: {k['reason']}" for k in gm.meta["expandfx.fold"].kept)


class ConvBN(nn.Sequential):
    def __init__(self, c_in, c_out, k, stride=1, padding=0, groups=1, dims=2, bias=False):
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        super().__init__(conv(c_in, c_out, k, stride, padding, groups=groups, bias=bias),
                         rbn(norm(c_out)))


class RepVGG(nn.Module):
    def __init__(self, c_in=8, c_out=8, stride=1, groups=1):
        super().__init__()
        self.kxk = ConvBN(c_in, c_out, 3, stride, 1, groups)
        self.k1x1 = ConvBN(c_in, c_out, 1, stride, 0, groups)
        self.identity = rbn(nn.BatchNorm2d(c_in)) if stride == 1 and c_in == c_out else None

    def forward(self, x):
        y = self.kxk(x) + self.k1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class ACNet(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.square = ConvBN(c, c, (3, 3), padding=(1, 1))
        self.hor = ConvBN(c, c, (1, 3), padding=(0, 1))
        self.ver = ConvBN(c, c, (3, 1), padding=(1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class DBB(nn.Module):
    """A 1×1 (no bias) → 3×3 (padded) → BN branch beside a 3×3 → BN branch."""

    def __init__(self, c=6, groups=1):
        super().__init__()
        self.reduce = nn.Conv2d(c, 2 * c, 1, bias=False, groups=groups)
        self.expand = ConvBN(2 * c, c, 3, padding=1, groups=groups)
        self.kxk = ConvBN(c, c, 3, padding=1, groups=groups)

    def forward(self, x):
        return self.expand(self.reduce(x)) + self.kxk(x)


class Residual(nn.Module):
    def __init__(self, c=6, inplace=False):
        super().__init__()
        self.conv, self.inplace = nn.Conv2d(c, c, 3, padding=1), inplace

    def forward(self, x):
        if self.inplace:
            out = self.conv(x)
            out += x
            return out
        return x + self.conv(x)


def test_conv_bn_folds_in_1d_2d_3d():
    for dims, shape in ((1, (2, 4, 20)), (2, (2, 4, 10, 10)), (3, (2, 4, 5, 6, 7))):
        model = nn.Sequential(ConvBN(4, 8, 3, padding=1, dims=dims, bias=True), nn.ReLU()).eval()
        gm = folded(model, torch.randn(shape))
        assert count(gm, nn.Conv1d, nn.Conv2d, nn.Conv3d) == 1 and count(gm, BN) == 0
        assert [f["modules"] for f in gm.meta["expandfx.fold"].folded] == [["0.0", "0.1"]]


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 4), (1, 8), (2, 8)])
def test_repvgg_block_folds_to_one_conv(stride, groups):
    model = nn.Sequential(RepVGG(8, 8, stride, groups), RepVGG(8, 8, 1, groups)).eval()
    gm = folded(model, torch.randn(2, 8, 12, 12))
    assert count(gm, nn.Conv2d) == 2 and count(gm, BN) == 0
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(stride, stride), (1, 1)]
    assert all(c.groups == groups and c.kernel_size == (3, 3) for c in convs)
    assert "torch.relu" in gm.code and "add" not in gm.code
    text = str(gm.meta["expandfx.fold"])
    assert "(0.kxk.0 → 0.kxk.1) + (0.k1x1.0 → 0.k1x1.1)" in text
    assert ("+ 0.identity" in text) == (stride == 1)


def test_acnet_block_folds_to_one_3x3():
    gm = folded(ACNet().eval(), torch.randn(2, 6, 9, 11))
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and count(gm, BN) == 0


@pytest.mark.parametrize("groups", [1, 3])
def test_dbb_style_chain_branch_folds(groups):
    gm = folded(DBB(6, groups).eval(), torch.randn(2, 6, 8, 8))
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (3, 3) and conv.groups == groups and count(gm, BN) == 0
    assert gm.meta["expandfx.fold"].folded[0]["formula"] == (
        "(reduce → expand.0 → expand.1) + (kxk.0 → kxk.1)")


def depthwise_separable() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                         rbn(nn.BatchNorm2d(8)), nn.Conv2d(8, 16, 1, groups=2),
                         rbn(nn.BatchNorm2d(16)), nn.ReLU()).eval()


def test_depthwise_then_pointwise_stays_two_layers():
    """Merged, the pair would be a dense grouped 3×3 (592 parameters for 200): kept apart,
    each with its BatchNorm folded, and the report gives the numbers."""
    gm = folded(depthwise_separable(), torch.randn(2, 8, 7, 7))
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.groups, c.kernel_size) for c in convs] == [(8, (3, 3)), (2, (1, 1))]
    assert count(gm, BN) == 0
    assert ("merging would cost 592 parameters and 56.45K MACs instead of 160 and 13.33K"
            in reasons(gm))
    assert "allow_larger=True" in reasons(gm)


def test_allow_larger_merges_depthwise_and_pointwise():
    gm = efx.fold(depthwise_separable(), (torch.randn(2, 8, 7, 7),), allow_larger=True)
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 2 and conv.out_channels == 16 and count(gm, BN) == 0
    assert gm.meta["expandfx.fold"].error <= TOL


def test_linear_batchnorm1d_mlp():
    model = nn.Sequential(nn.Linear(8, 16), rbn(nn.BatchNorm1d(16)), nn.ReLU(),
                          nn.Linear(16, 4), rbn(nn.BatchNorm1d(4))).eval()
    gm = folded(model, torch.randn(5, 8))
    assert count(gm, nn.Linear) == 2 and count(gm, BN) == 0


def test_linear_on_rank3_does_not_take_batchnorm1d():
    """BatchNorm1d on [N, C, L] normalises dim 1; a Linear maps the last dim: no fold."""
    model = nn.Sequential(nn.Linear(6, 6), rbn(nn.BatchNorm1d(4))).eval()
    gm = folded(model, torch.randn(2, 4, 6))
    assert count(gm, nn.Linear) == 1 and count(gm, BN) == 1
    assert "they fold together only on a rank-2 [N, C] tensor" in reasons(gm)


@pytest.mark.parametrize("inplace", [False, True])
def test_residual_identity_branch_folds(inplace):
    gm = folded(Residual(inplace=inplace).eval(), torch.randn(2, 6, 8, 8))
    assert count(gm, nn.Conv2d) == 1 and "add" not in gm.code
    assert gm.meta["expandfx.fold"].folded[0]["formula"] in ("x + conv", "conv + x")


def test_asymmetric_same_padding_gets_an_explicit_pad():
    model = nn.Sequential(nn.Conv2d(4, 4, 4, padding="same"), rbn(nn.BatchNorm2d(4))).eval()
    gm = folded(model, torch.randn(2, 4, 9, 9))
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.padding == (0, 0) and "torch.nn.functional.pad" in gm.code
    assert "F.pad([1, 2, 1, 2]" in gm.meta["expandfx.fold"].folded[0]["as"]


def test_model_in_training_mode_folds_its_eval_form_with_a_warning():
    model = nn.Sequential(ConvBN(3, 4, 3), nn.Dropout(0.5), nn.ReLU())
    model.train()
    stats = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match="Sequential is in training mode; folding its eval"):
        gm = efx.fold(model, (x,))
    assert model.training and state_equal(stats, model.state_dict())  # the model untouched
    assert not gm.training and count(gm, nn.Conv2d) == 1 and count(gm, BN, nn.Dropout) == 0
    with torch.no_grad():
        assert rel_err(copy.deepcopy(model).eval()(x), gm(x)) <= TOL


def test_relu_between_convs_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    gm = folded(model, torch.randn(2, 3, 10, 10))
    assert count(gm, nn.Conv2d) == 2 and not gm.meta["expandfx.fold"].folded
    text = reasons(gm)
    assert "'0' (Conv2d): nothing linear to fold it with" in text and "'1' (ReLU)" in text


class SharedValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1)
        self.bn2, self.conv3 = rbn(nn.BatchNorm2d(6)), nn.Conv2d(6, 6, 1)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn2(self.conv2(y)) + self.conv3(y), y


def test_value_used_twice_is_a_boundary():
    gm = folded(SharedValue().eval(), torch.randn(2, 3, 9, 9))
    assert count(gm, nn.Conv2d) == 2 and count(gm, BN) == 0  # conv1 + the folded sum
    assert "'conv1' (Conv2d): its output has 3 users" in reasons(gm)
    assert gm.meta["expandfx.fold"].folded[0]["modules"] == ["conv2", "bn2", "conv3"]


def test_padding_after_a_spatial_conv_is_a_fold_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1)).eval()
    gm = folded(model, torch.randn(2, 3, 10, 10))
    assert count(gm, nn.Conv2d) == 2
    assert "pads after map 0, which is spatial" in reasons(gm)


def test_biased_batchnorm_before_a_padded_conv_is_kept_apart():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), rbn(nn.BatchNorm2d(4)),
                          nn.Conv2d(4, 4, 3, padding=1)).eval()
    gm = folded(model, torch.randn(2, 3, 8, 8))
    assert count(gm, nn.Conv2d) == 2 and count(gm, BN) == 0  # conv→BN folded, padded conv kept
    assert "biased" in reasons(gm)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class TaggedConv(nn.Conv2d):
    """A subclass that computes the plain op: folds."""

    tag = "mine"


def test_subclasses_fold_only_when_they_compute_the_plain_op():
    model = nn.Sequential(ScaledConv(3, 4, 3), rbn(nn.BatchNorm2d(4)), nn.ReLU(),
                          TaggedConv(4, 4, 3), rbn(nn.BatchNorm2d(4))).eval()
    gm = folded(model, torch.randn(2, 3, 10, 10))
    assert count(gm, ScaledConv) == 1 and count(gm, BN) == 1
    assert count(gm, TaggedConv) == 0 and count(gm, nn.Conv2d) == 2
    assert "'0' (ScaledConv) does not compute plain F.conv2d" in reasons(gm)


def test_timm_layer_subclasses_are_checked_numerically():
    """timm's Conv2dSame pads dynamically; a BatchNormAct2d with a ReLU is not linear."""
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(layers.Conv2dSame(3, 4, 3), rbn(layers.BatchNormAct2d(4)),
                          nn.Conv2d(4, 4, 3), rbn(layers.BatchNormAct2d(4, apply_act=True)),
                          nn.Conv2d(4, 4, 1), rbn(layers.BatchNormAct2d(4, apply_act=False)))
    gm = folded(model.eval(), torch.randn(2, 3, 9, 9))
    assert count(gm, layers.Conv2dSame) == 1 and count(gm, layers.BatchNormAct2d) == 2
    assert count(gm, nn.Conv2d) == 3  # Conv2dSame, the 3×3, and 1×1 + BN folded
    text = reasons(gm)
    assert "'0' (Conv2dSame) does not compute plain F.conv2d" in text
    assert "'3' (BatchNormAct2d) does not compute plain F.batch_norm (eval)" in text


class Branchy(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), rbn(nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3))) if x.sum() > 0 else y.sum()


def test_untraceable_model_folds_from_a_recorded_forward():
    model, x = Branchy().eval(), torch.randn(2, 3, 8, 8).abs()
    out = efx.fold(model, (x,))
    assert type(out) is Branchy and type(out.bn) is nn.Identity and type(model.bn) is not \
        nn.Identity
    assert out.conv.bias is not None and count(out, BN) == 0
    report = out.meta["expandfx.fold"]
    assert report.graph == "recorded forward" and report.error <= TOL
    assert report.folded[0]["modules"] == ["conv", "bn"]
    assert "torch.fx cannot trace Branchy" in report.kept[0]["reason"]
    with torch.no_grad():
        assert rel_err(model(x), out(x)) <= TOL


def test_expanded_model_is_contracted_then_folded():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), rbn(nn.BatchNorm2d(8)), nn.ReLU())
    big = efx.expand(model, "CL", r=2).eval()
    gm = folded(big, torch.randn(2, 3, 8, 8))
    assert count(gm, nn.Conv2d) == 1 and count(gm, BN) == 0


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_reparameterizable_models_match_timm(name):
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bns(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = efx.fold(model, (x,))
    timm_way = reparameterize_model(copy.deepcopy(model))
    with torch.no_grad():
        ours, theirs, original = gm(x), timm_way(x), model(x)
    assert rel_err(theirs, ours) <= TOL and rel_err(original, ours) <= TOL
    n_params = sum(p.numel() for p in gm.parameters())
    assert n_params <= sum(p.numel() for p in timm_way.parameters())
    assert count(gm, nn.Conv2d) <= count(timm_way, nn.Conv2d)
    assert count(gm, BN) == 0


def onnx_ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_export_onnx_fold_toy_repvgg(tmp_path):
    model = nn.Sequential(RepVGG(4, 8, 2), RepVGG(8, 8), RepVGG(8, 8)).eval()
    x = torch.randn(2, 4, 16, 16)
    report = efx.export_onnx(model, (x,), tmp_path / "m.onnx", fold=True)
    assert report.passed and report.structure_matches is None
    assert any("expandfx.fold" in t for t in report.transformed)
    ops = onnx_ops(tmp_path / "m.onnx")
    assert ops.get("Conv") == 3 and "BatchNormalization" not in ops
    plain = efx.export_onnx(model, (x,), tmp_path / "plain.onnx")
    assert onnx_ops(tmp_path / "plain.onnx")["Conv"] == 6  # the exporter fuses some BNs itself
    assert report.parameter_count < plain.parameter_count


def test_export_onnx_fold_timm_repvgg(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # statistics measured on data, logits kept O(0.1): 22 layers deep, float32 rounding
    # differs between onnxruntime and torch by ~5e-6 of the largest output, and the check's
    # atol of 1e-5 is absolute — exporting the unfolded model fails alike at larger scales
    model = calibrated(timm.create_model("repvgg_a0", pretrained=False))
    with torch.no_grad():
        model.head.fc.weight.mul_(0.1)
    report = efx.export_onnx(model, (torch.randn(1, 3, 32, 32),), tmp_path / "m.onnx",
                             fold=True, n_random=1)
    assert report.passed and set(report.errors) == {"disabled", "all"}
    ops = onnx_ops(tmp_path / "m.onnx")
    assert ops.get("Conv") == 22 and "BatchNormalization" not in ops
