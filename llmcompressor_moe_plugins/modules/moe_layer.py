"""Calibration module for the textbook ``MoeLayer`` (LLMBook ``code/5.4 MoE.py``).

Mirrors :class:`llmcompressor_moe_plugins.models.MoeLayer.forward` line for line;
what differs: expert calls go through :meth:`MoECalibrationModule.run_expert`, so
experts without routed tokens are never called with an empty batch, and the mode
decides which extra tokens each expert is calibrated on. Keyed on the class name
``MoeLayer``, so a user's own copy of the book's layer is handled too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..base import AUTO_CHUNK, MoECalibrationModule

__all__ = ["CalibrationMoeLayer"]

_REQUIRED = ("experts", "gate", "num_experts_per_tok")


class CalibrationMoeLayer(MoECalibrationModule):
    # the book's experts compute down(silu(gate(x)) * up(x)) with F.silu
    default_expert_activation = staticmethod(F.silu)

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
        missing = [attr for attr in _REQUIRED if not hasattr(original, attr)]
        if missing:
            raise ValueError(
                f"A block named {type(original).__name__!r} lacks "
                f"{', '.join(missing)}; CalibrationMoeLayer handles the textbook "
                "MoeLayer(experts, gate, num_experts_per_tok). Register a "
                "calibration module for this block under its class name instead."
            )
        self.experts = original.experts
        self.gate = original.gate
        self.num_experts_per_tok = original.num_experts_per_tok
        self.num_experts = len(self.experts)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = inputs.shape
        inputs = inputs.reshape(-1, shape[-1])
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)

        routed = torch.zeros_like(gate_logits, dtype=torch.bool)
        routed.scatter_(1, selected_experts, True)
        # affinity: the router's softmax over all experts (same ranking as the logits,
        # but comparable across experts, as the affinity mode's ratios need)
        calibrate = self.select_calibration_tokens(
            routed, lambda: F.softmax(gate_logits, dim=1, dtype=torch.float)
        )
        # (token, top-k slot) pairs per expert, as torch.where(selected == i) lists
        positions, counts = self.group_by_expert(selected_experts, self.num_experts)
        busiest = max(counts)
        results = self.forward_from_weights(
            inputs,
            lambda: torch.zeros_like(gate_logits, dtype=torch.float).scatter_(
                1, selected_experts, weights.float()
            ),
            busiest,
        )
        if results is not None:
            return results.reshape(shape)

        extras = self.extra_token_indices(routed, calibrate)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.callable_experts(inputs)):
            token_idx = positions[i] // self.num_experts_per_tok
            nth_expert = positions[i] % self.num_experts_per_tok
            output = self.run_expert(expert, inputs, token_idx, extras[i], busiest)
            if output is not None:
                results[token_idx] += weights[token_idx, nth_expert, None] * output
        return results.reshape(shape)
