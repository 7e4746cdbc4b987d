"""expandfx: ExpandNets as a compiler pass over unmodified PyTorch models.

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> model = smallnet_7x7()
    >>> big = efx.expand(model, rule="CL", r=4)      # train this
    >>> small = efx.contract(big)                    # exactly the original architecture
    >>> model.load_state_dict(small.state_dict())
    <All keys matched successfully>
    >>> efx.CK(r=2) + efx.FC(r=4)                    # rule configs: what "CK+FC" means
    CK(r=2) + FC(r=4)

``__all__`` is the public surface: the verbs, one config per built-in rule (``efx.CL``,
``efx.RepVGG``, ...: each is the registered :class:`~expandfx.rules.Rule`, called to make a
:class:`~expandfx.rules.config.RuleConfig`), the errors users catch and the types they
hold. Every verb returns a copy unless ``inplace=True``; ``set_mode``, a mode setter like
``nn.Module.train()``, changes the model and returns it. Everything else is imported from
its module (``from expandfx.optim import ChainLR``); the names this package exported before
stay reachable as attributes for compatibility, outside ``__all__``.
"""

from .block import ExpandedBlock, frozen, set_mode
from .compander import Compander, Psi, bake, compand, companded, modified_adaptive
from .errors import (
    ConfigError,
    ContractionError,
    ExpandFXError,
    ExpandFXWarning,
    FoldError,
    NonFiniteError,
)
from .executorch_export import export_executorch
from .layer_types import register_layer, unregister_layer
from .nonlinear import linearize, nonlinear_counterpart
from .onnx_export import ExportReport, VerificationError, export_onnx, verify_onnx
from .optim import ChainLR, ParamGroups, chain_scale, param_groups
from .passes.contract import contract
from .passes.expand import expand
from .passes.fold import FoldReport, fold
from .planning import LayerPlan, Plan, plan
from .quantize import Int8Config, Int8Report
from .rules import RULES as _RULES
from .rules import Rule, register_rule, unregister_rule
from .rules.config import RuleConfig, RuleSet
from .sharding import shard

# One config per built-in rule, by its registered name: a rule file added to
# expandfx/rules/ (OREPA) appears here and in __all__ without an edit to this file.
_CONFIGS = sorted(name for name in _RULES if name.isidentifier())
globals().update({name: _RULES[name] for name in _CONFIGS})

__all__ = [
    # verbs: each returns a copy unless inplace=True (set_mode: a mode setter, in place)
    "compand", "contract", "expand", "export_onnx", "fold", "param_groups", "plan", "set_mode",
    "shard",
    # the errors users catch, and the types they hold
    "ConfigError", "ExpandFXError", "ExpandedBlock", "Plan", "RuleConfig",
    # the rule configs: efx.CL(r=4), efx.CK(r=2) + efx.FC(r=4), efx.RepVGG(norm="bn"), ...
    *_CONFIGS,
]
__version__ = "0.1.0"

_COMPAT = (ChainLR, Compander, ContractionError, ExpandFXWarning, ExportReport, FoldError,
           FoldReport, Int8Config, Int8Report, LayerPlan, NonFiniteError, ParamGroups, Psi, Rule,
           RuleSet, VerificationError, bake, chain_scale, companded, frozen, linearize,
           modified_adaptive, nonlinear_counterpart, register_layer, register_rule,
           unregister_layer, unregister_rule, verify_onnx, export_executorch)


def __getattr__(name: str) -> Rule:
    """``efx.<Rule>`` for a rule registered after import (``register_rule``)."""
    rule = _RULES.get(name)
    if rule is None:
        raise AttributeError(f"module 'expandfx' has no attribute {name!r}")
    return rule
