"""What the CLI prints while it works: quiet by default, everything with ``-v``.

Default: our stage lines (INFO and up from this package), other packages'
warnings and errors, each distinct warning text once per run (upstream repeats
some, e.g. llmcompressor's "No accelerator available" several times per run),
Python ``warnings`` each once, and the progress bars. llmcompressor's per-Linear
``METRIC`` lines and other packages' INFO/DEBUG lines are left out; a closing
line says how many repeats were hidden.

Verbose: every loguru record at DEBUG, every Python warning, transformers,
datasets and huggingface_hub logging at INFO.

Under torchrun (:func:`set_process`): every line names its process, and processes
other than rank 0 show warnings and errors only (rank 0's stage lines stand for
all of them).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from loguru import logger


def _import_llmcompressor_quietly():
    """``llmcompressor.logger`` (the module; the package's attribute of that name
    is loguru's logger). Importing llmcompressor configures loguru and logs a
    device warning ("No accelerator available!") before any CLI code could filter
    it; its own switch keeps that import silent, then its set-up is put back as
    it would have been (``_mark_import_time_warnings`` counts that warning as
    shown, so a run does not print it either)."""
    if "llmcompressor" in sys.modules:
        return importlib.import_module("llmcompressor.logger")
    switch = "LLM_COMPRESSOR_LOG_DISABLED"
    before = os.environ.get(switch)
    os.environ[switch] = "true"
    try:
        upstream = importlib.import_module("llmcompressor.logger")
    finally:
        if before is None:
            del os.environ[switch]
        else:
            os.environ[switch] = before
    # configure_logger wrote the switch into the default config and returned
    # before defining its METRIC level: undo that, and set up as it would have
    upstream.LOGGER_CONFIG.disabled = before is not None and before.lower() == "true"
    upstream.configure_logger(upstream.LOGGER_CONFIG)
    return upstream


_upstream = _import_llmcompressor_quietly()

__all__ = ["cli_logging", "ConsoleFilter", "set_process"]

OUR_PACKAGE = __name__.rpartition(".")[0]
_PYTHON_LOGGERS = ("transformers", "datasets", "huggingface_hub", "torch", "accelerate")
_INFO, _WARNING = 20, 30


# Upstream warnings that do not apply to a CLI run, hidden unless -v (counted in
# the closing line): the plugin linearizes and calibrates MoE experts itself;
# GLM keeps its MTP layers as model.layers.N, which the plugin copies (upstream
# looks for an ``mtp.`` prefix and warns on every GLM model, with MTP or not);
# the rest are notices about upstream's own internals.
NOT_APPLICABLE = (
    "Could not find MTP weights with prefix",
    "Detected an MoE model which has not been linearized",
    "MoE is being linearized after loading",
    "Disabling tokenizer parallelism",
    "Attempting to save a model with offloaded modules",
    "is_fx_tracing will return true",
)


def _is_ours(name: str | None) -> bool:
    return bool(name) and (name == OUR_PACKAGE or name.startswith(OUR_PACKAGE + "."))


class ConsoleFilter:
    """Decides which records reach the console, and counts the repeats it hid."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.seen: set[tuple[str, str]] = set()
        self.repeats = 0
        self.rank: int | None = None  # under torchrun: this process's rank

    def first_time(self, kind: str, text: str) -> bool:
        """False (and counted) for a warning text already shown this run, or
        one that does not apply (:data:`NOT_APPLICABLE`)."""
        if any(part in text for part in NOT_APPLICABLE):
            self.repeats += 1
            return False
        key = (kind, text)
        if key in self.seen:
            self.repeats += 1
            return False
        self.seen.add(key)
        return True

    def __call__(self, record: dict[str, Any]) -> bool:
        if self.verbose:
            return True
        level = record["level"]
        if level.name == "METRIC":  # llmcompressor: two lines per quantized Linear
            return False
        floor = _INFO if _is_ours(record["name"]) and not self.rank else _WARNING
        if level.no < floor:
            return False
        if level.no >= _WARNING:
            return self.first_time(level.name, record["message"])
        return True


def _format(console: ConsoleFilter):
    verbose = console.verbose

    def format_record(record: dict[str, Any]) -> str:
        prefix = "" if console.rank is None else f"[rank {console.rank}] "
        if verbose:
            line = "{time:YYYY-MM-DDTHH:mm:ss.SSS} | {name}:{function} | {level} - "
        elif record["level"].no < _WARNING:
            line = "{time:HH:mm:ss} "
        else:
            source = (record["name"] or "?").partition(".")[0]
            line = "{time:HH:mm:ss} {level} (" + source.replace("{", "") + ") "
        line = prefix + line + "{message}\n"
        if record["exception"] is not None:
            line += "{exception}\n"
        return line

    return format_record


class _PythonLoggingFilter(logging.Filter):
    def __init__(self, console: ConsoleFilter):
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        if self.console.verbose or record.levelno < logging.WARNING:
            return True
        return self.console.first_time(record.levelname, record.getMessage())


def _mark_import_time_warnings(console: ConsoleFilter) -> None:
    """llmcompressor logs a device warning while it is imported, before any CLI
    code runs (on a machine without accelerator: "No accelerator available!",
    through a module-level ``get_high_precision()``). Make the same call silently
    and count its warnings as shown, so a run does not print them again."""
    from llmcompressor.utils.dev import get_main_device

    handler_id = logger.add(
        lambda message: console.first_time(
            message.record["level"].name, message.record["message"]
        ),
        level="WARNING",
    )
    try:
        get_main_device()
    finally:
        logger.remove(handler_id)


_active: ConsoleFilter | None = None


def _transformers_bars(enabled: bool) -> bool:
    """Turn transformers' progress bars on or off; returns whether they were on."""
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.is_progress_bar_enabled()
    if enabled:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    return before


def set_process(rank: int, world_size: int) -> None:
    """The running CLI is process ``rank`` of ``world_size`` (torchrun)."""
    if _active is not None and world_size > 1:
        _active.rank = rank


@contextlib.contextmanager
def cli_logging(verbose: bool = False) -> Iterator[ConsoleFilter]:
    """Console output for one CLI run; upstream's loguru set-up is put back on
    exit (the CLI may run inside another program, e.g. a test)."""
    global _active
    console = _active = ConsoleFilter(verbose)
    logger.remove()
    _mark_import_time_warnings(console)
    logger.enable("llmcompressor")
    logger.enable(OUR_PACKAGE)
    handler_id = logger.add(
        lambda message: sys.stderr.write(message),  # the stderr of the moment
        level=0,
        format=_format(console),
        filter=console,
        colorize=False,
    )
    log_filter = _PythonLoggingFilter(console)
    handlers = {logging.lastResort} if logging.lastResort else set()
    levels = {}
    for name in ("", *_PYTHON_LOGGERS):
        python_logger = logging.getLogger(name)
        handlers.update(python_logger.handlers)
        if verbose and name in ("transformers", "datasets", "huggingface_hub"):
            levels[name] = python_logger.level
            python_logger.setLevel(logging.INFO)
    for handler in handlers:
        handler.addFilter(log_filter)

    # transformers' own bars (writing shards, loading weights) time work that
    # takes seconds; llmcompressor's (calibrating, propagating) stay
    bars = _transformers_bars(enabled=verbose)

    original_showwarning = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):
        if verbose or console.first_time(category.__name__, str(message)):
            original_showwarning(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            if verbose:
                warnings.simplefilter("always")
            warnings.showwarning = show_once
            yield console
        if console.repeats:
            logger.info(
                f"{console.repeats} repeated or not applicable warning(s) not "
                "shown; -v shows every line"
            )
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
        _transformers_bars(enabled=bars)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        with contextlib.suppress(ValueError):  # gone if upstream reset loguru
            logger.remove(handler_id)
        _active = None
        _upstream.configure_logger(_upstream.LOGGER_CONFIG)
