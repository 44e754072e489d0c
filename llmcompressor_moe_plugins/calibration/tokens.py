"""Token bookkeeping shared by the dispatcher's paths: which positions belong to
which expert, which tokens are extra (calibrated but not routed), and the routing
weights as a dense [tokens, experts] matrix. One device sync per forward, not one
per expert."""

from __future__ import annotations

import torch

__all__ = ["dense_routing_weights", "group_by_expert", "extra_token_indices"]


def dense_routing_weights(
    routed: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """float32 [tokens, experts]: each token's routing weight for each expert,
    zero where it is not routed."""
    return torch.zeros(
        routed.shape, device=routed.device, dtype=torch.float32
    ).scatter_(1, indices, weights.float())


def group_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Positions in ``expert_ids`` (flattened row-major) grouped by expert id,
    ascending within each group, as ``torch.where(expert_ids == e)`` lists them,
    and the group sizes: one device sync for all experts, not one per expert."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return list(order.split(counts)), counts


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
