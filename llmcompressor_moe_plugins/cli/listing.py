"""``llmcompressor-moe recipes`` and ``plugins``: what is shipped and discovered,
and which path each MoE block of a model takes."""

from __future__ import annotations

import argparse
import dataclasses

from .. import recipes
from .hub import resolve_model

__all__ = ["list_recipes_command", "list_plugins_command", "plan_command"]


def _table(
    header: tuple[str, ...], rows: list[tuple[str, ...]], widths: tuple[int, ...]
) -> list[str]:
    """Columns at least ``widths`` wide, wider where a cell is longer (module
    paths get long: a column never runs into the next); the last column is
    left unpadded."""
    widths = tuple(
        max(width, *(len(row[i]) for row in (header, *rows)))
        for i, width in enumerate(widths)
    )
    return [
        " ".join(
            cell if i == len(row) - 1 else f"{cell:<{widths[i]}}"
            for i, cell in enumerate(row)
        ).rstrip()
        for row in (header, *rows)
    ]


def list_recipes_command() -> int:
    """The shipped recipes by family (``model_type``), each family's default
    (used when ``--recipe`` is not given) first and marked."""
    rows = []
    for model_type, names in recipes.families().items():
        default = recipes.default_for(model_type)
        for name in sorted(names, key=lambda n: n != default):
            mark = " (default)" if name == default else ""
            rows.append((model_type, name + mark, recipes.describe(name)))
    header = ("family", "recipe", "what it is for")
    print("\n".join(_table(header, rows, (14, 32, 0))))
    return 0


def list_plugins_command() -> int:
    from ..calibration.registry import list_plugins

    rows = []
    for entry in list_plugins(load=True):
        status = "ok" if entry.loaded else f"ERROR: {entry.error}"
        rows.append((entry.name, entry.target, entry.distribution, status))
        for shadowed in entry.shadowed:
            rows.append(("", f"(shadowed: {shadowed})", "", ""))
    header = ("block class", "calibration module", "distribution", "status")
    print("\n".join(_table(header, rows, (20, 58, 26, 0))))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    """Which path each MoE block of a model takes, from its config alone."""
    from ..calibration.context import find_unregistered_moe_blocks, plan_calibration
    from .models import meta_model, model_config

    source = dataclasses.replace(
        resolve_model(args.model, args.revision),
        trust_remote_code=args.trust_remote_code,
    )
    model = meta_model(model_config(source), args.model, args.trust_remote_code)
    by_class: dict[tuple[str, str, str], list[str]] = {}
    for plan in plan_calibration(model):
        key = (plan.block_class, plan.path, plan.detail)
        by_class.setdefault(key, []).append(plan.name)
    rows = []
    for (block_class, path, detail), names in by_class.items():
        how = f"module {detail}" if path == "registered" else f"dispatcher ({detail})"
        rows.append((block_class, path, f"{len(names):>6}", f"{how}; {names[0]}"))
    for block_class in find_unregistered_moe_blocks(model):
        rows.append(
            (
                block_class,
                "none",
                "",
                "its experts take no routing call the dispatcher can stand in "
                "for: register a calibration module (README, 'Adding an "
                "architecture')",
            )
        )
    header = ("block class", "path", "blocks", "calibrated by / first block")
    print("\n".join(_table(header, rows, (32, 11, 6, 0))))
    if not by_class:
        print(f"No MoE block in {args.model}: the plugin would do nothing.")
    return 0
