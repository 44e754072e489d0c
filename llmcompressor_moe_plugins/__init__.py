"""Mixture-of-Experts calibration for llmcompressor.

Importing the package registers ``MoECalibrationModifier`` and
``SharedHessianGPTQModifier`` with llmcompressor's ``ModifierFactory`` (so YAML
recipes can name them) and the textbook MoE model with
transformers' Auto classes. Calibration modules themselves are found through entry
points and imported only when a model needs them.
"""

from .calibration.base import MoECalibrationModule
from .calibration.context import (
    BlockPlan,
    SwappedBlocks,
    moe_calibration_context,
    plan_calibration,
    swap_in_calibration_modules,
)
from .calibration.modes import CalibrationMode, parse_mode
from .calibration.registry import get_calibration_module, list_plugins, register
from .calibration.routing import Routing
from .checkpoint.mtp import copy_mtp_tensors
from .models import MoeLayer, TextbookMoeConfig, TextbookMoeForCausalLM
from .modifier import MoECalibrationModifier, last_coverage_report
from .reporting.coverage import CoverageReport, UndercalibratedExpertsError
from .statistics.shared_hessian_gptq import SharedHessianGPTQModifier
from .upstream.compat import cpu_only_calibration

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
    "copy_mtp_tensors",
    "cpu_only_calibration",
    "CalibrationMoeLayer",
    "CalibrationGlm4MoeMoE",
]


def __getattr__(name: str):
    # the calibration modules are plugins like any other: import them only on use
    if name == "CalibrationMoeLayer":
        from .calibration.architectures.moe_layer import CalibrationMoeLayer

        return CalibrationMoeLayer
    if name == "CalibrationGlm4MoeMoE":
        from .calibration.architectures.glm4_moe import CalibrationGlm4MoeMoE

        return CalibrationGlm4MoeMoE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
