"""llmcompressor's MoE modeling internals: oneshot's all-experts flag, and the gate
activation of its linearized experts."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["calibrate_all_experts_flag", "linearized_gate_activation"]


def calibrate_all_experts_flag() -> bool:
    """oneshot's ``moe_calibrate_all_experts`` while its calibration runs."""
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

    return bool(get_calibrate_all_experts_flag())


def linearized_gate_activation(
    expert: torch.nn.Module,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A linearized expert's ``act(gate) * up`` of ``cat([gate, up], -1)``
    (llmcompressor's ``LinearExpert._apply_gate``), or None for other experts."""
    apply_gate = getattr(expert, "_apply_gate", None)
    return apply_gate if callable(apply_gate) else None
