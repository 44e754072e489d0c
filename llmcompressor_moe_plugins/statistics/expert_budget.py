"""A memory budget for the routing-weighted per-expert statistics of one MoE layer.

In a weighted mode every expert has its own GPTQ Hessians: one hidden x hidden for
``gate_proj``/``up_proj`` and one width x width for ``down_proj``, fp32. Held for all
E experts of a layer at once that is E x (hidden² + width²) x 4 bytes: 53 GiB for a
DeepSeek-V3 layer (7168 / 2048 / 256), 79 GiB for Kimi-K2 (384 experts).

Where a layer's statistics exceed the budget, its experts are split into groups that
each fit, and the calibration forwards only *record* what rebuilds them exactly: the
block input of each forward, staged once on the CPU, and per expert its token
indices and weights. At compression the groups are rebuilt one after another on the
device by replaying the same operations in the same order (rows gathered from the
block input, ``down_proj`` inputs from the expert's weights as the forward computes
them, weighted sums added batch by batch), solved by GPTQ and freed. The Hessians
therefore equal a one-pass run's; the cost is the gate/up matmuls done twice and the
block inputs copied to the device once per group. A split layer's budget also holds
GPTQ's solves: the groups are sized to leave room for at least one, and each group's
solves are batched within what it leaves (upstream's automatic batches take 75 % of
the free memory: 9 GiB over a DeepSeek-V3 group's statistics, measured on an H200).

The budget is ``statistics_budget_gib`` or, unset, :data:`AUTO_FRACTION` of the
device's free memory at the first calibrating forward of a weighted block (the
layer's weights and activations are already there); on a CPU without a set budget
there is no limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..device_memory import allocatable_bytes

__all__ = [
    "AUTO_FRACTION",
    "BUDGET_FLAG",
    "GiB",
    "ExpertRecord",
    "auto_budget_bytes",
    "expert_statistics_bytes",
    "plan_groups",
    "plan_message",
]

GiB = 2**30
# the rest of the free memory is for GPTQ's solves (a stacked chunk of expert
# weights and the Hessian's Cholesky workspace), the block's activations and the
# caching allocator's fragmentation; the groups themselves cost little time (the
# experts' work is the same, only the block inputs go to the device once per group)
AUTO_FRACTION = 0.25
BUDGET_FLAG = "statistics_budget_gib (CLI: --statistics-budget-gib)"
_FP32 = 4


def expert_statistics_bytes(hidden: int, width: int) -> int:
    """One expert's weighted Hessians: gate/up share hidden x hidden, down_proj has
    width x width, fp32."""
    return (hidden * hidden + width * width) * _FP32


def auto_budget_bytes(device: torch.device) -> int | None:
    """:data:`AUTO_FRACTION` of what the device could still allocate (free memory
    plus what PyTorch's allocator holds unused), or None (no limit) off CUDA."""
    room = allocatable_bytes(device)
    return None if room is None else int(AUTO_FRACTION * room)


def plan_groups(
    per_expert: list[int],
    budget: int | None,
    layer: str,
    reserved: int = 0,
    solve: int = 0,
) -> list[list[int]]:
    """The layer's experts (by index) in contiguous groups whose statistics each fit
    ``budget`` bytes less ``reserved`` (statistics the layer holds besides the
    experts'); one group where they all fit or there is no budget. A split layer's
    groups also leave ``solve`` bytes (one GPTQ solve's workspace: a group's solves
    are batched within what it leaves) where the budget allows more than one expert
    a group. Raises the one-line error where a single expert's statistics exceed
    what is left."""
    experts = list(range(len(per_expert)))
    if budget is None or sum(per_expert) + reserved <= budget:
        return [experts]
    largest = max(per_expert)
    if largest + reserved > budget:
        besides = f" besides the layer's {_size(reserved)}" if reserved else ""
        raise ValueError(
            f"MoE layer {layer}: one expert's calibration statistics need "
            f"{largest} bytes ({_size(largest)}){besides}, more than the budget of "
            f"{_size(budget)}; raise {BUDGET_FLAG} to at least "
            f"{math.ceil((largest + reserved) / GiB * 1e4) / 1e4}"
        )
    per_group = max(1, (budget - reserved - solve) // largest)
    count = math.ceil(len(experts) / per_group)
    size = math.ceil(len(experts) / count)  # even groups, each within budget
    return [experts[i : i + size] for i in range(0, len(experts), size)]


def _size(size: int) -> str:
    return f"{size / GiB:.1f} GiB" if size >= GiB / 10 else f"{size / 2**20:.2f} MiB"


def plan_message(total: int, budget: int | None, groups: int) -> str:
    if groups == 1:
        limit = "no budget" if budget is None else f"budget {_size(budget)}"
        return (
            f"per-expert statistics: {_size(total)} per layer within {limit}: one pass"
        )
    return (
        f"per-expert statistics: {_size(total)} per layer > budget "
        f"{_size(budget)}: {groups} groups, rebuilt one at a time at "
        f"compression ({BUDGET_FLAG})"
    )


@dataclass
class ExpertRecord:
    """What a layer's calibration forwards leave to rebuild each expert's weighted
    statistics: the block inputs (CPU) and per expert, per forward, the token
    indices (routed first, then the floor's) and their weights (CPU)."""

    groups: list[list[int]]
    inputs: list[torch.Tensor] = field(default_factory=list)
    # expert index -> [(forward, token indices, routed count, weights)]
    tokens: dict[int, list[tuple[int, torch.Tensor, int, torch.Tensor]]] = field(
        default_factory=dict
    )
    _device_input: torch.Tensor | None = None

    def add(
        self,
        expert: int,
        hidden_states: torch.Tensor,
        index: torch.Tensor,
        routed: int,
        weights: torch.Tensor,
    ) -> None:
        if hidden_states is not self._device_input:  # a new forward: stage it once
            self._device_input = hidden_states
            self.inputs.append(hidden_states.detach().to("cpu"))
        self.tokens.setdefault(expert, []).append(
            (len(self.inputs) - 1, index.to("cpu"), routed, weights.to("cpu"))
        )

    def replay(self, group: list[int], mlps: list, consume, device) -> None:
        """``consume(mlp, rows, intermediate, weights)`` for the group's experts, in
        the forwards' order and with the forward's operations."""
        self._device_input = None
        by_forward: dict[int, list[tuple[int, torch.Tensor, int, torch.Tensor]]] = {}
        for expert in group:
            for forward, index, routed, weights in self.tokens.get(expert, []):
                by_forward.setdefault(forward, []).append(
                    (expert, index, routed, weights)
                )
        with torch.no_grad():
            for forward in sorted(by_forward):
                hidden_states = self.inputs[forward].to(device)
                for expert, index, routed, weights in by_forward[forward]:
                    index = index.to(device)
                    mlp = mlps[expert]
                    # per piece, as the forward computes them (same kernels)
                    pieces = [
                        p
                        for p in index.split([routed, len(index) - routed])
                        if p.numel()
                    ]
                    rows = [hidden_states[p] for p in pieces]
                    intermediates = [mlp.intermediate(r) for r in rows]
                    consume(
                        mlp,
                        torch.cat(rows),
                        torch.cat(intermediates),
                        weights.to(device),
                    )
                del hidden_states
