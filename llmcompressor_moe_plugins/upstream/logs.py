"""oneshot's logging set-up under torchrun."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

__all__ = ["keep_logging_configuration"]


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
