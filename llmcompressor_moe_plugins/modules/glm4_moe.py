"""Calibration module for GLM4-MoE (transformers ``Glm4MoeMoE``: GLM-4.5, 4.5-Air,
4.6, 4.7).

Mirrors ``Glm4MoeMoE.forward`` with linearized experts (llmcompressor's
``LinearExperts2D``): router -> experts -> ``+ shared_experts(residual)``. The
block's own router is called (sigmoid scores, ``e_score_correction_bias`` for choice
only, group-limited top-k, ``norm_topk_prob``, ``routed_scaling_factor``), never
re-derived. What differs: experts with no routed tokens are not called, and the
mode adds calibration tokens. Routed outputs come from one call per expert on its
routed tokens, in the original's order, so the output is bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base import AUTO_CHUNK, MoECalibrationModule

__all__ = ["CalibrationGlm4MoeMoE"]


class CalibrationGlm4MoeMoE(MoECalibrationModule):
    def __init__(
        self,
        original: torch.nn.Module,
        config: Any,
        calibrate_all_experts: bool = True,
        *,
        mode=None,
        chunk_size: int | str = AUTO_CHUNK,
    ):
        super().__init__(
            original, config, calibrate_all_experts, mode=mode, chunk_size=chunk_size
        )
        experts = original.experts
        if not hasattr(experts, "num_experts") or not isinstance(
            experts, torch.nn.ModuleList
        ):
            raise ValueError(
                f"Glm4MoeMoE experts are {type(experts).__name__}, not linearized "
                "per-expert Linears. Call "
                "llmcompressor.modeling.moe.linearize.linearize_moe(model) first "
                "(oneshot and moe_calibration_context do this for you)."
            )
        self.config = config
        self.gate = original.gate
        self.experts = experts
        self.shared_experts = original.shared_experts
        self.num_experts = experts.num_experts

    def shared_input_linears(self) -> list[torch.nn.Module]:
        # the shared experts see the whole block input in every forward
        linears = super().shared_input_linears()
        if linears:
            linears += self.input_projections(self.shared_experts)
        return linears

    def _route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.gate(hidden_states)
        if len(routing) == 3:  # transformers 5: (logits, weights, indices)
            _, topk_weights, topk_indices = routing
        else:  # transformers 4.x: (indices, weights)
            topk_indices, topk_weights = routing
        return topk_indices, topk_weights

    def _affinity(self, flat_hidden: torch.Tensor) -> torch.Tensor:
        # what the router ranks experts by: sigmoid score plus the correction bias
        logits = torch.nn.functional.linear(
            flat_hidden.float(), self.gate.weight.float()
        )
        return logits.sigmoid() + self.gate.e_score_correction_bias.float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residuals = hidden_states
        orig_shape = hidden_states.shape
        topk_indices, topk_weights = self._route(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        num_tokens = hidden_states.shape[0]

        with torch.no_grad():
            routed = torch.zeros(
                num_tokens,
                self.num_experts,
                dtype=torch.bool,
                device=topk_indices.device,
            ).scatter_(1, topk_indices, True)  # [tokens, experts]
            # (top-k slot, token) pairs per expert, in the order the original's
            # torch.where(expert_mask[e]) lists them
            positions, counts = self.group_by_expert(topk_indices.t(), self.num_experts)
        calibrate = self.select_calibration_tokens(
            routed, lambda: self._affinity(hidden_states)
        )
        busiest = max(counts)
        final_hidden_states = self.forward_from_weights(
            hidden_states,
            lambda: torch.zeros(routed.shape, device=routed.device).scatter_(
                1, topk_indices, topk_weights.float()
            ),
            busiest,
        )
        if final_hidden_states is None:
            extras = self.extra_token_indices(routed, calibrate)
            final_hidden_states = torch.zeros_like(hidden_states)
            experts = self.callable_experts(hidden_states)
            for expert_index in range(self.num_experts):
                top_k_pos = positions[expert_index] // num_tokens
                token_indices = positions[expert_index] % num_tokens
                expert_output = self.run_expert(
                    experts[expert_index],
                    hidden_states,
                    token_indices,
                    extras[expert_index],
                    busiest,
                )
                if expert_output is None:
                    continue
                weighted = expert_output * topk_weights[token_indices, top_k_pos, None]
                final_hidden_states.index_add_(
                    0, token_indices, weighted.to(final_hidden_states.dtype)
                )

        hidden_states = final_hidden_states.view(*orig_shape)
        return hidden_states + self.shared_experts(residuals)
