"""compressed-tensors / llmcompressor quantization internals."""

from __future__ import annotations

from typing import Any

__all__ = ["reset_resolved_config"]


def reset_resolved_config(modifier: Any) -> None:
    """Make a quantization modifier resolve its scheme and ``ignore`` again on
    the next ``resolved_config`` (it caches the first resolution)."""
    modifier._resolved_config = None
