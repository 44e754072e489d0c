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
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from loguru import logger

# llmcompressor configures loguru when this module is imported: import it first.
# (``llmcompressor.logger`` the attribute is loguru's logger, not the module.)
_upstream = importlib.import_module("llmcompressor.logger")

__all__ = ["cli_logging", "ConsoleFilter", "set_process"]

OUR_PACKAGE = __name__.rpartition(".")[0]
_PYTHON_LOGGERS = ("transformers", "datasets", "huggingface_hub", "torch", "accelerate")
_INFO, _WARNING = 20, 30


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
        """False (and counted) for a warning text already shown this run."""
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
                f"{console.repeats} repeated warning(s) not shown again; "
                "-v shows every line"
            )
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        with contextlib.suppress(ValueError):  # gone if upstream reset loguru
            logger.remove(handler_id)
        _active = None
        _upstream.configure_logger(_upstream.LOGGER_CONFIG)
