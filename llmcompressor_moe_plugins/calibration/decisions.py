"""One-time decisions about one MoE block, in one place.

Some things about a block are decided once and then hold for the whole run: whether
its experts computed from their weights match the expert modules (within rounding,
and bit for bit), whether its router's output ranks the experts it chose first
(usable affinities), how wide its experts are (chunk sizes). Each is

- never decided on an empty batch: a forward without tokens leaves it open and the
  next forward with tokens decides (an empty probe would match anything, and a
  router agreement over zero tokens is NaN);
- decided the same on every rank: the first time a decision is asked for, every
  rank contributes its local votes to one all-reduce (``distributed``), and the
  ranks that had tokens decide together. Every rank asks at the same point (the
  block's first forward that needs it: same model, same recipe), so the collective
  lines up; a later ask, only possible when no rank had tokens the first time, is
  answered from this rank's own tokens (a collective there could wait for a rank
  that has no further batch);
- cached here, on the block's dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .. import distributed

__all__ = ["BlockDecisions", "EXPERTS_MATCH", "ROUTER_SCORES", "EXPERT_WIDTH"]

EXPERTS_MATCH = "experts computed from their weights match the modules"
ROUTER_SCORES = "router scores rank the chosen experts first"
EXPERT_WIDTH = "summed Linear widths of one expert"

T = TypeVar("T")


class BlockDecisions:
    """The one-time decisions of the block named ``block_name``."""

    def __init__(self, block_name: str):
        self.block_name = block_name
        self._values: dict[str, Any] = {}
        self._asked: set[str] = set()

    def known(self, key: str) -> Any | None:
        """The decision, or None while it is open."""
        return self._values.get(key)

    def decide(
        self,
        key: str,
        num_tokens: int,
        votes: Callable[[], Sequence[float]],
        rule: Callable[[int, list[float]], T],
    ) -> T | None:
        """``rule(ranks, summed)`` over the ranks that had tokens: ``votes()``
        (this rank's numbers, computed only when this batch has tokens) summed
        over those ranks. None (open) when no rank had tokens."""
        if key in self._values:
            return self._values[key]
        local = [float(v) for v in votes()] if num_tokens else None
        first = key not in self._asked
        self._asked.add(key)
        if first and distributed.world()[1] > 1:
            # an empty rank still sends zeros of the same length
            counts = torch.zeros(1 + _VOTE_WIDTHS[key], dtype=torch.float64)
            if local is not None:
                counts[0] = 1
                counts[1:] = torch.tensor(local, dtype=torch.float64)
            counts = distributed.all_reduce_counts(counts)
            ranks, summed = int(counts[0]), counts[1:].tolist()
        else:
            ranks, summed = (1, local) if local is not None else (0, None)
        if not ranks:
            return None
        value = rule(ranks, summed)
        self._values[key] = value
        return value

    def remember(self, key: str, compute: Callable[[], T]) -> T:
        """A value that depends on the weights only (same on every rank)."""
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]


# how many numbers each collective decision sums
_VOTE_WIDTHS = {EXPERTS_MATCH: 2, ROUTER_SCORES: 2}
