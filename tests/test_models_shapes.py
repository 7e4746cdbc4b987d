"""Shape, size and construction checks for the reference models in expandfx.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expandfx.models import EXAMPLE_SHAPES, MODELS, get_model

EXPECTED_NAMES = {
    "smallnet_3x3",
    "smallnet_7x7",
    "smallnet_7x7_ablation",
    "smallnet_digits",
    "mobilenet_v1",
    "tiny_resnet",
    "tiny_unet",
    "cnn1d",
}

EXPECTED_OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "smallnet_3x3": (2, 10),
    "smallnet_7x7": (2, 10),
    "smallnet_7x7_ablation": (2, 10),
    "smallnet_digits": (2, 10),
    "mobilenet_v1": (2, 10),
    "tiny_resnet": (2, 10),
    "tiny_unet": (2, 2, 32, 32),
    "cnn1d": (2, 10),
}

# smallnet_7x7: widths 8, 16, 32, kernel 7, padding 3, 32x32 input, hidden 64.
#   conv1 3->8:    3*8*49  + 8  =  1,184    bn1: 2*8  =  16
#   conv2 8->16:   8*16*49 + 16 =  6,288    bn2: 2*16 =  32
#   conv3 16->32: 16*32*49 + 32 = 25,120    bn3: 2*32 =  64
#   spatial 32 -> 16 -> 8 -> 4 (same padding, pool 2), so 32*4*4 = 512 features
#   fc1 512->64:  512*64 + 64   = 32,832
#   fc2 64->10:    64*10 + 10   =    650
#   total = 1,184 + 6,288 + 25,120 + 16 + 32 + 64 + 32,832 + 650 = 66,186
SMALLNET_7X7_PARAMS = 66_186

# smallnet_7x7_ablation (paper Table 6, 150.35K): widths 8, 16, 32, 64, kernel 7, pad 3.
#   convs: 1,184 + 6,288 + 25,120 + (32*64*49 + 64 = 100,416) = 133,008
#   bns:   16 + 32 + 64 + 128 = 240
#   spatial 32 -> 16 -> 8 -> 4 -> 2, so 64*2*2 = 256 features
#   fc1 256->64: 16,448; fc2 64->10: 650
#   total = 133,008 + 240 + 16,448 + 650 = 150,346
SMALLNET_7X7_ABLATION_PARAMS = 150_346

def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert set(MODELS) == EXPECTED_NAMES
    assert set(EXAMPLE_SHAPES) == EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(EXAMPLE_SHAPES[name]))
    assert out.shape == EXPECTED_OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_train_mode_backward(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name).train()
    model(torch.randn(EXAMPLE_SHAPES[name])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_deterministic_construction(name: str) -> None:
    torch.manual_seed(123)
    first = get_model(name).state_dict()
    torch.manual_seed(123)
    second = get_model(name).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_conv_and_linear_are_exact_types(name: str) -> None:
    model = get_model(name)
    found = 0
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            assert type(module) in (nn.Conv1d, nn.Conv2d, nn.Linear), type(module)
            found += 1
    assert found > 0


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_models_are_small(name: str) -> None:
    assert num_params(get_model(name)) < 300_000


def test_smallnet_7x7_ablation_param_count() -> None:
    assert num_params(get_model("smallnet_7x7_ablation")) == SMALLNET_7X7_ABLATION_PARAMS


def test_smallnet_7x7_param_count() -> None:
    assert num_params(get_model("smallnet_7x7")) == SMALLNET_7X7_PARAMS


def test_smallnet_layer_names() -> None:
    model = get_model("smallnet_3x3")
    modules = dict(model.named_modules())
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Sequential)
    assert type(modules["classifier.0"]) is nn.Linear
    assert type(modules["classifier.2"]) is nn.Linear
    assert modules["features.0"].padding == (0, 0)
    # Unpadded 3x3: 32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2, so 32*2*2 features.
    assert modules["classifier.0"].in_features == 128
    assert get_model("smallnet_7x7").features[0].padding == (3, 3)


def test_get_model_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError) as excinfo:
        get_model("no_such_model")
    message = str(excinfo.value)
    for name in EXPECTED_NAMES:
        assert name in message
