"""Mixture-of-Experts calibration for llmcompressor.

Importing the package registers ``MoECalibrationModifier`` and
``SharedHessianGPTQModifier`` with llmcompressor's ``ModifierFactory`` (so YAML
recipes can name them) and the textbook MoE model with
transformers' Auto classes. Calibration modules themselves are found through entry
points and imported only when a model needs them.
"""

from .base import MoECalibrationModule
from .context import (
    BlockPlan,
    SwappedBlocks,
    moe_calibration_context,
    plan_calibration,
    swap_in_calibration_modules,
)
from .coverage import CoverageReport, UndercalibratedExpertsError
from .dispatch import Routing
from .models import MoeLayer, TextbookMoeConfig, TextbookMoeForCausalLM
from .modes import CalibrationMode, parse_mode
from .modifier import MoECalibrationModifier, last_coverage_report
from .registry import get_calibration_module, list_plugins, register
from .shared_hessian_gptq import SharedHessianGPTQModifier

__version__ = "0.1.0"

__all__ = [
    "MoECalibrationModule",
    "Routing",
    "plan_calibration",
    "BlockPlan",
    "MoECalibrationModifier",
    "SharedHessianGPTQModifier",
    "moe_calibration_context",
    "swap_in_calibration_modules",
    "SwappedBlocks",
    "CoverageReport",
    "UndercalibratedExpertsError",
    "last_coverage_report",
    "CalibrationMode",
    "parse_mode",
    "register",
    "get_calibration_module",
    "list_plugins",
    "MoeLayer",
    "TextbookMoeConfig",
    "TextbookMoeForCausalLM",
    "CalibrationMoeLayer",
    "CalibrationGlm4MoeMoE",
]


def __getattr__(name: str):
    # the calibration modules are plugins like any other: import them only on use
    if name == "CalibrationMoeLayer":
        from .modules.moe_layer import CalibrationMoeLayer

        return CalibrationMoeLayer
    if name == "CalibrationGlm4MoeMoE":
        from .modules.glm4_moe import CalibrationGlm4MoeMoE

        return CalibrationGlm4MoeMoE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
