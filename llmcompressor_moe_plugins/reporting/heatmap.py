"""The coverage heatmap: routed and calibrated tokens per MoE block (row) x expert
(column) of one pass, on one log colour scale (``CoverageReport.save_heatmap``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .naming import natural_key, span

__all__ = ["draw_heatmap"]


def _short_labels(names: list[str]) -> tuple[list[str], str]:
    """Row labels without the parts every name shares, and the axis label:
    ``model.layers.{1,2}.mlp`` -> ``["1", "2"]``, ``"model.layers.*.mlp"``."""
    parts = [name.split(".") for name in names]
    if len(names) < 2 or len({len(p) for p in parts}) != 1:
        return names, "MoE block"
    varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(varying) != 1:
        return names, "MoE block"
    index = varying[0]
    pattern = ".".join("*" if i == index else part for i, part in enumerate(parts[0]))
    return [p[index] for p in parts], pattern


def _tick_step(count: int, room: int) -> int:
    """1, 2, 5, 10, ... so that at most ``room`` ticks show."""
    if count <= room:
        return 1
    raw = count / room
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= raw:
            return int(factor * magnitude)
    return int(10 * magnitude)


def draw_heatmap(report: Any, calibration: Any, pass_index: int, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    blocks = sorted(calibration.blocks, key=lambda b: natural_key(b.name))
    rows, width = len(blocks), max(b.num_experts for b in blocks)
    routed = np.full((rows, width), np.nan)
    calibrated = np.full((rows, width), np.nan)
    for row, block in enumerate(blocks):
        routed[row, : block.num_experts] = block.routed
        calibrated[row, : block.num_experts] = block.calibrated
    top = max(np.nanmax(calibrated), np.nanmax(routed), 1.0)

    # Size from the shape: cells stay visible at 46 x 128, labels never collide at
    # 2 x 16, and the figure stays within what a screen shows.
    panel_width = min(max(width * 0.12, 6.0), 15.0)
    panel_height = min(max(rows * 0.14, 1.0), 7.0)
    fig, axes = plt.subplots(
        2,
        1,
        figsize=(panel_width + 2.2, 2 * panel_height + 2.4),
        sharex=True,
        layout="constrained",
    )
    # grey: no tokens (a log scale cannot show 0), or no such expert
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    norm = LogNorm(vmin=1, vmax=max(top, 10))

    labels, axis_label = _short_labels([b.name for b in blocks])
    y_step = _tick_step(rows, max(int(panel_height * 5), 2))
    x_step = _tick_step(width, max(int(panel_width * 3), 4))
    floors = np.array([[b.floor] for b in blocks])
    below_floor = calibrated < floors
    starved = calibrated < report.min_tokens
    rtn = np.zeros_like(starved)
    for row, block in enumerate(blocks):
        for expert in range(block.num_experts):
            if f"{block.name}.experts.{expert}" in report.rtn_fallback:
                rtn[row, expert] = True
    starved &= ~rtn
    below_floor &= ~(rtn | starved)
    cell_points = min(panel_width * 72 / width, panel_height * 72 / rows)
    marker_size = max(min(cell_points * 0.85, 14.0), 3.0) ** 2

    image = None
    panels = (
        (axes[0], routed, "routed: tokens the router sent each expert"),
        (axes[1], calibrated, "calibrated: tokens each expert's Linears saw"),
    )
    for ax, counts, title in panels:
        masked = np.ma.masked_where(~(counts > 0), counts)
        image = ax.imshow(
            masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"
        )
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel(axis_label)
        ticks = list(range(0, rows, y_step))
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    axes[1].set_xticks(list(range(0, width, x_step)))
    axes[1].set_xlabel("expert")
    # marks on the calibrated panel: what quantization will do with each expert
    for mask, marker, colour in (
        (rtn, "x", "#e41a1c"),
        (starved, "X", "#e41a1c"),
        (below_floor, "o", "#ff7f00"),
    ):
        y, x = np.nonzero(mask)
        if len(x):
            style = (
                {"facecolors": "none", "edgecolors": colour}
                if marker == "o"
                else {"c": colour}
            )
            axes[1].scatter(x, y, s=marker_size, marker=marker, linewidths=1.2, **style)

    colourbar = fig.colorbar(
        image, ax=axes, label="tokens (log scale)", shrink=0.9, aspect=40
    )
    floor_values = sorted({b.floor for b in blocks if b.floor > 0})
    # the floor(s) and min_tokens as lines on the colour scale
    marks = {value: f"floor {value}" for value in floor_values}
    if report.min_tokens > 1:
        marks.setdefault(report.min_tokens, f"min_tokens {report.min_tokens}")
    marks = {v: text for v, text in marks.items() if v <= norm.vmax}
    if marks:
        colourbar.add_lines(list(marks), colors=["#ff7f00"] * len(marks), linewidths=2)
        for value, text in marks.items():
            colourbar.ax.text(
                -0.2,
                value,
                text,
                transform=colourbar.ax.get_yaxis_transform(),
                ha="right",
                va="center",
                fontsize=7,
                color="#d95f02",
            )

    legend = [
        Patch(facecolor="#d9d9d9", label="0 tokens"),
        Line2D(
            [],
            [],
            marker="x",
            color="#e41a1c",
            linestyle="none",
            label=f"RTN fallback ({int(rtn.sum())})",
        ),
        Line2D(
            [],
            [],
            marker="X",
            color="#e41a1c",
            linestyle="none",
            label=f"< min_tokens {report.min_tokens} ({int(starved.sum())})",
        ),
    ]
    if floor_values:
        legend.append(
            Line2D(
                [],
                [],
                marker="o",
                markerfacecolor="none",
                color="#ff7f00",
                linestyle="none",
                label=f"< floor ({int(below_floor.sum())})",
            )
        )
    fig.legend(
        handles=legend,
        loc="outside lower left",
        ncol=len(legend),
        fontsize=8,
        frameon=False,
    )
    modes = ", ".join(sorted({b.mode for b in blocks}))
    classes = ", ".join(sorted({b.block_class for b in blocks}))
    fig.suptitle(
        f"Tokens per expert, {report.describe_pass(pass_index)}\n"
        f"{rows} {classes} block(s) x {width} experts; mode {modes}; "
        f"floor {span(b.floor for b in blocks)}; min_tokens {report.min_tokens}",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
