"""Every upstream name this package depends on beyond the public API, checked once
at import. A changed one does not break ``import llmcompressor_moe_plugins``; our
modifiers then refuse to run (:func:`require_supported`), with one message naming
the upstream symbol and the versions this package supports."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = [
    "SUPPORTED",
    "HOOK_POINTS",
    "UpstreamChangedError",
    "resolve",
    "check_hook_points",
    "recheck",
    "require_supported",
]

SUPPORTED = "llmcompressor 0.14, compressed-tensors 0.19, torch 2.10-2.14"


class UpstreamChangedError(RuntimeError):
    """An upstream name this package hooks into is gone or has changed."""


def resolve(path: str) -> Any:
    """``"package.module:Name.attr"`` -> the object (raises if absent)."""
    module_name, _, attributes = path.partition(":")
    value: Any = importlib.import_module(module_name)
    for attribute in filter(None, attributes.split(".")):
        value = getattr(value, attribute)
    return value


def _has(path: str) -> Callable[[], bool]:
    return lambda: resolve(path) is not None


def _private_attributes(path: str, *names: str) -> Callable[[], bool]:
    # pydantic models declare their private state in __private_attributes__
    return lambda: set(names) <= set(resolve(path).__private_attributes__)


def _parameter(path: str, name: str) -> Callable[[], bool]:
    return lambda: name in inspect.signature(resolve(path)).parameters


def _local(path: str, name: str) -> Callable[[], bool]:
    return lambda: name in resolve(path).__code__.co_varnames


def _calls(path: str, name: str) -> Callable[[], bool]:
    # the function looks ``name`` up at call time (so a wrapper we set is used)
    return lambda: name in resolve(path).__code__.co_names


def _module_hook_dicts() -> bool:
    import torch

    module = torch.nn.Identity()
    return isinstance(module._forward_hooks, dict) and isinstance(
        module._forward_pre_hooks, dict
    )


@dataclass(frozen=True)
class HookPoint:
    symbol: str
    why: str
    check: Callable[[], bool]


_ONESHOT = "llmcompressor.entrypoints.oneshot"
_GPTQ = "llmcompressor.modifiers.gptq:GPTQModifier"
HOOK_POINTS = [
    HookPoint(
        "llmcompressor.modifiers.utils.hooks:HooksMixin._HOOKS_DISABLED",
        "whether calibration hooks listen",
        lambda: isinstance(
            resolve("llmcompressor.modifiers.utils.hooks:HooksMixin._HOOKS_DISABLED"),
            bool,
        ),
    ),
    HookPoint(
        "llmcompressor.modifiers.utils.hooks:HooksMixin._HOOKS_KEEP_ENABLED",
        "hooks kept on while the others are off",
        _has("llmcompressor.modifiers.utils.hooks:HooksMixin._HOOKS_KEEP_ENABLED"),
    ),
    *(
        HookPoint(
            f"llmcompressor.core:LifecycleCallbacks.{name}",
            "the per-layer coverage check",
            _has(f"llmcompressor.core:LifecycleCallbacks.{name}"),
        )
        for name in ("calibration_start", "sequential_epoch_end", "calibration_end")
    ),
    HookPoint(
        f"{_ONESHOT}:Oneshot.apply_recipe_modifiers (its ExitStack `stack`)",
        "restoring the model when a run fails",
        _local(f"{_ONESHOT}:Oneshot.apply_recipe_modifiers", "stack"),
    ),
    HookPoint(
        f"{_ONESHOT}:post_process(output_dir=...), called by Oneshot.__call__",
        "writing coverage.json beside the checkpoint",
        lambda: (
            _parameter(f"{_ONESHOT}:post_process", "output_dir")()
            and _calls(f"{_ONESHOT}:Oneshot.__call__", "post_process")()
        ),
    ),
    HookPoint(
        f"{_GPTQ}._hessians/_num_samples/_module_names",
        "GPTQ statistics (shared and weighted Hessians, distributed alignment)",
        _private_attributes(
            _GPTQ,
            "_hessians",
            "_num_samples",
            "_module_names",
            "_rtn_fallback_module_names",
            "_num_compressed_modules",
        ),
    ),
    HookPoint(
        f"{_GPTQ}.compress_modules",
        "aligned Hessians under torchrun",
        _has(f"{_GPTQ}.compress_modules"),
    ),
    HookPoint(
        "llmcompressor.modifiers.gptq.base:_GPTQ_Q_PARAMS",
        "broadcasting shared-Hessian results under torchrun",
        _has("llmcompressor.modifiers.gptq.base:_GPTQ_Q_PARAMS"),
    ),
    HookPoint(
        "llmcompressor.modifiers.quantization:QuantizationMixin._resolved_config",
        "re-resolving a scheme after fitting it to layer widths",
        _private_attributes(
            "llmcompressor.modifiers.quantization:QuantizationMixin",
            "_resolved_config",
        ),
    ),
    HookPoint(
        "llmcompressor.modeling.moe.context:get_calibrate_all_experts_flag",
        "the default mode under oneshot(moe_calibrate_all_experts=...)",
        _has("llmcompressor.modeling.moe.context:get_calibrate_all_experts_flag"),
    ),
    HookPoint(
        "llmcompressor.pipelines.cache:IntermediatesCache._pin_intermediate",
        "AWQ on a machine without an accelerator",
        _has("llmcompressor.pipelines.cache:IntermediatesCache._pin_intermediate"),
    ),
    HookPoint(
        "torch.nn.Module._forward_hooks/_forward_pre_hooks",
        "whether anything but GPTQ observes an expert Linear",
        _module_hook_dicts,
    ),
    HookPoint(
        "torch.nn.modules.module:_global_forward_hooks",
        "whether anything but GPTQ observes an expert Linear",
        _has("torch.nn.modules.module:_global_forward_hooks"),
    ),
]


def check_hook_points() -> list[HookPoint]:
    """The hook points that are missing or changed (empty when all is well)."""
    broken = []
    for point in HOOK_POINTS:
        try:
            ok = point.check()
        except Exception:
            ok = False
        if not ok:
            broken.append(point)
    return broken


_broken: list[HookPoint] = check_hook_points()


def recheck() -> list[HookPoint]:
    """Check again (after an upstream module was patched, e.g. in a test)."""
    global _broken
    _broken = check_hook_points()
    return _broken


def _installed() -> str:
    found = []
    for name in ("llmcompressor", "compressed-tensors", "torch"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def require_supported() -> None:
    """Raise :class:`UpstreamChangedError` if a hook point changed."""
    if _broken:
        point = _broken[0]
        others = f" (and {len(_broken) - 1} more)" if len(_broken) > 1 else ""
        raise UpstreamChangedError(
            f"llmcompressor-moe-plugins cannot run: upstream `{point.symbol}` "
            f"({point.why}) is missing or changed{others}. Supported: {SUPPORTED}; "
            f"installed: {_installed()}. Install a supported llmcompressor."
        )
