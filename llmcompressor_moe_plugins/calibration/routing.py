"""What an architecture hands the dispatcher: the router's decision for a batch
(:class:`Routing`), and the names and seeds every dispatcher shares."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO_CHUNK",
    "NOT_GATED_MLPS",
    "Routing",
    "RouterScoresUnavailable",
    "BLOCK_SEED_RANK_STRIDE",
    "block_seed",
]

AUTO_CHUNK = "auto"

NOT_GATED_MLPS = (
    "computes its experts from their weights, but they are not gated MLPs "
    "(gate_proj/up_proj/down_proj)"
)


class RouterScoresUnavailable(ValueError):
    """A mode needs per-token affinities that this block's router does not give."""


@dataclass
class Routing:
    """What the router decided for a flat batch of tokens.

    :param indices: long [tokens, k], the experts each token is sent to
    :param weights: [tokens, k], their routing weights as the block applies them
    :param scores: builds float [tokens, experts], the router's affinity of each
        token for each expert (higher = preferred), from the router's own output;
        None (or a builder returning None) where the router gives none
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: Callable[[], torch.Tensor | None] | None = None


# seeds of different runs (seed) and blocks (name) stay apart; each rank of a
# torchrun calibration adds its rank times a prime, so ranks, which calibrate on
# different tokens, draw different numbers (a run is reproducible for a given
# world size: same data partition, same seeds)
BLOCK_SEED_RUN_STRIDE = 1_000_003
BLOCK_SEED_RANK_STRIDE = 7919


def block_seed(seed: int, block_name: str, rank: int = 0) -> int:
    """A block's own seed: ``seed * BLOCK_SEED_RUN_STRIDE + crc32(block_name) +
    rank * BLOCK_SEED_RANK_STRIDE`` (mod 2**63): stable across runs and processes
    (not ``hash()``), and different for every data-parallel rank."""
    return (
        seed * BLOCK_SEED_RUN_STRIDE
        + zlib.crc32(block_name.encode())
        + rank * BLOCK_SEED_RANK_STRIDE
    ) % 2**63
