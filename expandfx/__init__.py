"""expandfx: ExpandNets as a compiler pass over unmodified PyTorch models.

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> model = smallnet_7x7()
    >>> big = efx.expand(model, rule="CL", r=4)      # train this
    >>> small = efx.contract(big)                    # exactly the original architecture
    >>> model.load_state_dict(small.state_dict())
    <All keys matched successfully>
"""

from .block import ExpandedBlock, frozen, set_mode
from .compander import (
    Compander,
    Psi,
    bake,
    compand,
    companded,
    modified_adaptive,
)
from .errors import ConfigError, ContractionError, ExpandFXError, FoldError
from .nonlinear import linearize, nonlinear_counterpart
from .onnx_export import ExportReport, VerificationError, export_onnx, verify_onnx
from .optim import ChainLR, ParamGroups, chain_scale, decay_groups, param_groups
from .passes.contract import contract
from .passes.expand import expand
from .passes.fold import FoldReport, fold
from .planning import LayerPlan, Plan, plan
from .quantize import Int8Config, Int8Report
from .registry import register_layer, unregister_layer
from .rules import Rule, register_rule, unregister_rule
from .sharding import shard

__all__ = [
    "ChainLR", "Compander", "ConfigError", "ContractionError", "ExpandFXError", "ExpandedBlock",
    "ExportReport", "FoldError", "FoldReport", "Int8Config", "Int8Report", "LayerPlan",
    "ParamGroups", "Plan", "Psi", "Rule",
    "VerificationError", "bake", "chain_scale", "compand", "companded", "contract",
    "decay_groups", "expand", "export_onnx", "fold", "frozen", "linearize", "modified_adaptive",
    "nonlinear_counterpart", "param_groups", "plan", "register_layer", "register_rule",
    "set_mode", "shard", "unregister_layer", "unregister_rule", "verify_onnx",
]
__version__ = "0.1.0"
