"""``MoECalibrationModifier``: the recipe hook that swaps calibration modules in.

List it first in a recipe, before ``GPTQModifier``/``AWQModifier``/... Lifecycle:

1. ``on_initialize``: swap every MoE block for its calibration module (registered
   or generic, see ``context.py``) and listen to the calibration lifecycle.
2. Each calibration pass (one per quantization modifier in oneshot's independent
   pipeline) counts tokens per expert afresh.
3. When a layer's calibration forwards end, before GPTQ/AWQ compress it, its
   blocks' coverage is checked: an expert below ``min_tokens`` stops the run in
   that layer, naming the experts and the fixes (or is left for the RTN fallback).
4. ``on_finalize``: restore the original blocks, quantize starved experts
   round-to-nearest if asked, keep the coverage report.
5. A failed run (any exception in oneshot) restores the original blocks too.

It needs no data, so llmcompressor gives it the data-free pipeline: it adds no
calibration pass.

Under torchrun every decision above is taken from counts summed over the
processes, so every process decides the same (same error at the same layer, same
RTN list); a floor is split between them (``distributed/``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from llmcompressor.core import State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.factory import ModifierFactory
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from . import distributed, upstream
from .calibration.base import AUTO_CHUNK
from .calibration.context import (
    SwappedBlocks,
    local_share_of_mode,
    report_global_floors,
    swap_in_calibration_modules,
)
from .calibration.modes import any_weighted, parse_mode
from .calibration.seeding import restore_global_rng, seed_calibration_order
from .checkpoint.checks import check_quantized_tensors
from .checkpoint.fit import FitChange, FitPolicy, fit_schemes_to_model
from .checkpoint.layout import ExpertSaveLayout, apply_save_layout, plan_save_layout
from .checkpoint.output_dir import staged_output_dir
from .checkpoint.rtn import apply_rtn_fallback
from .checkpoint.verify import finish_checkpoint
from .defaults import DEFAULT_FLOOR, DEFAULT_MODE, MIN_TOKENS_WITHOUT_FLOOR
from .reporting.coverage import (
    CalibrationPass,
    CoverageReport,
    UndercalibratedExpertsError,
    save_coverage_files,
)
from .statistics.recipe_checks import require_weighting_gptq
from .upstream.moe import calibrate_all_experts_flag

__all__ = ["MoECalibrationModifier", "last_coverage_report", "DEFAULT_MODE"]

_last_report: CoverageReport | None = None


def last_coverage_report() -> CoverageReport | None:
    """Coverage of the most recent run (e.g. after ``oneshot``)."""
    return _last_report


ModeSpec = str | dict[str, int | float]

# the defaults, with why they were chosen: defaults.py (the CLI reads them too)


class MoECalibrationModifier(Modifier):
    """
    :param calibrate_all_experts: shorthand for ``mode: all`` / ``mode: routed``;
        unset, ``oneshot(moe_calibrate_all_experts=False)`` means routed and
        otherwise the default mode, ``weighted:2`` with a floor, applies (its
        weights need ``SharedHessianGPTQModifier``; under any other modifier it
        calibrates on routed tokens plus the floor)
    :param mode: calibration mode for every block: ``routed``, ``all``,
        ``top_k:N``, ``min_tokens:K``, ``affinity[:S]`` or ``weighted:P[,prior:L]``
        (routing-weighted GPTQ Hessians, see ``modes.WeightedMode``); overrides
        ``calibrate_all_experts``
    :param block_modes: per MoE block class name, a mode overriding ``mode``
    :param floor: every expert is calibrated on at least this many tokens per
        pass (or all there are), topped up with its highest-affinity candidates;
        unset: 16 under the default mode and weighted modes, 0 when another mode
        is chosen
    :param chunk_size: tokens per extra (statistics-only) expert call, or ``auto``
    :param seed: seeds each block's sampling (with the block's name and rank) and
        the calibration data's shuffling, so runs are reproducible
    :param min_tokens: an expert calibrated on fewer tokens stops the run at the
        end of its layer's calibration, before it is compressed ...; unset: the
        floor, or 1 without one
    :param rtn_fallback: ... unless this is set: then it is quantized
        round-to-nearest from its weights alone (activation scales from its
        calibrated peers), and the report says so
    :param scheme_fit: what happens to a Linear whose width the recipe's group size
        does not divide (GLM-4.5-Air's 10944-wide dense MLP): ``ignore`` keeps it
        unquantized (servable by every vLLM kernel), ``regroup`` gives it a
        smaller group, ``raise`` stops; see ``fit.py``
    """

    calibrate_all_experts: bool | None = None
    mode: ModeSpec | None = None
    block_modes: dict[str, ModeSpec] = Field(default_factory=dict)
    floor: int | None = Field(default=None, ge=0)
    chunk_size: int | Literal["auto"] = AUTO_CHUNK
    seed: int = 0
    min_tokens: int | None = Field(default=None, ge=0)
    rtn_fallback: bool = False
    scheme_fit: FitPolicy = "ignore"

    _swapped: SwappedBlocks | None = PrivateAttr(default=None)
    _passes: list[CalibrationPass] = PrivateAttr(default_factory=list)
    _pass_label: str = PrivateAttr(default="calibration")
    _checked: set[int] = PrivateAttr(default_factory=set)
    _coverage_report: CoverageReport | None = PrivateAttr(default=None)
    _rng_state: torch.Tensor | None = PrivateAttr(default=None)
    _fit_changes: list[FitChange] = PrivateAttr(default_factory=list)
    _save_layout: ExpertSaveLayout | None = PrivateAttr(default=None)
    # resolved once at initialize: oneshot's all-experts flag, which the default
    # depends on, is off again by finalize
    _resolved: tuple[str | dict, int, int] | None = PrivateAttr(default=None)
    # set when the per-layer check stopped the run: it raised on every rank at
    # the same point, so the failure's report may still be summed over ranks
    _stopped_by_check: bool = PrivateAttr(default=False)

    @property
    def coverage_report(self) -> CoverageReport | None:
        """Per-expert token counts of this run (set on finalize or failure)."""
        return self._coverage_report

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, value: Any) -> Any:
        if value is not None:
            parse_mode(value)
        return value

    @field_validator("block_modes")
    @classmethod
    def _check_block_modes(cls, value: dict[str, Any]) -> dict[str, Any]:
        for class_name, spec in value.items():
            try:
                parse_mode(spec)
            except ValueError as err:
                raise ValueError(f"block_modes[{class_name!r}]: {err}") from None
        return value

    @field_validator("chunk_size")
    @classmethod
    def _check_chunk_size(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("chunk_size must be at least 1 (or 'auto')")
        return value

    def _mode_is_default(self) -> bool:
        return self.mode is None and self.calibrate_all_experts is None

    def resolved_mode(self) -> ModeSpec:
        """``mode`` if set, else ``calibrate_all_experts`` (all / routed), else
        routed when oneshot's ``moe_calibrate_all_experts`` is off, else
        :data:`DEFAULT_MODE`."""
        if self._resolved is not None:
            return self._resolved[0]
        if self.mode is not None:
            return self.mode
        if self.calibrate_all_experts is not None:
            return "all" if self.calibrate_all_experts else "routed"
        return DEFAULT_MODE if calibrate_all_experts_flag() else "routed"

    def resolved_floor(self) -> int:
        if self._resolved is not None:
            return self._resolved[1]
        if self.floor is not None:
            return self.floor
        # a mode the user chose runs as chosen; the default comes with its floor,
        # and so do weighted modes, also per block (the floor's top-ups are their
        # prior's tokens; the one floor then applies to every block)
        chosen = not self._mode_is_default() or not calibrate_all_experts_flag()
        if chosen and not any_weighted(
            [self.resolved_mode(), *self.block_modes.values()]
        ):
            return 0
        return DEFAULT_FLOOR

    def resolved_min_tokens(self) -> int:
        if self._resolved is not None:
            return self._resolved[2]
        if self.min_tokens is not None:
            return self.min_tokens
        return self.resolved_floor() or MIN_TOKENS_WITHOUT_FLOOR

    # -- lifecycle ----------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        upstream.begin_run()  # checks the upstream hook points first
        # a family whose checkpoints cannot hold per-expert tensors stops here,
        # before any calibration
        self._save_layout = plan_save_layout(state.model)
        if self._save_layout is not None:
            logger.info(self._save_layout.describe())
        # before the other modifiers initialize, which is where a width their
        # group size does not divide would stop the run
        self._fit_changes = fit_schemes_to_model(
            state.model,
            active_session().lifecycle.recipe.modifiers,
            policy=self.scheme_fit,
        )
        self._resolved = None
        self._resolved = (
            self.resolved_mode(),
            self.resolved_floor(),
            self.resolved_min_tokens(),
        )
        require_weighting_gptq(
            [self.mode, *self.block_modes.values()],
            active_session().lifecycle.recipe.modifiers,
            default=self.resolved_mode() if self._mode_is_default() else None,
        )
        self._passes, self._checked = [], set()
        self._stopped_by_check = False
        # the calibration data's order decides which tokens share a forward
        self._rng_state = seed_calibration_order(
            self.seed, getattr(state.data, "calib", None)
        )
        # floors act inside forwards, per process: under torchrun each process
        # tops up to its share, so the sum over processes reaches the floor
        self._swapped = swap_in_calibration_modules(
            state.model,
            mode=local_share_of_mode(self.resolved_mode()),
            block_modes={
                name: local_share_of_mode(spec)
                for name, spec in self.block_modes.items()
            },
            floor=distributed.local_share(self.resolved_floor()),
            chunk_size=self.chunk_size,
            seed=self.seed,
            mode_is_default=self._mode_is_default(),
        )
        upstream.add_listener(self)
        return True

    def on_pass_start(self, modifier_names: list[str]) -> None:
        self._close_pass()
        others = [n for n in modifier_names if n != type(self).__name__]
        self._pass_label = ", ".join(others) or "calibration"

    def on_layer_calibrated(self, modules: list[torch.nn.Module]) -> None:
        """Before the quantization modifiers compress this layer."""
        if self._swapped is None:
            return
        in_layer = {id(module) for module in modules}
        blocks = [
            block
            for block in self._swapped.blocks
            if id(block.replacement) in in_layer and id(block) not in self._checked
        ]
        self._check(blocks)

    def on_pass_end(self) -> None:
        # pipelines without per-layer epochs end here, before compressing
        if self._swapped is not None:
            self._check([b for b in self._swapped.blocks if id(b) not in self._checked])

    def on_run_failed(self) -> None:
        upstream.remove_listener(self)
        restore_global_rng(self._rng_state)
        if self._swapped is not None:
            swapped, self._swapped = self._swapped, None
            # a rank that failed on its own must not enter a collective the others
            # never reach: then this report holds this rank's counts only
            self._keep_report(swapped, reduce=self._stopped_by_check)
            swapped.restore()
            logger.info("Restored the original MoE blocks after the failed run")

    def _check(self, blocks: list) -> None:
        # counts summed over ranks first (torchrun), so that every rank decides
        # the same, from the sums only: the same error on every rank, same layer
        summed = distributed.all_reduce_blocks([block.coverage() for block in blocks])
        coverages = {id(block): cov for block, cov in zip(blocks, summed, strict=True)}
        # blocks that ran no calibrating forward (our own data-free pass, a layer
        # of another subgraph) have nothing to check yet; calibrated counts, not
        # routed ones: a module with its own loop in 'all' mode observes no routing
        calibrated = [b for b in blocks if any(coverages[id(b)].calibrated)]
        if not calibrated:
            return
        self._checked.update(id(block) for block in calibrated)
        min_tokens = self.resolved_min_tokens()
        starved = [
            f"{block.name}.experts.{expert}"
            for block in calibrated
            for expert, count in enumerate(coverages[id(block)].calibrated)
            if count < min_tokens
        ]
        if starved and not self.rtn_fallback:
            self._stopped_by_check = True
            raise UndercalibratedExpertsError(
                starved, min_tokens, hint=self._starved_hint()
            )

    def _starved_hint(self) -> str:
        floor = self.resolved_floor()
        if floor:
            return (
                f"Every expert was topped up to the floor of {floor} tokens, so "
                "this layer saw fewer calibration tokens than that in all: use more "
                "calibration samples or a lower floor."
            )
        return (
            "Fix: use the default mode (it keeps a floor of tokens per expert), "
            "set floor: K or mode 'all', use more calibration samples, or set "
            "rtn_fallback: true to quantize these experts round-to-nearest."
        )

    def _close_pass(
        self, swapped: SwappedBlocks | None = None, reduce: bool = True
    ) -> None:
        """Keep the pass's counts and reset them. With ``reduce`` (every rank
        calls it at the same point) the counts are summed over ranks; without it
        (a rank failing alone) they are this rank's own."""
        swapped = swapped or self._swapped
        if swapped is None:
            return
        current = swapped.coverage_pass(self._pass_label)
        if reduce:
            distributed.all_reduce_blocks(current.blocks)
        report_global_floors(
            current.blocks,
            self.resolved_floor(),
            self.resolved_mode(),
            self.block_modes,
        )
        # blocks that never ran in this pass (a run that stopped at an earlier
        # layer) have nothing to report
        current.blocks = [block for block in current.blocks if any(block.calibrated)]
        if current.blocks:
            self._passes.append(current)
        swapped.reset_counts()
        self._checked.clear()

    def _keep_report(
        self, swapped: SwappedBlocks, reduce: bool = True
    ) -> CoverageReport:
        global _last_report
        self._close_pass(swapped, reduce=reduce)
        report = CoverageReport(
            passes=list(self._passes), min_tokens=self.resolved_min_tokens()
        )
        _last_report = self._coverage_report = report
        return report

    def on_finalize(self, state: State, **kwargs) -> bool:
        upstream.remove_listener(self)
        restore_global_rng(self._rng_state)
        try:
            return self._finalize(state)
        finally:
            upstream.end_run_outside_oneshot()

    def _finalize(self, state: State) -> bool:
        if self._swapped is None:
            return True
        swapped, self._swapped = self._swapped, None
        report = self._keep_report(swapped)
        swapped.restore()
        if report.passes:
            # global (summed over ranks): every rank quantizes the same experts
            # and writes the same values into the shared weights
            starved = report.undercalibrated()
            if starved and self.rtn_fallback:
                report.rtn_fallback = apply_rtn_fallback(
                    state.model, starved, report.min_tokens
                )
        # no rank reads (or saves) the weights before every rank wrote them
        distributed.wait_for_all_ranks()
        # a NaN, Inf or zero scale must stop the run before oneshot saves it
        check_quantized_tensors(state.model)
        apply_save_layout(state.model, self._save_layout)
        if distributed.world()[0] == 0:  # every rank saves; rank 0 writes
            upstream.save_into(staged_output_dir)  # moved in once checked
            upstream.after_save(
                lambda directory: save_coverage_files(report, directory)
            )
            upstream.after_save(
                lambda directory: finish_checkpoint(directory, state.model)
            )
        return True


ModifierFactory.register("MoECalibrationModifier", MoECalibrationModifier)
