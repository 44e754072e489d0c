"""Find the MoE blocks, swap in their calibration modules, put them back.

The recipe modifier and the CLI both go through here; neither re-implements it.
A block takes one of two paths (:func:`plan_calibration`):

- ``registered``: its class name has a calibration module (entry points or
  ``register``); the whole block is replaced by it;
- ``generic``: its experts are ones llmcompressor linearizes; only the experts
  container is replaced (``architectures/generic.py``), the block's forward is
  untouched.

Registered modules win over the generic path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from llmcompressor.modeling.moe.helpers import FusedExpertsProtocol
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe
from loguru import logger

from ..distributed import local_share, world
from ..reporting.coverage import BlockCoverage, CalibrationPass, CoverageReport
from .architectures.generic import CalibrationExperts, find_router, is_generic_experts
from .base import AUTO_CHUNK, MoECalibrationModule
from .modes import (
    AllExpertsMode,
    CalibrationMode,
    MinTokensMode,
    RoutedMode,
    parse_mode,
)
from .registry import get_calibration_module, registered_names

__all__ = [
    "BlockPlan",
    "SwappedBlock",
    "SwappedBlocks",
    "plan_calibration",
    "swap_in_calibration_modules",
    "moe_calibration_context",
    "find_unregistered_moe_blocks",
]


@dataclass(frozen=True)
class BlockPlan:
    """How one MoE block will be calibrated.

    :param name: the block's module path, e.g. ``model.layers.1.mlp``
    :param block_class: the block's class name (what ``block_modes`` takes)
    :param path: ``registered`` (a calibration module replaces the block) or
        ``generic`` (the dispatcher replaces its experts container)
    :param detail: the calibration module, or the experts' class
    """

    name: str
    block_class: str
    path: Literal["registered", "generic"]
    detail: str

    @property
    def target(self) -> str:
        """The module path that is replaced."""
        return self.name if self.path == "registered" else f"{self.name}.experts"


def _is_experts(module: torch.nn.Module) -> bool:
    """Experts the generic path takes: linearized, or fused ones llmcompressor
    will linearize (its own test, so both agree on what is an experts module)."""
    if isinstance(module, LinearExperts2D):
        return is_generic_experts(module)
    registered = LinearExperts2D.get_registration(type(module))
    if registered is not None:  # llmcompressor's own replacement for this class
        return registered.forward is LinearExperts2D.forward
    # transformers' fused experts: linearized to the generic kind
    return isinstance(module, FusedExpertsProtocol)


def _looks_like_moe(module: torch.nn.Module) -> bool:
    return hasattr(module, "experts") and (
        hasattr(module, "gate") or hasattr(module, "router")
    )


def plan_calibration(model: torch.nn.Module) -> list[BlockPlan]:
    """The MoE blocks of ``model`` and the path each takes, in model order.
    Imports nothing (plugins load on swap); works on a meta-device model."""
    registered = set(registered_names())
    plans: list[BlockPlan] = []
    covered: list[str] = []  # registered blocks: nothing inside them is planned
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        class_name = type(module).__name__
        if isinstance(module, MoECalibrationModule):
            continue
        if class_name in registered:
            plans.append(BlockPlan(name, class_name, "registered", class_name))
            covered.append(name)
            continue
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and _is_experts(experts):
            plans.append(BlockPlan(name, class_name, "generic", type(experts).__name__))
    return plans


def find_unregistered_moe_blocks(model: torch.nn.Module) -> list[str]:
    """Class names of modules that look like MoE blocks (a router and experts)
    but take neither path; for warnings that name what was found."""
    planned = {plan.name for plan in plan_calibration(model)}
    return sorted(
        {
            type(module).__name__
            for name, module in model.named_modules()
            if name not in planned
            and not isinstance(module, MoECalibrationModule)
            and _looks_like_moe(module)
        }
    )


@dataclass
class SwappedBlock:
    plan: BlockPlan
    original: torch.nn.Module
    replacement: MoECalibrationModule

    @property
    def name(self) -> str:
        return self.plan.name

    def coverage(self) -> BlockCoverage:
        dispatcher = self.replacement.dispatcher
        routed, calibrated = dispatcher.counts()
        return BlockCoverage(
            name=self.plan.name,
            block_class=self.plan.block_class,
            calibration_module=(
                type(self.replacement).__name__
                if self.plan.path == "registered"
                else "generic"
            ),
            mode=dispatcher.mode.spec(),
            routed=routed,
            calibrated=calibrated,
            floor=dispatcher.floor,
        )


class SwappedBlocks:
    """The blocks one swap replaced; restores them and reports their coverage."""

    def __init__(self, model: torch.nn.Module, blocks: list[SwappedBlock]):
        self.model = model
        self.blocks = blocks
        self.restored = False
        # experts this swap linearized itself, to pack back on restore
        self.linearized: list[str] = []

    def __len__(self) -> int:
        return len(self.blocks)

    def coverage_pass(self, label: str = "calibration") -> CalibrationPass:
        return CalibrationPass(label, [block.coverage() for block in self.blocks])

    def coverage(self, label: str = "calibration") -> CoverageReport:
        """Counts of the current pass."""
        return CoverageReport(passes=[self.coverage_pass(label)])

    def reset_counts(self) -> None:
        for block in self.blocks:
            block.replacement.dispatcher.reset_counts()

    def restore(self, repack: bool = False) -> None:
        """Put back every non-permanent block (safe to call twice). With
        ``repack``, experts linearized by this swap go back to their fused form,
        so the model is the one that came in (same modules, same outputs)."""
        if self.restored:
            return
        for block in reversed(self.blocks):
            dispatcher = block.replacement.dispatcher
            if hasattr(dispatcher, "remove"):
                dispatcher.remove()
            restored = block.replacement.restore(block.original)
            if restored is not block.replacement:
                self.model.set_submodule(block.plan.target, restored)
        if repack:
            for name in self.linearized:
                module = self.model.get_submodule(name)
                if isinstance(module, LinearExperts2D):
                    self.model.set_submodule(name, module.to_experts_module())
        self.restored = True
        logger.debug(f"Restored {len(self.blocks)} MoE block(s) after calibration")


def _construct(module_class: type, original: torch.nn.Module, config, all_mode: bool):
    """Build with the arguments the constructor accepts (upstream's contract is
    ``(original, config, calibrate_all_experts=True)``)."""
    parameters = inspect.signature(module_class.__init__).parameters
    accepts_flag = "calibrate_all_experts" in parameters or any(
        p.kind is p.VAR_KEYWORD for p in parameters.values()
    )
    if accepts_flag:
        return module_class(original, config, calibrate_all_experts=all_mode)
    return module_class(original, config)


def swap_in_calibration_modules(
    model: torch.nn.Module,
    calibrate_all_experts: bool = True,
    *,
    mode: CalibrationMode | str | dict | None = None,
    block_modes: Mapping[str, Any] | None = None,
    floor: int = 0,
    chunk_size: int | str = AUTO_CHUNK,
    seed: int = 0,
    mode_is_default: bool = False,
) -> SwappedBlocks:
    """Replace every MoE block (registered or generic) for calibration.

    :param calibrate_all_experts: shorthand for ``mode="all"`` / ``"routed"``
    :param mode: calibration mode for every block (overrides the shorthand)
    :param block_modes: per block class name, a mode overriding ``mode``
    :param floor: tokens every expert is calibrated on at least, per pass
    :param chunk_size: tokens per extra expert call; ``"auto"`` sizes calls so the
        block's activation peak stays within 1.25x of routed mode
    :param seed: seeds each block's own generator (with its name and rank)
    :param mode_is_default: ``mode`` was not chosen by the user; modules that run
        their own expert loop then get ``all`` instead of a refusal
    """
    default_mode = parse_mode(
        mode if mode is not None else ("all" if calibrate_all_experts else "routed")
    )
    block_modes = dict(block_modes or {})
    # validate every per-class mode up front: a typo must fail before any swap
    for spec in block_modes.values():
        parse_mode(spec)

    swapped = SwappedBlocks(model, [])
    # fused 3-D experts have no Linear per expert to hook: linearize (oneshot did)
    fused = [name for name, _ in get_non_linearized_moes(model)]
    if fused:
        linearize_moe(model)
        swapped.linearized = fused

    config = getattr(model, "config", None)
    plans = plan_calibration(model)
    unknown = find_unregistered_moe_blocks(model)
    if unknown:
        logger.warning(
            f"MoE-like block(s) {', '.join(unknown)} have experts and a router but "
            "neither a registered calibration module nor experts llmcompressor "
            "linearizes; they are calibrated as upstream does. Register a module "
            "for them (README, 'Adding an architecture')."
        )
    try:
        for plan in plans:
            block = model.get_submodule(plan.name)
            block_config = getattr(block, "config", config)
            explicit = plan.block_class in block_modes
            block_mode = (
                parse_mode(block_modes[plan.block_class]) if explicit else default_mode
            )
            block_floor = floor
            if plan.path == "registered":
                module_class = get_calibration_module(plan.block_class)
                if module_class is None:  # failed to load; the error is logged
                    continue
                if module_class.writes_own_forward() and not explicit:
                    block_mode, block_floor = _own_loop_mode(
                        plan, module_class, block_mode, block_floor, mode_is_default
                    )
                all_mode = isinstance(block_mode, AllExpertsMode)
                replacement = _construct(module_class, block, block_config, all_mode)
                original = block
            else:
                original = block.experts
                replacement = CalibrationExperts(
                    original,
                    block_config,
                    isinstance(block_mode, AllExpertsMode),
                    router=find_router(block),
                    block=block,
                    block_name=plan.name,
                )
            replacement.configure(
                plan.name,
                block_mode,
                floor=block_floor,
                chunk_size=chunk_size,
                seed=seed,
                rank=world()[0],
                weighting_required=explicit or not mode_is_default,
            )
            model.set_submodule(plan.target, replacement)
            swapped.blocks.append(SwappedBlock(plan, original, replacement))
    except BaseException:
        # nothing is lost: undo the swaps made so far before surfacing the error
        swapped.restore(repack=True)
        raise

    if swapped.blocks:
        paths = sorted({block.plan.path for block in swapped.blocks})
        modes = sorted(
            {block.replacement.calibration_mode.spec() for block in swapped.blocks}
        )
        logger.info(
            f"Calibrating {len(swapped.blocks)} MoE block(s) ({', '.join(paths)}; "
            f"mode {', '.join(modes)}"
            + (f", floor {floor} tokens per expert" if floor else "")
            + ")"
        )
    else:
        logger.info("No MoE block found: the model is calibrated as upstream does")
    return swapped


def _own_loop_mode(
    plan: BlockPlan,
    module_class: type,
    mode: CalibrationMode,
    floor: int,
    mode_is_default: bool,
) -> tuple[CalibrationMode, int]:
    """The mode for a module with its own expert loop, which runs only routed or
    all: the default becomes ``all`` (upstream's default); an explicit other mode
    is refused later, naming the module."""
    if isinstance(mode, AllExpertsMode | RoutedMode) and not floor:
        return mode, floor
    if not mode_is_default:
        return mode, floor
    logger.info(
        f"{module_class.__name__} ({plan.name}) runs its own expert loop "
        "(upstream's contract): calibrating it in mode 'all'"
    )
    return AllExpertsMode(), 0


@contextlib.contextmanager
def moe_calibration_context(
    model: torch.nn.Module,
    calibrate_all_experts: bool = True,
    *,
    mode: CalibrationMode | str | dict | None = None,
    block_modes: Mapping[str, Any] | None = None,
    floor: int = 0,
    chunk_size: int | str = AUTO_CHUNK,
    seed: int = 0,
) -> Iterator[SwappedBlocks]:
    """Calibration modules in place for the body; on any exit the model is the one
    that came in: original blocks back, and experts that this context linearized
    packed back into their fused form."""
    swapped = swap_in_calibration_modules(
        model,
        calibrate_all_experts,
        mode=mode,
        block_modes=block_modes,
        floor=floor,
        chunk_size=chunk_size,
        seed=seed,
    )
    try:
        yield swapped
    finally:
        swapped.restore(repack=True)


def local_share_of_mode(spec: str | dict) -> str | dict:
    """``min_tokens:K`` as this rank's share of K under torchrun (its top-ups run
    inside forwards, per rank); any other mode, or one process: ``spec``."""
    if world()[1] == 1:
        return spec
    mode = parse_mode(spec)
    if isinstance(mode, MinTokensMode):
        return dataclasses.replace(mode, min_tokens=local_share(mode.min_tokens))
    return spec


def report_global_floors(
    blocks: list[BlockCoverage],
    floor: int,
    mode: str | dict,
    block_modes: Mapping[str, str | dict],
) -> None:
    """Report the run's floor and ``min_tokens:K``, not each rank's share."""
    for block in blocks:
        if floor and block.floor == local_share(floor):
            block.floor = floor
        spec = block_modes.get(block.block_class, mode)
        if block.mode == parse_mode(local_share_of_mode(spec)).spec():
            block.mode = parse_mode(spec).spec()
