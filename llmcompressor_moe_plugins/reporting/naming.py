"""Small text helpers shared by the report's table and its heatmap."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["natural_key", "span"]


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def span(values: Iterable[int]) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}..{high}"
