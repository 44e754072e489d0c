"""Mixture-of-Experts calibration for llmcompressor.

Importing the package is cheap (no torch, transformers or llmcompressor: the CLI
answers a usage error at once); each public name is imported on first use. It
still makes ``MoECalibrationModifier`` and ``SharedHessianGPTQModifier`` known to
llmcompressor's ``ModifierFactory`` (so YAML recipes can name them) and the
textbook MoE model to transformers' Auto classes, through post-import hooks
(``_lazy``). Calibration modules themselves are found through entry points and
imported only when a model needs them.
"""

import importlib

from ._lazy import install_hooks

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


# public name -> the module that defines it, imported on first use (see _lazy)
_WHERE = {
    "MoECalibrationModule": ".calibration.base",
    "BlockPlan": ".calibration.context",
    "SwappedBlocks": ".calibration.context",
    "moe_calibration_context": ".calibration.context",
    "plan_calibration": ".calibration.context",
    "swap_in_calibration_modules": ".calibration.context",
    "Routing": ".calibration.routing",
    "CalibrationMode": ".calibration.modes",
    "parse_mode": ".calibration.modes",
    "get_calibration_module": ".calibration.registry",
    "list_plugins": ".calibration.registry",
    "register": ".calibration.registry",
    "copy_mtp_tensors": ".checkpoint.mtp",
    "MoeLayer": ".models",
    "TextbookMoeConfig": ".models",
    "TextbookMoeForCausalLM": ".models",
    "MoECalibrationModifier": ".modifier",
    "last_coverage_report": ".modifier",
    "CoverageReport": ".reporting.coverage",
    "UndercalibratedExpertsError": ".reporting.coverage",
    "SharedHessianGPTQModifier": ".statistics.shared_hessian_gptq",
    "cpu_only_calibration": ".upstream.compat",
    # the calibration modules are plugins like any other: imported only on use
    "CalibrationMoeLayer": ".calibration.architectures.moe_layer",
    "CalibrationGlm4MoeMoE": ".calibration.architectures.glm4_moe",
}


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        # a subpackage used as an attribute (``llmcompressor_moe_plugins.recipes``),
        # as the eager package of earlier versions allowed
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


install_hooks()
