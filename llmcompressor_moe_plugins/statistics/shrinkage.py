"""Shrinking an expert's routing-weighted Hessians toward its block's all-token
statistics, by how few effective tokens the expert saw against the Linear's input
width (``WeightedMode.shrink``).

Per expert and per Linear (``gate_proj``/``up_proj`` share one input width, the
hidden size; ``down_proj``'s is the expert's width ``d``)::

    H = (1 - a) * H_w / sum(w) + a * H_all / N,   a = S d / (S d + n_eff)

``H_w = 2 sum_t w_t x_t x_t^T`` over the expert's tokens (routed and floor),
``n_eff = sum(w)^2 / sum(w^2)`` their effective count (a few heavy tokens count as
few), and ``H_all / N`` the per-token all-token Hessian that ``all`` mode gives the
same Linear. An expert with no tokens is calibrated as ``all`` would; one with many
times its width as its own tokens say. ``a`` is decided when the layer is solved,
from the whole pass's counts.

The all-token statistics cost little: ``gate_proj``/``up_proj`` see the block input
itself, one ``hidden x hidden`` sum per block over every token; ``down_proj``'s are
computed at compression, one expert at a time, from the first
``DOWN_TARGET_ROWS_PER_COLUMN x d`` tokens of the pass (every token where the budget
is smaller, so small budgets get exactly ``all``'s statistics): the block keeps
those rows, not a Hessian per expert, so the per-expert memory plan is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

from ..distributed.collectives import all_reduce_counts
from ..distributed.launch import world
from ..upstream import gptq

__all__ = [
    "DOWN_TARGET_ROWS_PER_COLUMN",
    "BlockTarget",
    "WeightTotals",
    "shrinkage_weight",
    "mix_in_place",
    "target_bytes",
]

# rows kept per down_proj input column for its all-token target: enough for a
# well-conditioned estimate; small against large budgets, whose experts get little
# of the target anyway
DOWN_TARGET_ROWS_PER_COLUMN = 8
_CHUNK_ROWS = 8192
_TINY = torch.finfo(torch.float64).tiny


def kept_rows(mlps: list) -> int:
    """Block input rows kept for the ``down_proj`` targets of these experts."""
    return DOWN_TARGET_ROWS_PER_COLUMN * max(m.down_proj.weight.shape[1] for m in mlps)


def target_bytes(mlps: list, strength: float) -> int:
    """What a block's all-token statistics hold: the block input's Hessian (fp32)
    and the kept rows (in the weights' dtype, as the block input is)."""
    if strength == 0:
        return 0
    weight = mlps[0].gate_proj.weight
    hidden = weight.shape[1]
    return hidden * hidden * 4 + kept_rows(mlps) * hidden * weight.element_size()


def shrinkage_weight(
    width: int, weight_sum: float, weight_sq_sum: float, strength: float
) -> float:
    """``a = S d / (S d + n_eff)``, the all-token statistics' share."""
    effective = weight_sum**2 / max(weight_sq_sum, _TINY)
    prior = strength * width
    return prior / (prior + effective)


def mix_in_place(
    hessian: torch.Tensor, weight_sum: float, target: torch.Tensor, share: float
) -> torch.Tensor:
    """``hessian`` becomes ``(1 - a) * hessian / weight_sum + a * target``
    (``target`` per token, ``weight_sum`` > 0); returns it."""
    return hessian.div_(weight_sum).lerp_(target, share)


@dataclass
class WeightTotals:
    """A block's ``sum(w)`` and ``sum(w^2)`` per expert over the pass, [2, experts]
    on the device: a few operations per forward for all experts, not per expert."""

    sums: torch.Tensor | None = None

    def add(self, weights: torch.Tensor) -> None:
        """``weights`` [tokens, experts]: each token's weight for each expert, zero
        where the expert is not calibrated on it."""
        weights = weights.to(GPTQ_PRECISION)
        step = torch.stack([weights.sum(0), (weights * weights).sum(0)])
        self.sums = step if self.sums is None else self.sums.add_(step)


@dataclass
class BlockTarget:
    """A weighted block's all-token statistics for one pass: ``2 X^T X`` of every
    block input row, and the first rows, for ``down_proj``'s targets."""

    strength: float
    max_rows: int
    hessian: torch.Tensor | None = None
    tokens: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    kept: int = 0

    def observe(self, hidden_states: torch.Tensor) -> None:
        """One calibrating forward's block input [tokens, hidden]."""
        rows = hidden_states.detach()
        if self.hessian is None:
            self.hessian = gptq.zero_hessian(rows.shape[-1], rows.device)
        gptq.add_rows(self.hessian, rows)
        self.tokens += rows.shape[0]
        take = min(self.max_rows - self.kept, hidden_states.shape[0])
        if take > 0:
            self.rows.append(hidden_states.detach()[:take].clone())
            self.kept += take

    def down_sum(self, mlp) -> torch.Tensor:
        """``2 H^T H`` of ``mlp.down_proj``'s inputs over the kept rows."""
        hessian = gptq.zero_hessian(mlp.down_proj.weight.shape[1], self.rows[0].device)
        with torch.no_grad():
            for rows in self.rows:
                for chunk in rows.split(_CHUNK_ROWS):
                    gptq.add_rows(hessian, mlp.intermediate(chunk))
        return hessian


@dataclass
class Shrinkage:
    """``SharedHessianGPTQModifier``'s shrinkage state: a target per weighted block
    whose mode shrinks, each block's weight totals, and the shares applied (by
    Linear name, for reports and tests)."""

    targets: dict[object, BlockTarget] = field(default_factory=dict)
    # an expert's gate_proj -> (its block's dispatcher, the expert, its index)
    expert_of: dict[torch.nn.Module, tuple[object, object, int]] = field(
        default_factory=dict
    )
    totals: dict[object, WeightTotals] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)

    def add_block(self, dispatcher, mlps: list, strength: float) -> None:
        if strength == 0:
            return
        self.targets[dispatcher] = BlockTarget(strength, kept_rows(mlps))
        for index, mlp in enumerate(mlps):
            self.expert_of[mlp.gate_proj] = (dispatcher, mlp, index)

    def observe(
        self, dispatcher, hidden_states: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """One calibrating forward: the block's input [tokens, hidden] and each
        token's weight for each expert [tokens, experts], zero where the expert
        is not calibrated on it."""
        target = self.targets.get(dispatcher)
        if target is not None:
            target.observe(hidden_states)
            self.totals.setdefault(dispatcher, WeightTotals()).add(weights)

    def apply(
        self, modifier, names: dict, due: Callable[[torch.nn.Module], bool]
    ) -> None:
        """Mix every due expert's Hessians (the modifier's shared input
        Hessians and consumed ``down_proj`` Hessians) with its block's targets.

        Under torchrun each rank holds part of every sum, and the ranks' Hessians
        are summed later (``shared_reduction``, upstream's GPTQ path): so each rank
        mixes its own parts with the global totals and counts, and only rank 0
        counts a sample, which makes the sum the one-process mix. ``due`` (an
        expert's ``gate_proj``): whether its statistics are compressed now (a
        budget's group, or all)."""
        # every due expert of the blocks this pass observed that a token reached;
        # under torchrun also those without tokens on this rank (their targets'
        # parts are here too), so every rank mixes the same experts
        distributed = is_distributed()
        blocks = [d for d, target in self.targets.items() if target.tokens]
        if not distributed:
            blocks = [d for d in blocks if d in self.totals]
        totals, counts = self._global(blocks)
        sample = 1.0 if world()[0] == 0 else 0.0
        input_targets = {}  # per block: its per-token input Hessian, divided once
        for gate_proj, (dispatcher, mlp, index) in self.expert_of.items():
            if dispatcher not in totals or not due(gate_proj):
                continue
            weight_sum, weight_sq_sum = totals[dispatcher][index]
            if not weight_sum > 0:  # no token on any rank: nothing to solve
                continue
            target = self.targets[dispatcher]
            tokens, kept = counts[dispatcher]
            weights = (weight_sum, weight_sq_sum, target.strength)
            if gate_proj in modifier._shared_members:
                if dispatcher not in input_targets:
                    input_targets[dispatcher] = target.hessian / tokens
                share = self._mix(
                    modifier._shared_hessians,
                    gate_proj,
                    weights,
                    input_targets[dispatcher],
                )
                modifier._shared_num_samples[gate_proj] = torch.tensor(
                    sample, device=target.hessian.device
                )
                self.shares[names[gate_proj]] = share
            down = mlp.down_proj
            if down in modifier._weighted_members:
                share = self._mix(
                    modifier._consumed_hessians,
                    down,
                    weights,
                    target.down_sum(mlp).div_(kept),
                )
                modifier._consumed_num_samples[down] = sample
                self.shares[names[down]] = share

    @staticmethod
    def _mix(hessians: dict, linear, weights: tuple, target: torch.Tensor) -> float:
        """``hessians[linear]`` (zeros where this rank has none) mixed with the
        per-token ``target`` in place; returns the target's share."""
        weight_sum, weight_sq_sum, strength = weights
        share = shrinkage_weight(
            linear.weight.shape[1], weight_sum, weight_sq_sum, strength
        )
        own = hessians.get(linear)
        if own is None:
            own = torch.zeros_like(target)
        hessians[linear] = mix_in_place(own, weight_sum, target, share)
        return share

    def _global(self, blocks: list) -> tuple[dict, dict]:
        """Per block, each expert's (sum w, sum w^2) and the block's (tokens,
        kept rows): this rank's, or under torchrun the sums over all ranks (one
        all-reduce, one copy to the CPU)."""
        sums = [
            self.totals[d].sums.t().double()
            if d in self.totals
            else torch.zeros(d.num_experts, 2, dtype=torch.float64)
            for d in blocks
        ]
        sizes = [float(x) for t in self.targets.values() for x in (t.tokens, t.kept)]
        flat = all_reduce_counts(
            torch.cat(
                [
                    *(s.cpu().reshape(-1) for s in sums),
                    torch.tensor(sizes, dtype=torch.float64),
                ]
            )
        ).tolist()
        totals, start = {}, 0
        for dispatcher, block_sums in zip(blocks, sums, strict=True):
            end = start + block_sums.numel()
            totals[dispatcher] = list(
                zip(flat[start:end:2], flat[start + 1 : end : 2], strict=True)
            )
            start = end
        counts = {
            dispatcher: (flat[start + 2 * i], flat[start + 2 * i + 1])
            for i, dispatcher in enumerate(self.targets)
        }
        return totals, counts

    def end_pass(self) -> None:
        """Every observed block was solved: the next pass starts empty."""
        for dispatcher, target in self.targets.items():
            self.targets[dispatcher] = BlockTarget(target.strength, target.max_rows)
        self.totals.clear()
