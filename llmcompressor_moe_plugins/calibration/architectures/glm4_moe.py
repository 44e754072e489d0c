"""Calibration module for GLM4-MoE (transformers ``Glm4MoeMoE``: GLM-4.5, 4.5-Air,
4.6, 4.7).

Mirrors ``Glm4MoeMoE.forward``: router -> experts -> ``+ shared_experts(residual)``,
with the experts linearized by llmcompressor (``LinearExperts2D``). The block's own
router decides (sigmoid scores, ``e_score_correction_bias`` for choice only,
group-limited top-k, ``norm_topk_prob``, ``routed_scaling_factor``); nothing is
re-derived. What differs: the experts run through the dispatcher, so the mode adds
calibration tokens, no expert is called with zero tokens, and the output is still
bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base import MoECalibrationModule, Routing
from .generic import require_linearized

__all__ = ["CalibrationGlm4MoeMoE"]


class CalibrationGlm4MoeMoE(MoECalibrationModule):
    def __init__(
        self,
        original: torch.nn.Module,
        config: Any,
        calibrate_all_experts: bool = True,
    ):
        super().__init__(original, config, calibrate_all_experts)
        require_linearized(original)
        self.config = config
        self.gate = original.gate
        self.experts = original.experts
        self.shared_experts = original.shared_experts

    def route(self, hidden_states: torch.Tensor) -> Routing:
        router_logits, topk_weights, topk_indices = self.gate(hidden_states)
        # Affinity is the gating score, sigmoid(logits), without the correction
        # bias: the bias only balances load when choosing, and including it would
        # rank the rarely chosen experts, which need tokens most, lowest.
        return Routing(topk_indices, topk_weights, router_logits.sigmoid)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residuals, shape = hidden_states, hidden_states.shape
        routing = self.route(hidden_states)
        hidden_states = self.dispatch(hidden_states.view(-1, shape[-1]), routing)
        return hidden_states.view(*shape) + self.shared_experts(residuals)

    def shared_input_linears(self) -> list[torch.nn.Module]:
        # the shared experts see the whole block input in every forward
        linears = super().shared_input_linears()
        if linears:
            linears += self.input_projections(self.shared_experts)
        return linears
