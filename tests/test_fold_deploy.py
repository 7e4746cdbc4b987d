"""fold as a deployment compiler: never larger than its input, sees inside every module, and
works where FX cannot trace — on models the rest of the suite does not use (timm FastViT,
EfficientViT-MSRA, LeViT, torchvision MnasNet, Hugging Face ResNet/MobileViT/RegNet), plus
the invariant over the model zoo and the bad inputs fold answers with a ConfigError."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conformance import FAMILIES, ZOO, ZOO_INPUT, build_zoo_model
from support import rel_err
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import expandfx as efx
from expandfx.errors import ConfigError
from expandfx.tolerances import rel_error

TOL = 1e-5  # docs/design.md §4, float32
BN = nn.modules.batchnorm._BatchNorm
pytestmark = pytest.mark.usefixtures("one_thread")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, x: torch.Tensor | tuple) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*(x if isinstance(x, tuple) else (x,)))
    return counter.get_total_flops() // 2


def norms(model: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in model.modules())


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics from one training forward
    (a BatchNorm at init is the identity map: folding it would prove nothing)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
        model.train()(torch.randn(x.shape, generator=gen))
    return model.eval()


def checked_fold(model: nn.Module, x: torch.Tensor | tuple) -> nn.Module:
    """Fold; assert exact, no more parameters or MACs than the input, model untouched."""
    inputs = x if isinstance(x, tuple) else (x,)
    before = copy.deepcopy(model.state_dict())
    out = efx.fold(model, inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert rel_error(model(*inputs), out(*inputs)) <= TOL  # any output pytree
    assert out.meta["expandfx.fold"].error <= TOL
    assert params(out) <= params(model) and macs(out, inputs) <= macs(model, inputs)
    return out


def timm_model(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    return calibrated(timm.create_model(name, pretrained=False, num_classes=10), x), x


# 1. never larger ---------------------------------------------------------------------------

def test_fastvit_is_never_larger_and_beats_timm():
    """Before: a depthwise conv merged with the pointwise conv after it made fastvit_t8 grow
    from 3.26 M to 70.2 M parameters. Now it is smaller than timm's reparameterize_model
    (the RepMixer's ``x + γ·(mixer(x) − norm(x))`` folds into one depthwise conv too)."""
    from timm.utils.model import reparameterize_model

    model, x = timm_model("fastvit_t8", 64)
    out = checked_fold(model, x)
    timm_way = reparameterize_model(copy.deepcopy(model))
    assert params(out) <= params(timm_way) and macs(out, x) <= macs(timm_way, x)
    assert norms(out) <= norms(timm_way) and norms(out) == 0
    kept = "\n".join(k["reason"] for k in out.meta["expandfx.fold"].kept)
    assert "merging would cost" in kept and "allow_larger=True" in kept


def mnasnet() -> tuple[nn.Module, torch.Tensor]:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    return calibrated(tv.models.mnasnet0_5(num_classes=10), x), x


def test_torchvision_mnasnet_is_never_larger():
    model, x = mnasnet()
    out = checked_fold(model, x)
    assert norms(out) == 0 and params(out) < params(model)


def test_export_onnx_fold_torchvision_mnasnet(tmp_path):
    import onnx

    model, x = mnasnet()
    report = efx.export_onnx(model, (x,), tmp_path / "m.onnx", fold=True)
    assert report.passed
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == sum(isinstance(m, nn.Conv2d) for m in model.modules())


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x)))


def test_a_conv_called_twice_is_not_duplicated():
    """Before: each call folded with its BatchNorm into its own conv, 164 → 296 parameters."""
    x = torch.randn(2, 4, 8, 8)
    model = calibrated(SharedConv(), x)
    out = checked_fold(model, x)
    assert params(out) <= params(model) == 164
    assert sum(isinstance(m, nn.Conv2d) for m in out.modules()) == 1


# 2. inside every module -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["efficientvit_m0", "levit_128s"])
def test_norms_inside_modules_and_behind_reshapes_fold(name):
    """Before: efficientvit_m0 kept 54 BatchNorms (inside LocalWindowAttention, which FX
    keeps whole) and levit_128s 46 (Linear → flatten(0, 1) → BatchNorm1d, timm's LinearNorm);
    timm's reparameterize_model removes them all, and so does fold now."""
    from timm.utils.model import reparameterize_model

    model, x = timm_model(name, 224)
    out = checked_fold(model, x)
    timm_way = reparameterize_model(copy.deepcopy(model))
    assert norms(out) == norms(timm_way) == 0
    assert params(out) <= params(timm_way) and macs(out, x) <= macs(timm_way, x)


def test_linear_norm_behind_a_reshape():
    class LinearNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)

        def forward(self, x):
            x = self.linear(x)
            return self.bn(x.flatten(0, 1)).reshape_as(x)

    x = torch.randn(3, 5, 6)
    model = calibrated(LinearNorm(), torch.randn(3, 5, 6))
    out = checked_fold(model, x)
    assert norms(out) == 0 and out.linear.bias is not None


def test_a_reshape_that_moves_the_feature_dim_does_not_fold():
    """BatchNorm1d on [N, C, L] normalises dim 1; a Linear's features are the last dim."""
    class Moved(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(5)

        def forward(self, x):  # [3, 5, 6] → [3, 5, 4]: dim 1 has size 5, not the features
            return self.bn(self.linear(x))

    x = torch.randn(3, 5, 6)
    out = checked_fold(calibrated(Moved(), x), x)
    assert norms(out) == 1


# 3. models FX cannot trace -----------------------------------------------------------------

def hf(name: str):
    transformers = pytest.importorskip("transformers")
    configs = {
        "ResNet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=3),
        "MobileViT": dict(image_size=32, patch_size=2, hidden_sizes=[16, 16, 16],
                          neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64], num_attention_heads=2,
                          num_labels=3),
        "RegNet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4,
                       num_labels=3),
    }
    config = getattr(transformers, f"{name}Config")(**configs[name])
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForImageClassification")(config)


@pytest.mark.parametrize("name", ["ResNet", "MobileViT", "RegNet"])
def test_hugging_face_vision_models_fold(name):
    """Before: "symbolically traced variables cannot be used as inputs to control flow"."""
    x = torch.randn(2, 3, 32, 32)
    model = calibrated(hf(name), x)
    out = efx.fold(model, (x,))
    assert type(out) is type(model) and norms(model) > 0 and norms(out) == 0
    report = out.meta["expandfx.fold"]
    assert report.graph == "recorded forward" and report.error <= TOL
    with torch.no_grad():
        assert rel_err(model(x).logits, out(x).logits) <= TOL
    assert params(out) < params(model) and macs(out, x) <= macs(model, x)
    loaded = type(model)(model.config)  # the user's class: its checkpoints load into it
    missing = loaded.load_state_dict(out.state_dict(), strict=False).missing_keys
    assert missing and all("normalization" in k or "norm" in k for k in missing)


def test_export_onnx_fold_hugging_face_resnet(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    report = efx.export_onnx(calibrated(hf("ResNet"), x), (x,), tmp_path / "m.onnx",
                             fold=True)
    assert report.passed
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


# the invariant over the model zoo ----------------------------------------------------------

@pytest.mark.parametrize("name", list(ZOO))
def test_fold_never_increases_parameters_or_macs(name):
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT)
    checked_fold(calibrated(build_zoo_model(name), x), x)


@pytest.mark.parametrize("name", [n for n in FAMILIES if not n.startswith(
    ("tv/fasterrcnn", "tv/retinanet", "tv/ssdlite", "tv/raft"))])
def test_fold_never_increases_parameters_or_macs_on_the_wider_zoo(name):
    """Hugging Face text/audio/vision models and video. Detection and RAFT are left out:
    their whole-model outputs (post-NMS boxes, iterative flow) are compared by probes
    elsewhere; their backbones are rows of benchmarks/fold_conformance.py."""
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    family = FAMILIES[name]
    torch.manual_seed(0)
    checked_fold(family.build().eval(), family.inputs())


# bad input ---------------------------------------------------------------------------------

def test_fold_without_example_inputs_says_what_it_needs():
    with pytest.raises(ConfigError, match="fold: pass example_inputs, a tensor or a tuple"):
        efx.fold(nn.Conv2d(3, 4, 3).eval())


def test_fold_with_inputs_the_model_rejects_is_a_config_error():
    with pytest.raises(ConfigError, match=r"fold: Conv2d fails on example_inputs "
                                          r"\(RuntimeError: .*fold needs inputs forward"):
        efx.fold(nn.Conv2d(3, 4, 3).eval(), (torch.randn(2, 5, 8, 8),))


# what the FX view folds beyond modules ------------------------------------------------------

class Functional(nn.Module):
    """A conv → F.batch_norm on buffers, then a layer scale, a negation and a division."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.w, self.b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.w, self.b, False, 0.1, 1e-3)
        return torch.relu(-(y * self.gamma) / 3.0)


def test_functional_batch_norm_and_scales_fold_into_the_conv():
    x = torch.randn(2, 3, 8, 8)
    gm = checked_fold(Functional().eval(), x)
    assert [type(m) for m in gm.modules()][1:] == [nn.Conv2d]  # one conv, no parameters else
    assert params(gm) == 4 * 3 * 9 + 4
    assert gm.meta["expandfx.fold"].folded[0]["formula"].count("→") == 4


class Mixer(nn.Module):
    """fastvit's RepMixer: x + γ·(mixer(x) − norm(x)), each a depthwise conv → BN / a BN."""

    def __init__(self, c=6):
        super().__init__()
        self.mixer = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                                   nn.BatchNorm2d(c))
        self.norm = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))


def test_a_subtraction_under_a_layer_scale_folds_into_one_depthwise_conv():
    x = torch.randn(2, 6, 8, 8)
    gm = checked_fold(calibrated(Mixer(), x), x)
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 6 and params(gm) == 6 * 9 + 6 and "sub" not in gm.code


class TiedWeight(nn.Module):
    """The conv's weight is read again, functionally, outside the conv: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.sum() > 0:  # untraceable: the recorded view decides
            y = y + F.conv2d(x, self.conv.weight)
        return y


def test_a_weight_read_outside_its_layer_keeps_the_norm():
    x = torch.randn(2, 4, 5, 5).abs()
    out = checked_fold(calibrated(TiedWeight(), x), x)
    assert norms(out) == 1
    assert "read by conv2d (on its weight)" in str(out.meta["expandfx.fold"])


# transposed convolutions --------------------------------------------------------------------

def decoder(dims: int = 2) -> nn.Module:
    convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return nn.Sequential(convt(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                               dilation=1, bias=False), norm(6), nn.ReLU(),
                         convt(6, 6, 4, stride=2, padding=1), norm(6))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_then_batchnorm_folds(dims):
    """Even onnxsim leaves ConvTranspose → BatchNorm unfused (onnxsim#317)."""
    x = torch.randn(2, 4, *(5,) * dims)
    model = calibrated(decoder(dims), x)
    gm = checked_fold(model, x)
    convs = [m for m in gm.modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    assert len(convs) == 2 and norms(gm) == 0
    assert convs[0].output_padding == (1,) * dims and convs[0].groups == 2


def test_conv_transpose_then_batchnorm_folds_in_float64_and_in_untraceable_models():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model = calibrated(decoder(), x.float()).double()
    gm = efx.fold(model, (x,))
    with torch.no_grad():
        assert rel_err(model(x), gm(x)) <= 1e-12

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = decoder()

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else x

    x = torch.randn(2, 4, 5, 5).abs()
    out = checked_fold(calibrated(Untraceable(), x), x)
    assert out.meta["expandfx.fold"].graph == "recorded forward" and norms(out) == 0
