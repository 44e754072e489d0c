"""``MoECalibrationModifier``: the recipe hook that swaps calibration modules in.

List it first in a recipe, before ``GPTQModifier``/``AWQModifier``/...:
``on_initialize`` swaps every registered MoE block for its calibration module,
``on_finalize`` restores the originals and checks coverage. It needs no data, so
llmcompressor gives it the data-free pipeline: it adds no calibration pass.
"""

from __future__ import annotations

from typing import Any, Literal

from llmcompressor.core import State
from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.factory import ModifierFactory
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from .base import AUTO_CHUNK
from .context import SwappedBlocks, swap_in_calibration_modules
from .coverage import CoverageReport, UndercalibratedExpertsError
from .modes import parse_mode
from .rtn import quantize_round_to_nearest

__all__ = ["MoECalibrationModifier", "last_coverage_report"]

_last_report: CoverageReport | None = None


def last_coverage_report() -> CoverageReport | None:
    """Coverage of the most recent run that finished (e.g. after ``oneshot``)."""
    return _last_report


ModeSpec = str | dict[str, int | float]

# Chosen from benchmarks/quality.py (see benchmarks/RESULTS.md): lowest mean
# perplexity increase over all calibration budgets, never clearly worse than the
# better of routed and all, at a fraction of all's cost. It does not meet every
# criterion of issue 5 (cost <= 1.2x routed at every budget); RESULTS.md says where.
DEFAULT_MODE = "affinity:0.1"


class MoECalibrationModifier(Modifier):
    """
    :param calibrate_all_experts: shorthand for ``mode: all`` / ``mode: routed``;
        unset, ``oneshot(moe_calibrate_all_experts=False)`` means routed and
        otherwise the default mode, ``affinity:0.1``, applies
    :param mode: calibration mode for every block: ``routed``, ``all``,
        ``top_k:N``, ``min_tokens:K`` or ``affinity[:S]``; overrides
        ``calibrate_all_experts``
    :param block_modes: per MoE block class name, a mode overriding ``mode``
    :param chunk_size: tokens per extra (statistics-only) expert call, or ``auto``
    :param min_tokens: experts calibrated on fewer tokens fail the run ...
    :param rtn_fallback: ... unless this is set: then they are quantized
        round-to-nearest from their weights alone, and the report says so
    """

    calibrate_all_experts: bool | None = None
    mode: ModeSpec | None = None
    block_modes: dict[str, ModeSpec] = Field(default_factory=dict)
    chunk_size: int | Literal["auto"] = AUTO_CHUNK
    min_tokens: int = Field(default=1, ge=0)
    rtn_fallback: bool = False

    _swapped: SwappedBlocks | None = PrivateAttr(default=None)
    _coverage_report: CoverageReport | None = PrivateAttr(default=None)

    @property
    def coverage_report(self) -> CoverageReport | None:
        """Per-expert token counts of this run (set on finalize)."""
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

    def resolved_calibrate_all_experts(self) -> bool:
        if self.calibrate_all_experts is not None:
            return self.calibrate_all_experts
        return get_calibrate_all_experts_flag()

    def resolved_mode(self) -> ModeSpec:
        """``mode`` if set, else ``calibrate_all_experts`` (all / routed), else
        routed when oneshot's ``moe_calibrate_all_experts`` is off, else
        :data:`DEFAULT_MODE`."""
        if self.mode is not None:
            return self.mode
        if self.calibrate_all_experts is not None:
            return "all" if self.calibrate_all_experts else "routed"
        return DEFAULT_MODE if get_calibrate_all_experts_flag() else "routed"

    def on_initialize(self, state: State, **kwargs) -> bool:
        self._swapped = swap_in_calibration_modules(
            state.model,
            mode=self.resolved_mode(),
            block_modes=self.block_modes,
            chunk_size=self.chunk_size,
        )
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        global _last_report
        if self._swapped is None:
            return True
        swapped, self._swapped = self._swapped, None
        swapped.restore()

        report = swapped.coverage()
        report.min_tokens = self.min_tokens
        starved = report.undercalibrated()
        if starved and not self.rtn_fallback:
            _last_report = self._coverage_report = report
            raise UndercalibratedExpertsError(starved, self.min_tokens)
        if starved:
            modules = dict(state.model.named_modules())
            quantize_round_to_nearest([modules[name] for name in starved])
            report.rtn_fallback = starved
            logger.warning(
                f"{len(starved)} expert(s) had fewer than {self.min_tokens} "
                "calibration token(s) and were quantized round-to-nearest from "
                f"their weights: {', '.join(starved[:10])}"
            )
        _last_report = self._coverage_report = report
        return True


ModifierFactory.register("MoECalibrationModifier", MoECalibrationModifier)
