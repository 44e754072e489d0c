"""Per-expert token counts -> table, JSON and heatmap.

``routed`` is what the router sent an expert during calibration forwards;
``calibrated`` is what the expert's Linears were actually calibrated on (the mode
may add tokens). Propagation-only forwards (hooks disabled) are not counted.

Counts are kept per calibration pass and never summed across passes: a recipe with
two modifiers that need data (SmoothQuant, then GPTQ) runs the calibration data
through the model twice, and each pass has its own counts. The last pass is the one
that quantized the experts, so the table, the check against ``min_tokens`` and the
heatmap use it unless told otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from .naming import natural_key, span

__all__ = [
    "BlockCoverage",
    "CalibrationPass",
    "CoverageReport",
    "UndercalibratedExpertsError",
]

SCHEMA_VERSION = 2


@dataclass
class BlockCoverage:
    """One MoE block's per-expert counts in one calibration pass."""

    name: str  # module path of the block, e.g. "model.layers.1.mlp"
    block_class: str  # class of the original block (what --block-mode takes)
    calibration_module: str  # class that replaced it, e.g. "CalibrationGlm4MoeMoE"
    mode: str  # calibration mode, e.g. "affinity:0.1"
    routed: list[int]  # per expert: tokens the router sent it in this pass
    calibrated: list[int]  # per expert: tokens its Linears were calibrated on
    floor: int = 0  # the floor of tokens per expert in force here (0: none)

    @property
    def num_experts(self) -> int:
        return len(self.routed)


@dataclass
class CalibrationPass:
    """The counts of one pass of the calibration data through the model."""

    label: str  # the modifiers this pass served, e.g. "GPTQModifier"
    blocks: list[BlockCoverage]


@dataclass
class CoverageReport:
    passes: list[CalibrationPass]
    min_tokens: int = 1
    # experts ("block.experts.N") quantized round-to-nearest because they had
    # fewer than min_tokens calibrated tokens and the user opted into the fallback
    rtn_fallback: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> list[BlockCoverage]:
        """The blocks of the last pass: the one that quantized the experts."""
        return self.passes[-1].blocks if self.passes else []

    def _pass(self, pass_index: int) -> CalibrationPass | None:
        if not self.passes:
            return None
        try:
            return self.passes[pass_index]
        except IndexError:
            raise IndexError(
                f"pass_index {pass_index}: this report has {len(self.passes)} "
                "calibration pass(es)"
            ) from None

    def describe_pass(self, pass_index: int = -1) -> str:
        """``"calibration pass 2 of 2 (GPTQModifier)"``."""
        calibration = self._pass(pass_index)
        if calibration is None:
            return "no calibration pass"
        number = pass_index % len(self.passes) + 1
        return f"calibration pass {number} of {len(self.passes)} ({calibration.label})"

    def rows(self, pass_index: int = -1) -> list[dict[str, Any]]:
        """One row per (block, expert) of one pass, worst covered first."""
        calibration = self._pass(pass_index)
        rows = []
        for block in calibration.blocks if calibration else []:
            total_routed = sum(block.routed) or 1
            for expert, (routed, calibrated) in enumerate(
                zip(block.routed, block.calibrated, strict=True)
            ):
                rows.append(
                    {
                        "block": block.name,
                        "block_class": block.block_class,
                        "expert": expert,
                        "routed": routed,
                        "calibrated": calibrated,
                        "routed_share": routed / total_routed,
                    }
                )
        rows.sort(
            key=lambda r: (
                r["calibrated"],
                r["routed"],
                natural_key(r["block"]),
                r["expert"],
            )
        )
        return rows

    def undercalibrated(
        self, min_tokens: int | None = None, pass_index: int = -1
    ) -> list[str]:
        """Experts of one pass calibrated on fewer than ``min_tokens`` tokens."""
        threshold = self.min_tokens if min_tokens is None else min_tokens
        calibration = self._pass(pass_index)
        return [
            f"{block.name}.experts.{expert}"
            for block in (calibration.blocks if calibration else [])
            for expert, count in enumerate(block.calibrated)
            if count < threshold
        ]

    # -- JSON ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "min_tokens": self.min_tokens,
            "rtn_fallback": list(self.rtn_fallback),
            "passes": [
                {**asdict(calibration), "applied": applied_modes(calibration)}
                for calibration in self.passes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoverageReport:
        """Reads schema 2 and schema 1 (one list of blocks, counts summed over
        every pass, ``block_class`` naming the calibration module)."""
        version = data.get("schema_version", 1)
        if version == 1:
            passes = [
                CalibrationPass(
                    label="all passes, summed (schema 1 report)",
                    blocks=[_block_from_v1(block) for block in data["blocks"]],
                )
            ]
        elif version == SCHEMA_VERSION:
            passes = [
                CalibrationPass(
                    label=calibration["label"],
                    blocks=[BlockCoverage(**block) for block in calibration["blocks"]],
                )
                for calibration in data["passes"]
            ]
        else:
            raise ValueError(
                f"Coverage report schema {version} is newer than this "
                f"llmcompressor-moe-plugins reads ({SCHEMA_VERSION}); upgrade it."
            )
        return cls(
            passes=passes,
            min_tokens=data.get("min_tokens", 1),
            rtn_fallback=list(data.get("rtn_fallback", [])),
        )

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    # -- table --------------------------------------------------------------------

    def format_table(self, limit: int = 20, pass_index: int = -1) -> str:
        """The worst-covered experts of one pass (the last by default), then a
        summary line per pass."""
        calibration = self._pass(pass_index)
        if calibration is None or not calibration.blocks:
            return "Expert coverage: no MoE blocks were calibrated."
        rows = self.rows(pass_index)
        blocks = calibration.blocks
        starved = set(self.undercalibrated(pass_index=pass_index))
        rtn = set(self.rtn_fallback)
        floors = {block.name: block.floor for block in blocks}
        name_width = max(len("block"), *(len(b.name) for b in blocks))
        class_width = max(len("block class"), *(len(b.block_class) for b in blocks))
        lines = [
            f"Expert coverage, {self.describe_pass(pass_index)}: tokens per expert "
            "in this pass, worst first",
            f"{'block':<{name_width}} {'block class':<{class_width}} {'expert':>6} "
            f"{'routed':>8} {'calibrated':>10} {'share':>7}",
        ]
        for row in rows[:limit]:
            expert = f"{row['block']}.experts.{row['expert']}"
            if expert in rtn:
                flag = "  <- RTN fallback"
            elif expert in starved:
                flag = f"  <- below min_tokens {self.min_tokens}"
            elif row["calibrated"] < floors[row["block"]]:
                flag = f"  <- below floor {floors[row['block']]}"
            else:
                flag = ""
            lines.append(
                f"{row['block']:<{name_width}} {row['block_class']:<{class_width}} "
                f"{row['expert']:>6} {row['routed']:>8} {row['calibrated']:>10} "
                f"{row['routed_share']:>7.1%}{flag}"
            )
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more experts (see coverage.json)")
        lines.append(_summary(calibration))
        settings = [
            f"mode {applied_modes(calibration)}",
            f"floor {span(b.floor for b in blocks)}",
            f"min_tokens {self.min_tokens}",
        ]
        if self.rtn_fallback:
            settings.append(f"{len(self.rtn_fallback)} expert(s) RTN fallback")
        lines.append("; ".join(settings))
        current = pass_index % len(self.passes)
        for index, other in enumerate(self.passes):
            if index != current and other.blocks:
                lines.append(f"{self.describe_pass(index)}: " + _summary(other))
        return "\n".join(lines)

    # -- heatmap ------------------------------------------------------------------

    def save_heatmap(self, path: str | Path, pass_index: int = -1) -> Path:
        """Routed and calibrated tokens per MoE block (row) x expert (column) of
        one pass, on one log colour scale, with starved and RTN-fallback experts
        marked; a short note instead when no MoE block was calibrated."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        calibration = self._pass(pass_index)
        if calibration is None or not calibration.blocks:
            fig = plt.figure(figsize=(6, 1.2))
            fig.text(
                0.5,
                0.5,
                "No MoE blocks were calibrated: nothing to show.\n"
                "(A dense model, or MoE blocks without a calibration module.)",
                ha="center",
                va="center",
                fontsize=10,
            )
            fig.savefig(path, dpi=100)
            plt.close(fig)
            return path
        from .heatmap import draw_heatmap

        draw_heatmap(self, calibration, pass_index, path)
        return path


class UndercalibratedExpertsError(RuntimeError):
    """Experts got fewer calibration tokens than required."""

    DEFAULT_HINT = (
        "calibrate with mode 'all' (or 'min_tokens:K'), use more calibration "
        "samples, or set rtn_fallback=True to quantize these experts "
        "round-to-nearest from their weights alone"
    )

    def __init__(self, experts: list[str], min_tokens: int, hint: str | None = None):
        self.experts = experts
        self.min_tokens = min_tokens
        shown = ", ".join(experts[:10]) + (
            f" and {len(experts) - 10} more" if len(experts) > 10 else ""
        )
        super().__init__(
            f"{len(experts)} expert(s) got fewer than {min_tokens} calibration "
            f"token(s): {shown}. Quantizing them would zero them (GPTQ with an empty "
            f"Hessian) or leave them without statistics. Fix: {_fix(hint)}"
        )


def _fix(hint: str | None) -> str:
    text = (hint or UndercalibratedExpertsError.DEFAULT_HINT).strip()
    text = text.removeprefix("Fix:").strip()
    return text if text.endswith(".") else text + "."


def _block_from_v1(block: dict[str, Any]) -> BlockCoverage:
    # schema 1 named the calibration module "block_class"
    module = block["block_class"]
    return BlockCoverage(
        name=block["name"],
        block_class=module.removeprefix("Calibration") or module,
        calibration_module=module,
        mode=block["mode"],
        routed=list(block["routed"]),
        calibrated=list(block["calibrated"]),
    )


def applied_modes(calibration: CalibrationPass) -> str:
    """The pass's modes as applied: routing weights reach only the Hessians that
    SharedHessianGPTQModifier accumulates, so under any other modifier a
    weighted mode calibrated its token choice unweighted, and says so."""
    modes = ", ".join(sorted({b.mode for b in calibration.blocks}))
    weighted = any(b.mode.startswith("weighted") for b in calibration.blocks)
    names = calibration.label.replace(",", " ").split()
    if not weighted or "SharedHessianGPTQModifier" in names:
        return modes
    fix = (
        ": use SharedHessianGPTQModifier for the weights"
        if "GPTQModifier" in names
        else ""
    )
    return f"{modes} (unweighted under {calibration.label}{fix})"


def _summary(calibration: CalibrationPass) -> str:
    calibrated = [c for b in calibration.blocks for c in b.calibrated]
    routed = [r for b in calibration.blocks for r in b.routed]
    return (
        f"{len(calibrated)} experts in {len(calibration.blocks)} blocks; tokens "
        f"per expert: calibrated min {min(calibrated)}, max {max(calibrated)}; "
        f"routed min {min(routed)}, max {max(routed)}"
    )


# -- drawing --------------------------------------------------------------------


def save_coverage_files(report: CoverageReport, directory: str | Path) -> None:
    """coverage.json and coverage.png into ``directory`` (beside a checkpoint)."""
    report.save_json(Path(directory) / "coverage.json")
    report.save_heatmap(Path(directory) / "coverage.png")
    logger.info(f"Coverage report written beside the checkpoint in {directory}")
