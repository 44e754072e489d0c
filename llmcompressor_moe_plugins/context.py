"""Swap MoE blocks for their calibration modules, and put them back.

The recipe modifier and the CLI both go through here; neither re-implements it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe
from loguru import logger

from .base import AUTO_CHUNK, MoECalibrationModule
from .coverage import CoverageReport, build_coverage_report
from .modes import CalibrationMode, parse_mode
from .registry import get_calibration_module, registered_names

__all__ = [
    "SwappedBlock",
    "SwappedBlocks",
    "swap_in_calibration_modules",
    "moe_calibration_context",
    "find_unregistered_moe_blocks",
]


@dataclass
class SwappedBlock:
    name: str
    original: torch.nn.Module
    replacement: MoECalibrationModule


class SwappedBlocks:
    """The blocks one swap replaced; restores them and reports their coverage."""

    def __init__(self, model: torch.nn.Module, blocks: list[SwappedBlock]):
        self.model = model
        self.blocks = blocks
        self.restored = False

    def __len__(self) -> int:
        return len(self.blocks)

    def coverage(self) -> CoverageReport:
        return build_coverage_report(
            [(block.name, block.replacement) for block in self.blocks]
        )

    def restore(self) -> None:
        """Put back every non-permanent block (safe to call twice)."""
        if self.restored:
            return
        for block in reversed(self.blocks):
            restored = block.replacement.restore(block.original)
            if restored is not block.replacement:
                self.model.set_submodule(block.name, restored)
        self.restored = True
        logger.debug(f"Restored {len(self.blocks)} MoE block(s) after calibration")


def _resolve_mode(
    class_name: str,
    default_mode: CalibrationMode,
    block_modes: Mapping[str, Any] | None,
) -> CalibrationMode:
    if block_modes and class_name in block_modes:
        return parse_mode(block_modes[class_name])
    return default_mode


def find_unregistered_moe_blocks(model: torch.nn.Module) -> list[str]:
    """Class names of modules that look like MoE blocks (a router and experts)
    but have no calibration module; for warnings that name what was found."""
    known = set(registered_names())
    found = {
        type(module).__name__
        for module in model.modules()
        if hasattr(module, "experts")
        and (hasattr(module, "gate") or hasattr(module, "router"))
    }
    return sorted(found - known)


def swap_in_calibration_modules(
    model: torch.nn.Module,
    calibrate_all_experts: bool = True,
    *,
    mode: CalibrationMode | str | dict | None = None,
    block_modes: Mapping[str, Any] | None = None,
    chunk_size: int | str = AUTO_CHUNK,
) -> SwappedBlocks:
    """Replace every block whose class has a registered calibration module.

    :param calibrate_all_experts: shorthand for ``mode="all"`` / ``"routed"``
    :param mode: calibration mode for every block (overrides the shorthand)
    :param block_modes: per block class name, a mode overriding ``mode``
    :param chunk_size: tokens per extra expert call; ``"auto"`` sizes calls so the
        block's activation peak stays within 1.25x of routed mode
    """
    default_mode = parse_mode(
        mode if mode is not None else ("all" if calibrate_all_experts else "routed")
    )
    # validate every per-class mode up front: a typo must fail before any swap
    for spec in (block_modes or {}).values():
        parse_mode(spec)

    # Fused 3-D experts have no Linear per expert to hook; use llmcompressor's own
    # linearization (oneshot has already done this when it calls us).
    if get_non_linearized_moes(model):
        linearize_moe(model)

    config = getattr(model, "config", None)
    swapped = SwappedBlocks(model, [])
    try:
        for name, module in list(model.named_modules()):
            if isinstance(module, MoECalibrationModule):
                continue
            class_name = type(module).__name__
            module_class = get_calibration_module(class_name)
            if module_class is None:
                continue
            replacement = module_class(
                module,
                getattr(module, "config", config),
                calibrate_all_experts=default_mode.name == "all",
                mode=_resolve_mode(class_name, default_mode, block_modes),
                chunk_size=chunk_size,
            )
            model.set_submodule(name, replacement)
            swapped.blocks.append(SwappedBlock(name, module, replacement))
    except BaseException:
        # nothing is lost: undo the swaps made so far before surfacing the error
        swapped.restore()
        raise

    if swapped.blocks:
        modes = sorted({b.replacement.calibration_mode.spec() for b in swapped.blocks})
        logger.info(
            f"Replaced {len(swapped.blocks)} MoE block(s) with calibration modules "
            f"(mode: {', '.join(modes)})"
        )
    else:
        unknown = find_unregistered_moe_blocks(model)
        logger.warning(
            "No MoE block with a registered calibration module was found"
            + (
                f"; MoE-like blocks without one: {', '.join(unknown)}. Register a "
                "module for them (see README, 'Adding an architecture')."
                if unknown
                else f" (registered: {', '.join(registered_names()) or 'none'})."
            )
        )
    return swapped


@contextlib.contextmanager
def moe_calibration_context(
    model: torch.nn.Module,
    calibrate_all_experts: bool = True,
    *,
    mode: CalibrationMode | str | dict | None = None,
    block_modes: Mapping[str, Any] | None = None,
    chunk_size: int | str = AUTO_CHUNK,
) -> Iterator[SwappedBlocks]:
    """Calibration modules in place for the body; originals back on any exit."""
    swapped = swap_in_calibration_modules(
        model,
        calibrate_all_experts,
        mode=mode,
        block_modes=block_modes,
        chunk_size=chunk_size,
    )
    try:
        yield swapped
    finally:
        swapped.restore()
