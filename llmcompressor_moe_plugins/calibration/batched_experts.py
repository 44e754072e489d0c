"""All-expert calibration forwards computed from the expert weights, for a consumer
that takes each expert's ``down_proj`` input directly (``SharedHessianGPTQModifier``).

Calling E experts as modules costs, per expert, a token gather, three Linear calls
with their hooks, an ``index_add_`` and a device sync; on a GPU that overhead, not
the arithmetic, is most of an all-expert forward. Here every expert costs a few
kernels per token chunk and no sync. ``gate_proj``/``up_proj`` inputs are the
block's input, which the consumer observes on the block itself.

The path applies only where it is exact for the statistics: the experts are gated
MLPs ``down(act(gate(x)) * up(x))`` (checked numerically against the expert's own
forward once per block) and nobody but the consumer listens on their Linears. The
block's output then combines the same expert outputs with the real routing weights;
it equals the per-expert path up to floating-point rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from .. import upstream
from ..upstream.moe import linearized_gate_activation

__all__ = [
    "ExpertInputConsumer",
    "GatedMLP",
    "gated_mlp",
    "matches_module",
    "silent_linear",
    "forward_from_weights",
]

# relative error above which a guessed activation is taken to be wrong; rounding of
# differently shaped matmuls stays orders of magnitude below it
_LAYOUT_TOLERANCE = 1e-2
_LAYOUT_PROBE_TOKENS = 8


class ExpertInputConsumer(Protocol):
    def accepts(self, linears: Sequence[torch.nn.Module]) -> bool:
        """True if nothing but the consumer observes these Linears, so they may be
        bypassed (an activation observer or another modifier's hook would miss
        the tokens)."""

    def consume(self, down_proj: torch.nn.Linear, inputs: torch.Tensor) -> None:
        """Observe ``inputs`` [tokens, intermediate] as one call of ``down_proj``."""


class GatedMLP(NamedTuple):
    gate_proj: torch.nn.Linear
    up_proj: torch.nn.Linear
    down_proj: torch.nn.Linear
    activate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def intermediate(self, tokens: torch.Tensor) -> torch.Tensor:
        gate = F.linear(tokens, self.gate_proj.weight, self.gate_proj.bias)
        up = F.linear(tokens, self.up_proj.weight, self.up_proj.bias)
        return self.activate(gate, up)

    def output(self, intermediate: torch.Tensor) -> torch.Tensor:
        return F.linear(intermediate, self.down_proj.weight, self.down_proj.bias)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(tokens))

    @property
    def linears(self) -> tuple[torch.nn.Linear, ...]:
        return self.gate_proj, self.up_proj, self.down_proj


def gated_mlp(
    expert: torch.nn.Module,
    default_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GatedMLP | None:
    """The expert as a gated MLP, or None if it does not look like one. The
    activation is llmcompressor's (linearized experts), else the
    expert's ``act_fn`` (transformers' MLPs), else ``default_activation``."""
    linears = [getattr(expert, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(linear, torch.nn.Linear) for linear in linears):
        return None
    apply_gate = linearized_gate_activation(expert)
    act_fn = getattr(expert, "act_fn", None)
    if apply_gate is not None:

        def activate(gate, up):
            return apply_gate(torch.cat([gate, up], dim=-1))

    elif callable(act_fn) or callable(default_activation):
        act = act_fn if callable(act_fn) else default_activation

        def activate(gate, up):
            return act(gate) * up

    else:
        return None
    return GatedMLP(*linears, activate)


def matches_module(
    mlp: GatedMLP, expert: torch.nn.Module, tokens: torch.Tensor, exact: bool = False
) -> bool:
    """Whether ``mlp`` computes what ``expert`` does on a few real tokens: bit for
    bit with ``exact``, else within rounding. llmcompressor's hooks are off for the
    reference call, so no observer sees the probe."""
    probe = tokens[:_LAYOUT_PROBE_TOKENS]
    with upstream.quiet_reference_call(), torch.no_grad():
        reference = expert(probe)
        ours = mlp(probe)
    if ours.shape != reference.shape or ours.dtype != reference.dtype:
        return False
    if exact:
        return torch.equal(ours, reference)
    error = (ours.float() - reference.float()).norm()
    return bool(error <= _LAYOUT_TOLERANCE * reference.float().norm().clamp_min(1e-12))


def silent_linear(linear: torch.nn.Module, device: torch.device) -> bool:
    """True if calling ``linear`` now is exactly ``F.linear`` with its weights and
    bypassing it hides nothing: quantization off, weights on ``device``, and every
    hook on it one of llmcompressor's while they are all disabled."""
    if upstream.hooks_enabled() or linear.weight.device != device:
        return False
    if upstream.global_hooks_attached():
        return False
    kept = upstream.kept_enabled_hook_ids()
    for hooks in upstream.module_hooks(linear):
        for key, hook in hooks.items():
            if key in kept or not upstream.is_llmcompressor_hook(hook):
                return False
    quantizing = getattr(linear, "quantization_scheme", None) is not None and getattr(
        linear, "quantization_enabled", True
    )
    return not quantizing


def forward_from_weights(
    mlps: Sequence[GatedMLP],
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    chunk: int,
    consumer: ExpertInputConsumer,
) -> torch.Tensor:
    """Every expert on every token, ``chunk`` tokens at a time; each expert's
    ``down_proj`` input goes to ``consumer`` and its output is weighted by
    ``routing_weights`` [tokens, experts] (zero where not routed).

    :return: the combined routed output [tokens, hidden], in the input's dtype
    """
    combined = torch.zeros(
        hidden_states.shape, dtype=torch.float32, device=hidden_states.device
    )
    with torch.no_grad():
        for start in range(0, hidden_states.shape[0], chunk):
            tokens = hidden_states[start : start + chunk]
            weights = routing_weights[start : start + chunk]
            for index, mlp in enumerate(mlps):
                intermediate = mlp.intermediate(tokens)
                consumer.consume(mlp.down_proj, intermediate)
                output = mlp.output(intermediate)
                combined[start : start + chunk].addcmul_(
                    output, weights[:, index, None]
                )
    return combined.to(hidden_states.dtype)
