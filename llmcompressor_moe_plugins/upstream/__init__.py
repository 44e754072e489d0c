"""The one place that touches llmcompressor internals; an upstream release that
changes them breaks this file only.

Why each is needed:
- Hook state (``HooksMixin._HOOKS_DISABLED``): llmcompressor disables its hooks
  for the sequential pipeline's propagation pass and AWQ's searches. Forwards there
  observe nothing, so extra expert calls would be wasted; no public flag says so.
- Lifecycle listeners: in oneshot's default ``independent`` pipeline each modifier
  gets the events of its own pass only, so our modifier never sees the quantization
  modifier's ``SEQUENTIAL_EPOCH_END``. The per-layer coverage check must run there,
  after the layer's calibration forwards and before GPTQ/AWQ compress it. We wrap
  ``LifecycleCallbacks.calibration_start`` / ``sequential_epoch_end`` /
  ``calibration_end`` (class attributes looked up at call time, so import order
  does not matter) and call the listeners registered while a run is active.
- Failure cleanup: oneshot calls no modifier hook when a run fails (``finalize``
  only runs on success), which would leave calibration modules in the user's
  model. ``Oneshot.apply_recipe_modifiers`` is wrapped so that a failure calls the
  registered cleanups before it propagates.
- After saving: oneshot saves in ``post_process`` (after every modifier
  finalized), and no hook runs after it; the coverage report belongs beside the
  checkpoint, so ``post_process`` is wrapped to run the callbacks queued with
  :func:`after_save` once the checkpoint is written.
- Under torchrun (``distributed/``; no-ops in one process): GPTQ's Hessian
  reduction is positional, so ``GPTQModifier.compress_modules`` first gives every
  rank the same Hessians in the same order and afterwards waits for all ranks
  (``distributed.install_aligned_gptq``); and every layer's
  ``sequential_epoch_end`` ends with a barrier, because upstream skips the
  broadcast of CPU-executed modules' qparams and nothing else stops a rank from
  propagating through a layer another rank is still writing (GPTQ and
  ``QuantizationModifier`` alike; benchmarks/DISTRIBUTED_NOTES.md, F3/F4).
- Logging under torchrun: oneshot's ``pre_process`` replaces every loguru handler
  with its own (``configure_distributed_logger``); the CLI keeps its console
  set-up through :func:`keep_logging_configuration`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from llmcompressor.core import LifecycleCallbacks, active_session
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from torch.nn.modules import module as module_hooks

from .. import distributed

__all__ = [
    "hooks_enabled",
    "quiet_reference_call",
    "is_llmcompressor_hook",
    "global_hooks_attached",
    "kept_enabled_hook_ids",
    "LifecycleListener",
    "add_listener",
    "remove_listener",
    "current_modifier_names",
    "after_save",
    "keep_logging_configuration",
    "install",
]


# -- hook state ---------------------------------------------------------------


def hooks_enabled() -> bool:
    """True while llmcompressor's calibration hooks listen (calibrating forwards)."""
    return not HooksMixin._HOOKS_DISABLED


class quiet_reference_call:
    """Disable llmcompressor's hooks for a reference call, restoring the previous
    state on exit (``HooksMixin.disable_hooks()`` re-enables them even if they
    were already off)."""

    def __enter__(self):
        self._was = HooksMixin._HOOKS_DISABLED
        HooksMixin._HOOKS_DISABLED = True

    def __exit__(self, *exc):
        HooksMixin._HOOKS_DISABLED = self._was


@functools.cache
def _hooks_mixin_wrapper_code():
    # HooksMixin wraps every hook in a closure of one code object
    module, owner = torch.nn.Identity(), HooksMixin()
    owner.register_hook(module, lambda *args: None, "forward")
    code = next(iter(module._forward_hooks.values())).__code__
    owner.remove_hooks()
    return code


def is_llmcompressor_hook(hook: Callable) -> bool:
    return getattr(hook, "__code__", None) is _hooks_mixin_wrapper_code()


def kept_enabled_hook_ids() -> set[int]:
    return {handle.id for handle in HooksMixin._HOOKS_KEEP_ENABLED}


def global_hooks_attached() -> bool:
    """Module hooks registered for every module (they would see bypassed calls)."""
    return bool(
        module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
    )


# -- lifecycle listeners ------------------------------------------------------


class LifecycleListener(Protocol):
    def on_pass_start(self, modifier_names: list[str]) -> None: ...

    def on_layer_calibrated(self, modules: list[torch.nn.Module]) -> None: ...

    def on_pass_end(self) -> None: ...

    def on_run_failed(self) -> None: ...


_listeners: list[LifecycleListener] = []


def add_listener(listener: LifecycleListener) -> None:
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: LifecycleListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def current_modifier_names() -> list[str]:
    """Modifiers whose calibration pass is running (one per pass in oneshot's
    independent pipeline, all of them in a shared pipeline)."""
    recipe = getattr(active_session().lifecycle, "recipe", None)
    modifiers = getattr(recipe, "modifiers", None) or []
    return [type(modifier).__name__ for modifier in modifiers]


def _wrap_callback(
    name: str,
    before: Callable[..., None],
    after: Callable[[], None] | None = None,
) -> None:
    """Call ``before(listener, ...)`` for every listener, then the original, then
    ``after()`` (whether or not listeners are registered)."""
    original = getattr(LifecycleCallbacks, name).__func__

    @functools.wraps(original)
    def wrapped(cls, *args, **kwargs):
        for listener in list(_listeners):
            before(listener, *args, **kwargs)
        result = original(cls, *args, **kwargs)
        if after is not None:
            after()
        return result

    wrapped.__moe_plugins_wrapped__ = True
    setattr(LifecycleCallbacks, name, classmethod(wrapped))


def _wrap_apply_recipe_modifiers() -> None:
    from llmcompressor.entrypoints.oneshot import Oneshot

    original = Oneshot.apply_recipe_modifiers

    @functools.wraps(original)
    def wrapped(self, *args: Any, **kwargs: Any):
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            for listener in list(_listeners):
                try:
                    listener.on_run_failed()
                except Exception as err:  # the original error is what matters
                    logger.error(f"Cleanup after a failed run failed too: {err}")
            raise

    wrapped.__moe_plugins_wrapped__ = True
    Oneshot.apply_recipe_modifiers = wrapped


_after_save: list[Callable[[str], None]] = []


def after_save(callback: Callable[[str], None]) -> None:
    """Call ``callback(output_dir)`` once the running oneshot has saved its
    checkpoint (dropped if it saves nothing or fails)."""
    _after_save.append(callback)


def _wrap_post_process() -> None:
    # the package exports a function named like this module: import the module
    oneshot_module = importlib.import_module("llmcompressor.entrypoints.oneshot")
    original = oneshot_module.post_process

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any):
        from ..checkpoint.output_dir import staged_output_dir

        output_dir = kwargs.get("output_dir")
        try:
            if not output_dir or not _after_save:
                return original(*args, **kwargs)
            # written beside output_dir and moved in only once the callbacks
            # (coverage files, the checkpoint's check) passed: a failed check
            # leaves output_dir as it was
            with staged_output_dir(output_dir) as staging:
                result = original(*args, **{**kwargs, "output_dir": str(staging)})
                for callback in list(_after_save):
                    callback(str(staging))
            return result
        finally:
            _after_save.clear()

    wrapped.__moe_plugins_wrapped__ = True
    oneshot_module.post_process = wrapped


@contextlib.contextmanager
def keep_logging_configuration() -> Iterator[None]:
    """While active, a distributed oneshot leaves loguru's handlers as they are
    (upstream removes them all and logs every INFO line of every rank to stdout;
    ``llmcompressor/entrypoints/utils.py``, ``pre_process``)."""
    entrypoint_utils = importlib.import_module("llmcompressor.entrypoints.utils")
    original = entrypoint_utils.configure_distributed_logger
    entrypoint_utils.configure_distributed_logger = lambda *args, **kwargs: None
    try:
        yield
    finally:
        entrypoint_utils.configure_distributed_logger = original


def install() -> None:
    """Wrap the lifecycle entry points once (idempotent)."""
    distributed.install_aligned_gptq()
    start = LifecycleCallbacks.calibration_start.__func__
    if getattr(start, "__moe_plugins_wrapped__", False):
        return
    _wrap_callback(
        "calibration_start",
        lambda listener, **_: listener.on_pass_start(current_modifier_names()),
    )
    _wrap_callback(
        "sequential_epoch_end",
        lambda listener, modules, **_: listener.on_layer_calibrated(modules),
        # the layer's qparams are written (on CPU: straight into shared memory)
        # before any rank propagates through it; no-op in one process
        after=lambda: distributed.wait_for_all_ranks(),
    )
    _wrap_callback("calibration_end", lambda listener, **_: listener.on_pass_end())
    _wrap_apply_recipe_modifiers()
    _wrap_post_process()
