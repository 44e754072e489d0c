"""``SharedHessianGPTQModifier``'s side of the per-expert statistics budget
(``expert_budget``): a plan per weighted MoE block, the record kept during its
calibration forwards where the plan has several groups, and the groups rebuilt one
at a time at compression.

Under torchrun every rank sums its own share of every expert's statistics, so each
rank needs the budget as much as one process does, and the ranks must plan alike
(GPTQ's reduction is positional): the automatic budget is the smallest over ranks,
and every rank rebuilds the same groups in the same order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from compressed_tensors.offload import disable_offloading
from loguru import logger

from .. import distributed
from ..upstream import gptq
from .expert_budget import (
    ExpertRecord,
    GiB,
    auto_budget_bytes,
    expert_statistics_bytes,
    plan_groups,
    plan_message,
)

__all__ = ["ExpertBudget"]


@dataclass
class _Block:
    name: str
    mlps: list
    per_expert: list[int]
    reserved: int = 0  # the block's all-token statistics (shrinkage)
    solve: int = 0  # one GPTQ solve of an expert's largest stack
    budget: int | None = None
    record: ExpertRecord | None = None  # None: not planned yet (automatic budget)
    device: torch.device | None = None


@dataclass
class ExpertBudget:
    blocks: dict[str, _Block] = field(default_factory=dict)
    expert_of: dict[torch.nn.Module, tuple[_Block, int]] = field(default_factory=dict)
    auto_bytes: int | None = None
    auto_decided: bool = False
    logged: set[str] = field(default_factory=set)
    # while a split block's group is compressed: the block and the group's experts
    replaying: tuple[_Block, frozenset[int]] | None = None

    def add_block(self, modifier, name: str, mlps: list, reserved: int = 0) -> None:
        """Plan the block now where the budget is set (an impossible budget stops
        before calibration), else at its first forward. ``reserved``: bytes the
        block's statistics hold besides the experts'."""
        per_expert = [
            (mlp.gate_proj in modifier._shared_members)
            * expert_statistics_bytes(mlp.gate_proj.weight.shape[1], 0)
            + (mlp.down_proj in modifier._weighted_members)
            * expert_statistics_bytes(0, mlp.down_proj.weight.shape[1])
            for mlp in mlps
        ]
        block = _Block(name, mlps, per_expert, reserved, _solve_bytes(modifier, mlps))
        self.blocks[name] = block
        for index, mlp in enumerate(mlps):
            self.expert_of[mlp.gate_proj] = (block, index)
        if modifier.statistics_budget_gib is not None:
            self._plan(block, int(modifier.statistics_budget_gib * GiB))

    def _plan(self, block: _Block, budget: int | None) -> None:
        groups = plan_groups(
            block.per_expert, budget, block.name, block.reserved, block.solve
        )
        block.budget = budget
        block.record = ExpertRecord(groups)
        message = plan_message(sum(block.per_expert), budget, len(groups))
        if message not in self.logged:  # once per run (per distinct plan)
            self.logged.add(message)
            logger.info(message)

    def one_pass(self, mlp, hidden_states) -> bool:
        """Whether the block of expert ``mlp`` accumulates its statistics as its
        forwards run (no budget, or one group), planning it at its first forward."""
        found = self.expert_of.get(mlp.gate_proj)
        return found is None or len(self._planned(found[0], hidden_states)) == 1

    def _planned(self, block: _Block, hidden_states) -> list[list[int]]:
        if block.record is None:
            if not self.auto_decided:  # one automatic budget per run
                self.auto_decided = True
                self.auto_bytes = distributed.smallest_on_any_rank(
                    auto_budget_bytes(hidden_states.device)
                )
            self._plan(block, self.auto_bytes)
        return block.record.groups

    def record(self, modifier, mlp, hidden_states, index, routed, weights) -> bool:
        found = self.expert_of.get(mlp.gate_proj)
        if found is None:
            return False
        block, expert = found
        if len(self._planned(block, hidden_states)) == 1:
            return False
        block.device = hidden_states.device
        block.record.add(expert, hidden_states, index, routed, weights)
        return True

    def due(self, gate_proj) -> bool:
        """Whether this expert's statistics are compressed now: while a split
        block's group is rebuilt, that group's experts; else the experts of blocks
        summed in one pass (a split block's wait for their group)."""
        block, expert = self.expert_of.get(gate_proj, (None, None))
        if self.replaying is not None:
            replaying, group = self.replaying
            return block is replaying and expert in group
        return block is None or block.record is None or len(block.record.groups) == 1

    def rebuild_groups(self, modifier) -> Iterator[int]:
        """For each recorded block, each group in turn: its statistics rebuilt into
        the modifier's, then yielded for compression before the next group, with
        the bytes the group leaves of the budget for GPTQ's solves."""
        for block in self.blocks.values():
            record = block.record
            # every rank forwards every layer, so every rank recorded this one
            if record is None or not record.inputs:
                continue
            for group in record.groups:
                with disable_offloading():
                    record.replay(
                        group, block.mlps, modifier.consume_weighted, block.device
                    )
                held = sum(block.per_expert[expert] for expert in group)
                self.replaying = (block, frozenset(group))
                try:
                    yield block.budget - block.reserved - held
                finally:
                    self.replaying = None
            block.record = ExpertRecord(record.groups)  # the next pass starts empty


def _solve_bytes(modifier, mlps: list) -> int:
    """GPTQ's workspace for the largest solve of one expert: gate/up stacked
    against their shared Hessian, or down_proj."""
    mlp = mlps[0]
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    block = modifier.block_size
    return max(
        gptq.solve_bytes(gate.shape[0] + up.shape[0], gate.shape[1], block),
        gptq.solve_bytes(*down.shape, block),
    )
