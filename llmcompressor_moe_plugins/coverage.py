"""Per-expert token counts -> table, JSON and heatmap.

``routed`` is what the router sent an expert during calibration forwards;
``calibrated`` is what the expert's Linears were actually calibrated on (the mode
may add tokens). Propagation-only forwards (hooks disabled) are not counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BlockCoverage",
    "CoverageReport",
    "build_coverage_report",
    "UndercalibratedExpertsError",
]

SCHEMA_VERSION = 1


@dataclass
class BlockCoverage:
    name: str
    block_class: str
    mode: str
    routed: list[int]
    calibrated: list[int]

    @property
    def num_experts(self) -> int:
        return len(self.routed)


@dataclass
class CoverageReport:
    blocks: list[BlockCoverage]
    min_tokens: int = 1
    # experts ("block.experts.N") quantized round-to-nearest because they had
    # fewer than min_tokens calibrated tokens and the user opted into the fallback
    rtn_fallback: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (block, expert), worst covered first."""
        rows = []
        for block in self.blocks:
            total_routed = sum(block.routed) or 1
            for expert, (routed, calibrated) in enumerate(
                zip(block.routed, block.calibrated, strict=True)
            ):
                rows.append(
                    {
                        "block": block.name,
                        "expert": expert,
                        "routed": routed,
                        "calibrated": calibrated,
                        "routed_share": routed / total_routed,
                    }
                )
        rows.sort(key=lambda r: (r["calibrated"], r["routed"], r["block"], r["expert"]))
        return rows

    def undercalibrated(self, min_tokens: int | None = None) -> list[str]:
        threshold = self.min_tokens if min_tokens is None else min_tokens
        return [
            f"{block.name}.experts.{expert}"
            for block in self.blocks
            for expert, count in enumerate(block.calibrated)
            if count < threshold
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "min_tokens": self.min_tokens,
            "rtn_fallback": list(self.rtn_fallback),
            "blocks": [asdict(block) for block in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoverageReport:
        return cls(
            blocks=[BlockCoverage(**block) for block in data["blocks"]],
            min_tokens=data.get("min_tokens", 1),
            rtn_fallback=list(data.get("rtn_fallback", [])),
        )

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def format_table(self, limit: int = 20) -> str:
        rows = self.rows()
        lines = [
            f"{'block':<40} {'expert':>6} {'routed':>8} {'calibrated':>10} "
            f"{'share':>7}",
        ]
        for row in rows[:limit]:
            flag = (
                "  <- RTN fallback"
                if (f"{row['block']}.experts.{row['expert']}" in self.rtn_fallback)
                else ""
            )
            lines.append(
                f"{row['block']:<40} {row['expert']:>6} {row['routed']:>8} "
                f"{row['calibrated']:>10} {row['routed_share']:>7.1%}{flag}"
            )
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more experts (see coverage.json)")
        if self.blocks:
            calibrated = [c for block in self.blocks for c in block.calibrated]
            lines.append(
                f"{len(calibrated)} experts in {len(self.blocks)} blocks; calibrated "
                f"tokens per expert: min {min(calibrated)}, max {max(calibrated)}"
            )
        return "\n".join(lines)

    def save_heatmap(self, path: str | Path) -> Path:
        """Routed-token share per layer x expert, so router imbalance shows."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        path = Path(path)
        width = max((block.num_experts for block in self.blocks), default=1)
        shares = np.full((max(len(self.blocks), 1), width), np.nan)
        for row, block in enumerate(self.blocks):
            total = sum(block.routed) or 1
            shares[row, : block.num_experts] = [r / total for r in block.routed]
        fig, ax = plt.subplots(
            figsize=(min(2 + 0.35 * width, 24), 1.5 + 0.4 * len(self.blocks))
        )
        image = ax.imshow(shares, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE block")
        ax.set_yticks(range(len(self.blocks)), [b.name for b in self.blocks])
        ax.set_title("Share of routed calibration tokens per expert")
        fig.colorbar(image, ax=ax, label="routed share")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class UndercalibratedExpertsError(RuntimeError):
    """Experts got fewer calibration tokens than required."""

    def __init__(self, experts: list[str], min_tokens: int):
        self.experts = experts
        shown = ", ".join(experts[:10]) + (
            f" and {len(experts) - 10} more" if len(experts) > 10 else ""
        )
        super().__init__(
            f"{len(experts)} expert(s) got fewer than {min_tokens} calibration "
            f"token(s): {shown}. Quantizing them would zero them (GPTQ with an empty "
            "Hessian) or leave them without statistics. Fix: calibrate with "
            "mode 'all' (or 'min_tokens:K'), use more calibration samples, or set "
            "rtn_fallback=True to quantize these experts round-to-nearest from their "
            "weights alone."
        )


def build_coverage_report(named_modules: list[tuple[str, Any]]) -> CoverageReport:
    blocks = []
    for name, module in named_modules:
        routed = module.routed_token_counts
        calibrated = module.calibrated_token_counts
        num_experts = _num_experts(module)
        blocks.append(
            BlockCoverage(
                name=name,
                block_class=type(module).__name__,
                mode=module.calibration_mode.spec(),
                routed=routed.tolist() if routed is not None else [0] * num_experts,
                calibrated=(
                    calibrated.tolist() if calibrated is not None else [0] * num_experts
                ),
            )
        )
    return CoverageReport(blocks=blocks)


def _num_experts(module: Any) -> int:
    return int(getattr(module, "num_experts", 0))
