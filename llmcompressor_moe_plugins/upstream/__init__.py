"""The one adapter between this package and upstream internals: every private name
of llmcompressor, compressed-tensors and torch that the package touches, and every
patch, lives in this subpackage (``tests/test_upstream.py`` checks the rest of the
package for private upstream names). An upstream release that changes them breaks
this subpackage only, and :mod:`.hookpoints` says which name changed.

- :mod:`.hookpoints`: the names we depend on, checked at import; our modifiers
  refuse to run, naming the symbol and the supported versions, if one changed.
- :mod:`.run`: lifecycle listeners, failure cleanup and after-save callbacks: the
  patches, installed only while a run of our modifiers is active.
- :mod:`.hooks`: llmcompressor's hook state; torch's per-module hook dicts.
- :mod:`.gptq`: GPTQModifier's private statistics; its aligned ``compress_modules``.
- :mod:`.moe`, :mod:`.quantization`: MoE modeling and scheme-resolution internals.
- :mod:`.compat`: CPU-only workarounds, a tensor's version counter;
  :mod:`.logs`: oneshot's torchrun logging.
"""

from .compat import tensor_version
from .hookpoints import UpstreamChangedError, require_supported
from .hooks import (
    global_hooks_attached,
    hooks_enabled,
    is_llmcompressor_hook,
    kept_enabled_hook_ids,
    module_hooks,
    quiet_reference_call,
)
from .logs import keep_logging_configuration
from .run import (
    LifecycleListener,
    add_listener,
    after_save,
    begin_run,
    current_modifier_names,
    end_run,
    end_run_outside_oneshot,
    remove_listener,
    run_active,
    save_into,
)

__all__ = [
    "UpstreamChangedError",
    "require_supported",
    "hooks_enabled",
    "quiet_reference_call",
    "is_llmcompressor_hook",
    "global_hooks_attached",
    "kept_enabled_hook_ids",
    "module_hooks",
    "LifecycleListener",
    "add_listener",
    "remove_listener",
    "current_modifier_names",
    "after_save",
    "save_into",
    "begin_run",
    "end_run",
    "end_run_outside_oneshot",
    "run_active",
    "keep_logging_configuration",
    "tensor_version",
]
