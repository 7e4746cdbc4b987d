"""Conformance check of one model: expand, randomize, contract, compare — layer by layer.

Used by the model-zoo tests and ``benchmarks/conformance.py``. Besides the end-to-end
output, every expanded block is compared with its contracted layer on the very input it
received in the forward pass, so a model whose output happens to be insensitive to a
layer (a tiny classifier init, a layer scale of 1e-6) cannot hide a wrong fold.

Example::

    >>> import torch
    >>> from expandfx.models import TinyResNet
    >>> rec = roundtrip_record(TinyResNet(), "CL", 2, torch.randn(2, 3, 32, 32))
    >>> rec["expanded"], rec["keys_equal"], rec["layer_error"] < 1e-5
    (9, True, True)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from expandfx import ExpandedBlock, contract, expand, plan
from expandfx.rules import find
from expandfx.surgery import blocks
from expandfx.tolerances import rel_error

__all__ = ["FAMILIES", "Family", "ZOO", "ZOO_INPUT", "applicable_rules", "build_zoo_model",
           "detection_probe", "raft_after_training_step", "raft_probe", "roundtrip_record"]


def randomize_factors(model: nn.Module, seed: int = 0) -> None:
    """Fresh weights of a trained-like scale (``1/√fan-in``; 0.1 for vectors) in every
    expanded block of ``model``, from a seeded generator (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, ExpandedBlock)):
            for p in block.parameters():
                scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * scale)



def _uses_r(rule: Any) -> bool:
    """Whether a rule string (``"CK+FC"``) names a rule that takes an expansion rate."""
    return not isinstance(rule, str) or any(find(n).uses_r for n in rule.split("+"))


Probe = Callable[[nn.Module, tuple], Any]


def roundtrip_record(model: nn.Module, rule: Any, r: float, x: torch.Tensor | tuple,
                     seed: int = 0, probe: Probe | None = None) -> dict[str, Any]:
    """Expand ``model`` (eval mode), randomize the factors, contract; errors and timings.

    ``x`` is the input tensor or the tuple of positional inputs. ``probe(model, inputs)``
    replaces the forward where the full one cannot be compared (detection models: post-NMS
    outputs reorder on ties), e.g. backbone and head outputs; without a probe the inputs are
    also the ``example_inputs`` of plan and expand (call sites recorded if FX fails).
    """
    model = model.eval()
    r = r if _uses_r(rule) else None  # branch rules keep the width: r would be refused
    inputs = x if isinstance(x, tuple) else (x,)
    example = None if probe is not None else inputs
    run = probe or (lambda m, args: m(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        the_plan = plan(model, rule, r, example_inputs=example)
        t0 = time.perf_counter()
        big = expand(model, rule, r, example_inputs=example).eval()
        expand_s = time.perf_counter() - t0
    randomize_factors(big, seed)
    seen: dict[int, torch.Tensor] = {}
    def record(module: nn.Module, args: tuple) -> None:  # returns None: the input stays
        seen.setdefault(id(module), args[0])

    hooks = [b.register_forward_pre_hook(record) for b, _ in blocks(big).values()]
    with torch.no_grad():
        y_big = run(big, inputs)
    for h in hooks:
        h.remove()
    t0 = time.perf_counter()
    small = contract(big)
    contract_s = time.perf_counter() - t0
    layer_error, checked = 0.0, 0
    with torch.no_grad():
        y_small = run(small, inputs)
        for block, paths in blocks(big).values():
            if id(block) in seen:
                x_in = seen[id(block)]
                ref = block(x_in)
                got = small.get_submodule(paths[0])(x_in)
                layer_error = max(layer_error, rel_error(ref, got))
                checked += 1
    skipped = {row.path: row.reason for row in the_plan.skipped}
    return {
        "expanded": len(the_plan.expanded),
        "skipped": skipped,
        "params_train": sum(p.numel() for p in big.parameters()),
        "params_test": sum(p.numel() for p in small.parameters()),
        "expand_s": expand_s,
        "contract_s": contract_s,
        "output_error": rel_error(y_big, y_small),
        "layer_error": layer_error,
        "layers_checked": checked,
        "keys_equal": list(small.state_dict()) == list(model.state_dict()),
        "class_equal": type(small) is type(model),
        "blocks_left": sum(isinstance(m, ExpandedBlock) for m in small.modules()),
        "expanded_model": big,
    }


# The model zoo of the conformance suite: name -> (factory "module:callable", kwargs).
# All with random init (pretrained=False); torchvision and timm are test-only dependencies.
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("torchvision.models:resnet18", {}),
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", {}),
    "mobilenet_v3_small": ("torchvision.models:mobilenet_v3_small", {}),
    "shufflenet_v2_x0_5": ("torchvision.models:shufflenet_v2_x0_5", {}),
    "efficientnet_b0": ("torchvision.models:efficientnet_b0", {}),
    "regnet_x_400mf": ("torchvision.models:regnet_x_400mf", {}),
    "squeezenet1_1": ("torchvision.models:squeezenet1_1", {}),
    "convnext_tiny": ("torchvision.models:convnext_tiny", {}),
    "densenet121": ("torchvision.models:densenet121", {}),
    "googlenet": ("torchvision.models:googlenet", {"aux_logits": False, "init_weights": True}),
    "timm/mobilenetv3_small_100": ("timm:create_model", {"model_name": "mobilenetv3_small_100"}),
    "timm/efficientnet_b0": ("timm:create_model", {"model_name": "efficientnet_b0"}),
    "timm/repvgg_a0": ("timm:create_model", {"model_name": "repvgg_a0"}),
    "timm/mobileone_s0": ("timm:create_model", {"model_name": "mobileone_s0"}),
    "timm/resnet18": ("timm:create_model", {"model_name": "resnet18"}),
    "timm/vit_tiny": ("timm:create_model", {"model_name": "vit_tiny_patch16_224",
                                            "img_size": 64}),
}
ZOO_INPUT = (2, 3, 64, 64)


def build_zoo_model(name: str) -> nn.Module:
    """Instantiate a zoo model (imports torchvision / timm on demand)."""
    import importlib

    target, kwargs = ZOO[name]
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)(**kwargs)


def applicable_rules(model: nn.Module) -> list[str]:
    """The single rules (CL, CK, FC) that expand at least one layer of ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [rule for rule in ("CL", "CK", "FC") if plan(model, rule, 2).expanded]


@dataclass(frozen=True)
class Family:
    """A model of the wider zoo: a builder, its inputs, what to compare, which rules."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    rules: tuple[str, ...] = ("CL", "CK", "FC")
    probe: Probe | None = None


def _hf(model: str, config: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A transformers model from a small config (random weights, nothing downloaded)."""
    def build() -> nn.Module:
        import importlib

        module_name, _, cls = model.rpartition(".")
        config_obj = getattr(importlib.import_module("transformers"), config)(**kwargs)
        return getattr(importlib.import_module(module_name or "transformers"), cls)(config_obj)
    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    return build


def detection_probe(model: nn.Module, inputs: tuple) -> list[Any]:
    """Backbone features and head outputs of a torchvision detector (no NMS, no sorting);
    for two-stage detectors also the box head and predictor on pooled features."""
    features = list(model.backbone(inputs[0]).values())
    head = model.rpn.head if hasattr(model, "rpn") else model.head
    out = [features, head(features)]
    if hasattr(model, "roi_heads"):
        pooled = torch.nn.functional.adaptive_avg_pool2d(features[0], 7)
        out.append(model.roi_heads.box_predictor(model.roi_heads.box_head(pooled)))
    return out


def raft_after_training_step() -> nn.Module:
    """torchvision's RAFT (small) after one training forward: its correlation block keeps
    that pass's pyramid, tensors of the autograd graph, which ``copy.deepcopy`` refuses."""
    import torchvision

    model = torchvision.models.optical_flow.raft_small(weights=None)
    gen = torch.Generator().manual_seed(1)
    model.train()(*(torch.randn(1, 3, 128, 128, generator=gen) for _ in range(2)),
                  num_flow_updates=2)
    return model


def raft_probe(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """RAFT's final flow estimate after two refinement steps (the default 12 cost 6x)."""
    return model(*inputs, num_flow_updates=2)[-1]


def _ids(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(0)),)


def _randn(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64}
_DETECTION = {"weights_backbone": None, "num_classes": 5}
# Hugging Face transformers (tiny configs), torchvision detection and video.
FAMILIES: dict[str, Family] = {
    "hf/bert": Family(_hf("BertForSequenceClassification", "BertConfig", vocab_size=64,
                          max_position_embeddings=32, num_labels=3, **_TINY), _ids(2, 8),
                      ("FC",)),
    "hf/gpt2": Family(_hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=32, n_head=2,
                          vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0),
                      _ids(2, 8), ("FC",)),
    "hf/vit": Family(_hf("ViTForImageClassification", "ViTConfig", image_size=32,
                         patch_size=8, num_labels=5, **_TINY), _randn(2, 3, 32, 32),
                     ("CL", "FC")),
    "hf/whisper_encoder": Family(
        _hf("transformers.models.whisper.modeling_whisper.WhisperEncoder", "WhisperConfig",
            d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
            num_mel_bins=16, max_source_positions=16, vocab_size=64),
        _randn(2, 16, 32), ("CL", "FC")),
    "hf/wav2vec2": Family(_hf("Wav2Vec2Model", "Wav2Vec2Config", conv_dim=(16, 16),
                              conv_stride=(5, 2), conv_kernel=(10, 3), vocab_size=32,
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                              **_TINY), _randn(2, 400), ("CL", "FC")),
    "tv/fasterrcnn_mobilenet_v3_large_fpn": Family(
        _tv("fasterrcnn_mobilenet_v3_large_fpn", **_DETECTION), _randn(2, 3, 64, 64),
        ("CL", "CK"), detection_probe),
    "tv/retinanet_resnet50_fpn": Family(_tv("retinanet_resnet50_fpn", **_DETECTION),
                                        _randn(2, 3, 64, 64), ("CL", "CK"), detection_probe),
    "tv/ssdlite320_mobilenet_v3_large": Family(
        _tv("ssdlite320_mobilenet_v3_large", **_DETECTION), _randn(2, 3, 64, 64),
        ("CL", "CK"), detection_probe),
    "tv/mc3_18 (video, Conv3d)": Family(_tv("mc3_18", num_classes=5),
                                        _randn(1, 3, 4, 32, 32)),
    "tv/raft_small (after a training forward)": Family(
        raft_after_training_step, lambda: (torch.randn(1, 3, 128, 128),
                                           torch.randn(1, 3, 128, 128)), ("CL",), raft_probe),
}
