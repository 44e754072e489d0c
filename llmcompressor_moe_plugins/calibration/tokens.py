"""Token bookkeeping shared by the dispatcher's paths: which positions belong to
which expert, which tokens are extra (calibrated but not routed), and the routing
weights as a dense [tokens, experts] matrix. One device sync per forward, not one
per expert."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "dense_routing_weights",
    "sort_by_expert",
    "RoutedTokens",
    "routed_by_expert",
    "extra_token_indices",
]


def dense_routing_weights(
    routed: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """float32 [tokens, experts]: each token's routing weight for each expert,
    zero where it is not routed."""
    return torch.zeros(
        routed.shape, device=routed.device, dtype=torch.float32
    ).scatter_(1, indices, weights.float())


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, list[int]]:
    """Positions in ``expert_ids`` (flattened row-major) sorted by expert id,
    ascending within each expert, as ``torch.where(expert_ids == e)`` lists them,
    and each expert's count: one device sync for all experts, not one per expert."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


class RoutedTokens(NamedTuple):
    """Each expert's routed tokens and their routing weights, listed by (top-k
    slot, token) or by (token, slot), and their counts; ``tokens``, ``experts``
    and ``weights`` are all experts' lists, concatenated, for operations that serve
    every expert."""

    by_expert: list[torch.Tensor]
    routing_weights: list[torch.Tensor]
    counts: list[int]
    tokens: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


def routed_by_expert(
    indices: torch.Tensor, weights: torch.Tensor, by_slot: bool, num_experts: int
) -> RoutedTokens:
    """The routed tokens of every expert, in a few operations for all experts,
    not a few per expert.

    :param indices: [tokens, top_k] expert ids
    :param weights: [tokens, top_k] routing weights
    :param by_slot: list an expert's tokens by (slot, token), else (token, slot)
    """
    num_tokens, top_k = indices.shape
    expert_ids = indices.t() if by_slot else indices
    order, counts = sort_by_expert(expert_ids, num_experts)
    if by_slot:
        slot, tokens = order // num_tokens, order % num_tokens
    else:
        tokens, slot = order // top_k, order % top_k
    routing_weights = weights[tokens, slot]
    return RoutedTokens(
        list(tokens.split(counts)),
        list(routing_weights.split(counts)),
        counts,
        tokens,
        expert_ids.reshape(-1)[order],
        routing_weights,
    )


def extra_token_indices(
    routed: torch.Tensor, selected: torch.Tensor | None
) -> list[torch.Tensor | None]:
    """Per expert, the tokens it is calibrated on but not routed (None where
    there are none). One device sync for all experts, not one per expert."""
    num_experts = routed.shape[1]
    if selected is None:
        return [None] * num_experts
    extra = selected & ~routed
    counts = extra.sum(dim=0).tolist()
    if not any(counts):
        return [None] * num_experts
    _, tokens = torch.nonzero(extra.t(), as_tuple=True)  # grouped by expert
    return [
        chunk if count else None
        for chunk, count in zip(tokens.split(counts), counts, strict=True)
    ]
