"""llmcompressor's hook state and torch's per-module hook dicts.

llmcompressor disables its hooks for the sequential pipeline's propagation pass and
AWQ's searches (``HooksMixin._HOOKS_DISABLED``): forwards there observe nothing, so
extra expert calls would be wasted; no public flag says so. Whether an expert
Linear may be computed from its weights instead of called depends on who listens
on it: torch keeps that in ``Module._forward_hooks`` / ``_forward_pre_hooks`` and
the global hook dicts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = [
    "hooks_enabled",
    "quiet_reference_call",
    "is_llmcompressor_hook",
    "global_hooks_attached",
    "kept_enabled_hook_ids",
    "module_hooks",
]


@functools.cache
def _hooks_mixin() -> type:
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    return HooksMixin


def hooks_enabled() -> bool:
    """True while llmcompressor's calibration hooks listen (calibrating forwards)."""
    return not _hooks_mixin()._HOOKS_DISABLED


class quiet_reference_call:
    """Disable llmcompressor's hooks for a reference call, restoring the previous
    state on exit (``HooksMixin.disable_hooks()`` re-enables them even if they
    were already off)."""

    def __enter__(self):
        mixin = _hooks_mixin()
        self._was = mixin._HOOKS_DISABLED
        mixin._HOOKS_DISABLED = True

    def __exit__(self, *exc):
        _hooks_mixin()._HOOKS_DISABLED = self._was


def module_hooks(
    module: torch.nn.Module,
) -> tuple[dict[int, Callable], dict[int, Callable]]:
    """``module``'s own (forward pre-hooks, forward hooks), by handle id."""
    return module._forward_pre_hooks, module._forward_hooks


@functools.cache
def _hooks_mixin_wrapper_code():
    # HooksMixin wraps every hook in a closure of one code object
    module, owner = torch.nn.Identity(), _hooks_mixin()()
    owner.register_hook(module, lambda *args: None, "forward")
    code = next(iter(module_hooks(module)[1].values())).__code__
    owner.remove_hooks()
    return code


def is_llmcompressor_hook(hook: Callable) -> bool:
    return getattr(hook, "__code__", None) is _hooks_mixin_wrapper_code()


def kept_enabled_hook_ids() -> set[int]:
    return {handle.id for handle in _hooks_mixin()._HOOKS_KEEP_ENABLED}


def global_hooks_attached() -> bool:
    """Module hooks registered for every module (they would see bypassed calls)."""
    from torch.nn.modules import module as torch_module

    return bool(
        torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    )
