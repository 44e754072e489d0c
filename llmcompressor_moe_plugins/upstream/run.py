"""Patches to llmcompressor, installed only while a run of ours is active.

A run begins when one of our modifiers initializes (:func:`begin_run`: the hook
points are checked first) and ends after oneshot's ``post_process`` (the checkpoint
is saved), when the run fails, or, outside oneshot, when our modifier finalizes.
An upstream-only oneshot in the same process therefore runs upstream's functions
unchanged. While a run is active:

- Lifecycle listeners: in oneshot's default ``independent`` pipeline each modifier
  gets the events of its own pass only, so our modifier never sees the quantization
  modifier's ``SEQUENTIAL_EPOCH_END``. The per-layer coverage check must run there,
  after the layer's calibration forwards and before GPTQ/AWQ compress it, so
  ``LifecycleCallbacks.calibration_start`` / ``sequential_epoch_end`` /
  ``calibration_end`` call the registered listeners first. Under torchrun every
  layer's ``sequential_epoch_end`` ends with a barrier: upstream skips the broadcast
  of CPU-executed modules' qparams and nothing else stops a rank from propagating
  through a layer another rank is still writing (benchmarks/DISTRIBUTED_NOTES.md,
  F3/F4); and ``GPTQModifier.compress_modules`` aligns Hessians (``upstream.gptq``).
- Failure cleanup: oneshot calls no modifier hook when a run fails (``finalize``
  only runs on success), which would leave calibration modules in the user's model.
  The run registers an exit callback on the ``ExitStack`` of the running
  ``Oneshot.apply_recipe_modifiers`` (initialization and calibration) and wraps the
  session's ``finalize``; a failure calls the listeners' ``on_run_failed``.
- After saving: oneshot saves in ``post_process`` (after every modifier
  finalized), and no hook runs after it; the coverage report belongs beside the
  checkpoint, so ``post_process`` runs the callbacks queued with :func:`after_save`
  once the checkpoint is written (:func:`_after_checkpoint_saved`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
from loguru import logger

from .. import distributed
from .gptq import aligned_compress_modules
from .hookpoints import UpstreamChangedError, require_supported

__all__ = [
    "LifecycleListener",
    "add_listener",
    "remove_listener",
    "current_modifier_names",
    "after_save",
    "begin_run",
    "end_run",
    "end_run_outside_oneshot",
    "run_active",
]

_ONESHOT_MODULE = "llmcompressor.entrypoints.oneshot"
_MISSING = object()


class LifecycleListener(Protocol):
    def on_pass_start(self, modifier_names: list[str]) -> None: ...

    def on_layer_calibrated(self, modules: list[torch.nn.Module]) -> None: ...

    def on_pass_end(self) -> None: ...

    def on_run_failed(self) -> None: ...


_listeners: list[LifecycleListener] = []
_after_save: list[Callable[[str], None]] = []


def add_listener(listener: LifecycleListener) -> None:
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: LifecycleListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def current_modifier_names() -> list[str]:
    """Modifiers whose calibration pass is running (one per pass in oneshot's
    independent pipeline, all of them in a shared pipeline)."""
    from llmcompressor.core import active_session

    recipe = getattr(active_session().lifecycle, "recipe", None)
    modifiers = getattr(recipe, "modifiers", None) or []
    return [type(modifier).__name__ for modifier in modifiers]


_save_into: Callable[[str], Any] | None = None


def save_into(context: Callable[[str], Any]) -> None:
    """Have the running oneshot save into ``context(output_dir)`` (a context
    manager yielding the directory to write) and run the :func:`after_save`
    callbacks there."""
    global _save_into
    _save_into = context


def after_save(callback: Callable[[str], None]) -> None:
    """Call ``callback(output_dir)`` once the running oneshot has saved its
    checkpoint (dropped if it saves nothing or fails)."""
    _after_save.append(callback)


class _Run:
    """The patches of one active run, undone in reverse order."""

    def __init__(self) -> None:
        self.undo: list[tuple[Any, str, Any]] = []
        self.in_oneshot = False

    def patch(self, owner: Any, name: str, value: Any) -> None:
        self.undo.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, value in reversed(self.undo):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self.undo.clear()


_run: _Run | None = None


def run_active() -> bool:
    return _run is not None


def begin_run() -> None:
    """Install the patches for a run of our modifiers (idempotent within a run).

    :raises UpstreamChangedError: a hook point changed (``hookpoints``), or the
        previous run's checkpoint was never followed by ``post_process``
    """
    global _run
    require_supported()
    if _run is not None:
        if _run.in_oneshot and _after_save and not _oneshot_frame():
            pending = len(_after_save)
            end_run()
            raise UpstreamChangedError(
                "the previous oneshot ended without calling "
                f"{_ONESHOT_MODULE}.post_process, so its {pending} after-save "
                "step(s) (coverage.json) never ran; this llmcompressor saves "
                "differently from the supported 0.14"
            )
        return
    run = _Run()
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.modifiers.gptq import GPTQModifier

    _patch_callback(
        run,
        LifecycleCallbacks,
        "calibration_start",
        lambda listener, **_: listener.on_pass_start(current_modifier_names()),
    )
    _patch_callback(
        run,
        LifecycleCallbacks,
        "sequential_epoch_end",
        lambda listener, modules, **_: listener.on_layer_calibrated(modules),
        # the layer's qparams are written (on CPU: straight into shared memory)
        # before any rank propagates through it; no-op in one process
        after=distributed.wait_for_all_ranks,
    )
    _patch_callback(
        run,
        LifecycleCallbacks,
        "calibration_end",
        lambda listener, **_: listener.on_pass_end(),
    )
    run.patch(
        GPTQModifier,
        "compress_modules",
        aligned_compress_modules(GPTQModifier.compress_modules),
    )
    frame = _oneshot_frame()
    if frame is not None:
        run.in_oneshot = True
        frame.f_locals["stack"].push(_exit_apply_recipe_modifiers)
        _patch_finalize(run)
        _patch_post_process(run)
    _run = run


def end_run() -> None:
    """Undo the run's patches (nothing if no run is active)."""
    global _run
    run, _run = _run, None
    _after_save.clear()
    save_into(None)
    if run is not None:
        run.restore()


def end_run_outside_oneshot() -> None:
    """For our modifiers' ``on_finalize``: outside oneshot nothing else ends the
    run (inside it, ``post_process`` does, after saving)."""
    if _run is not None and not _run.in_oneshot:
        end_run()


def _patch_callback(
    run: _Run,
    callbacks: type,
    name: str,
    before: Callable[..., None],
    after: Callable[[], None] | None = None,
) -> None:
    """Call ``before(listener, ...)`` for every listener, then the original, then
    ``after()``."""
    original = getattr(callbacks, name).__func__

    @functools.wraps(original)
    def wrapped(cls, *args, **kwargs):
        for listener in list(_listeners):
            before(listener, *args, **kwargs)
        result = original(cls, *args, **kwargs)
        if after is not None:
            after()
        return result

    run.patch(callbacks, name, classmethod(wrapped))


def _oneshot_frame():
    """The frame of the running ``Oneshot.apply_recipe_modifiers``, if any."""
    oneshot = importlib.import_module(_ONESHOT_MODULE)
    code = oneshot.Oneshot.apply_recipe_modifiers.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and isinstance(
            frame.f_locals.get("stack"), contextlib.ExitStack
        ):
            return frame
        frame = frame.f_back
    return None


def _run_failed() -> None:
    for listener in list(_listeners):
        try:
            listener.on_run_failed()
        except Exception as err:  # the original error is what matters
            logger.error(f"Cleanup after a failed run failed too: {err}")
    end_run()


def _exit_apply_recipe_modifiers(exc_type, exc, traceback) -> bool:
    if exc_type is not None:
        _run_failed()
    return False  # never swallow the error


def _patch_finalize(run: _Run) -> None:
    from llmcompressor.core import active_session

    session = active_session()
    original = session.finalize

    @functools.wraps(original)
    def finalize(*args: Any, **kwargs: Any):
        try:
            return original(*args, **kwargs)
        except BaseException:
            _run_failed()
            raise

    run.patch(session, "finalize", finalize)


def _patch_post_process(run: _Run) -> None:
    # the package exports a function named like this module: import the module
    oneshot_module = importlib.import_module(_ONESHOT_MODULE)
    original = oneshot_module.post_process
    signature = inspect.signature(original)

    @functools.wraps(original)
    def post_process(*args: Any, **kwargs: Any):
        try:
            bound = signature.bind(*args, **kwargs)
            output_dir = bound.arguments.get("output_dir")
            if not output_dir or not _after_save or _save_into is None:
                return original(*args, **kwargs)
            # written where the registered context says (a staging directory
            # moved in only once the callbacks, the checkpoint's check among
            # them, passed)
            with _save_into(output_dir) as staging:
                bound.arguments["output_dir"] = str(staging)
                result = original(*bound.args, **bound.kwargs)
                _after_checkpoint_saved(str(staging))
            return result
        finally:
            end_run()

    run.patch(oneshot_module, "post_process", post_process)


def _after_checkpoint_saved(output_dir: str) -> None:
    """Everything that belongs beside a checkpoint oneshot has just written."""
    for callback in list(_after_save):
        callback(output_dir)
