"""Calibration module for the textbook ``MoeLayer`` (LLMBook ``code/5.4 MoE.py``).

Mirrors :meth:`llmcompressor_moe_plugins.models.MoeLayer.forward`: top-k over the
gate logits, softmax over the k selected, experts combined by a loop over
``torch.where(selected == i)`` (hence ``dispatch_order = "token"``). Keyed on the
class name ``MoeLayer``, so a user's own copy of the book's layer is handled too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..base import MoECalibrationModule, Routing

__all__ = ["CalibrationMoeLayer"]

_REQUIRED = ("experts", "gate", "num_experts_per_tok")


class CalibrationMoeLayer(MoECalibrationModule):
    dispatch_order = "token"
    # the book's experts compute down(silu(gate(x)) * up(x)) with F.silu
    default_expert_activation = staticmethod(F.silu)

    def __init__(
        self,
        original: torch.nn.Module,
        config: Any,
        calibrate_all_experts: bool = True,
    ):
        super().__init__(original, config, calibrate_all_experts)
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

    def route(self, inputs: torch.Tensor) -> Routing:
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        # affinity: the softmax over all experts (the logits' ranking, on a scale
        # comparable across experts, as the affinity mode's ratios need)
        return Routing(
            selected_experts,
            weights,
            lambda: F.softmax(gate_logits, dim=1, dtype=torch.float),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = inputs.shape
        inputs = inputs.reshape(-1, shape[-1])
        return self.dispatch(inputs, self.route(inputs)).reshape(shape)
