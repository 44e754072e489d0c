"""The generic path: any MoE block whose experts llmcompressor linearizes.

transformers' MoE blocks call their experts as ``self.experts(hidden_states,
top_k_index, top_k_weights)``; llmcompressor 0.14 turns those fused experts into a
``LinearExperts2D`` (one ``gate_proj``/``up_proj``/``down_proj`` per expert) for
about 54 families. The generic path replaces only that experts container, inside an
untouched block: the block's own forward routes, adds shared experts and scales,
and the routing arrives as the call's arguments, observed rather than re-derived.
Keyed on the experts, not on the block's class name; a block with a registered
calibration module (GLM4, the textbook layer, a third party's) is not touched here.

Affinities for the modes that rank tokens come from the router's own output,
observed with a forward hook on the block's router (``gate`` or ``router``):

1. the first floating tensor of shape [tokens, experts] in the router's output;
2. sigmoid of it where the router or the block has a score correction bias
   (``e_score_correction_bias``, ``expert_bias``: DeepSeek-V3, GLM, dots1,
   MiniMax-M2, LFM2) or the config says ``scoring_func: sigmoid``; softmax over
   experts otherwise; unchanged where it already is a probability per expert
   (rows of non-negative values summing to 1). The bias itself is left out: it
   only balances load when choosing, and the rarely chosen experts it holds back
   are the ones that need tokens most;
3. checked once (``decisions.py``: on the block's first calibrating forward with
   tokens, over the tokens of every rank): for at least half of the tokens, the
   expert the affinity ranks first must be one the router chose (inverted or
   unrelated scores give about 0 or k/E).

A router whose output gives no such tensor, or whose scores fail the check, gets
no affinities: the modes that rank tokens (``top_k``, ``min_tokens``,
``affinity``) refuse with a message naming the block, and floor top-ups are drawn
uniformly at random (seeded), said once in the log.
"""

from __future__ import annotations

from typing import Any

import torch
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from loguru import logger

from ..base import MoECalibrationModule, Routing
from ..decisions import ROUTER_SCORES, BlockDecisions

__all__ = [
    "CalibrationExperts",
    "ROUTER_NAMES",
    "find_router",
    "is_generic_experts",
    "require_linearized",
    "RouterScores",
]

ROUTER_NAMES = ("gate", "router")
# score correction biases of sigmoid-scored routers, on the router or the block
_CORRECTION_BIASES = ("e_score_correction_bias", "expert_bias")
# share of tokens whose top-affinity expert must be routed for scores to count
_MIN_TOP1_AGREEMENT = 0.5
_PROBABILITY_TOLERANCE = 1e-3


def is_generic_experts(module: torch.nn.Module) -> bool:
    """Experts the generic path can dispatch: llmcompressor's linearized experts
    called as ``(hidden, top_k_index, top_k_weights)``. Subclasses with a forward
    of their own (Llama4's takes pre-scaled tokens, no routing) are not."""
    return (
        isinstance(module, LinearExperts2D)
        and not isinstance(module, CalibrationExperts)
        and type(module).forward is LinearExperts2D.forward
    )


def require_linearized(block: torch.nn.Module) -> None:
    experts = getattr(block, "experts", None)
    if not isinstance(experts, torch.nn.ModuleList) or not hasattr(
        experts, "num_experts"
    ):
        raise ValueError(
            f"{type(block).__name__}'s experts are {type(experts).__name__}, not "
            "linearized per-expert Linears. Call "
            "llmcompressor.modeling.moe.linearize.linearize_moe(model) first "
            "(oneshot and moe_calibration_context do this for you)."
        )


def find_router(block: torch.nn.Module) -> torch.nn.Module | None:
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, torch.nn.Module) and not is_generic_experts(router):
            return router
    return None


class RouterScores:
    """Observes a router's output and turns it into affinities [tokens, experts]."""

    def __init__(
        self,
        block_name: str,
        router: torch.nn.Module,
        config: Any,
        block: torch.nn.Module | None = None,
    ):
        self.block_name = block_name
        self.sigmoid = any(
            hasattr(owner, bias)
            for owner in (router, block)
            for bias in _CORRECTION_BIASES
        ) or (getattr(config, "scoring_func", None) == "sigmoid")
        self._output: Any = None
        self._handle = router.register_forward_hook(self._observe)

    def _observe(self, _module, _args, output) -> None:
        self._output = output

    def remove(self) -> None:
        self._handle.remove()
        self._output = None

    def take(self, num_tokens: int, num_experts: int) -> torch.Tensor | None:
        """The raw [tokens, experts] scores of the router's latest call, if its
        output has them; consumed so a later call cannot reuse them."""
        output, self._output = self._output, None
        candidates = output if isinstance(output, tuple | list) else (output,)
        for tensor in candidates:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point()
                and tensor.shape[-1] == num_experts
                and tensor.numel() == num_tokens * num_experts
            ):
                return tensor.reshape(num_tokens, num_experts)
        return None

    def affinity(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.float()
        if self.sigmoid:
            return raw.sigmoid()
        if (raw >= 0).all() and torch.allclose(
            raw.sum(dim=-1), torch.ones(()), atol=_PROBABILITY_TOLERANCE
        ):
            return raw
        return raw.softmax(dim=-1)

    def verify(
        self, affinity: torch.Tensor, routed: torch.Tensor, decisions: BlockDecisions
    ) -> bool | None:
        """Whether the scores rank a chosen expert first for at least half of the
        tokens (of every rank); decided once, on a batch with tokens; None while
        no batch had any."""

        def votes() -> tuple[float, float]:
            top = affinity.argmax(dim=-1, keepdim=True)
            return float(routed.gather(1, top).sum()), float(routed.shape[0])

        def rule(_ranks: int, summed: list[float]) -> bool:
            agreement = summed[0] / summed[1]
            if agreement < _MIN_TOP1_AGREEMENT:
                logger.warning(
                    f"{self.block_name}: the router's output does not rank the "
                    f"experts it chose first ({agreement:.0%} of tokens, need "
                    f"{_MIN_TOP1_AGREEMENT:.0%}); its scores are not used as "
                    "affinities (modes that rank tokens refuse, floor top-ups are "
                    "drawn at random)"
                )
            return agreement >= _MIN_TOP1_AGREEMENT

        return decisions.decide(ROUTER_SCORES, routed.shape[0], votes, rule)


class CalibrationExperts(MoECalibrationModule, torch.nn.ModuleList):
    """Stands in for a block's ``LinearExperts2D``: same children under the same
    names (``experts.N.gate_proj``, ...), same call signature, outputs bit for bit
    those of ``LinearExperts2D.forward``."""

    def __init__(
        self,
        original: LinearExperts2D,
        config: Any,
        calibrate_all_experts: bool = True,
        *,
        router: torch.nn.Module | None = None,
        block: torch.nn.Module | None = None,
        block_name: str = "",
    ):
        super().__init__(original, config, calibrate_all_experts)
        self.num_experts = original.num_experts
        self.extend(original[i] for i in range(self.num_experts))
        if isinstance(getattr(original, "act_fn", None), torch.nn.Module):
            self.act_fn = original.act_fn
        self.scores = (
            RouterScores(block_name, router, config, block)
            if router is not None
            else None
        )

    @classmethod
    def writes_own_forward(cls) -> bool:
        return False

    def expert_modules(self) -> list[torch.nn.Module]:
        return [self[i] for i in range(self.num_experts)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        scores = None
        if self.scores is not None:
            decisions = self.ensure_dispatcher().decisions
            raw = self.scores.take(hidden_states.shape[0], self.num_experts)
            if raw is not None and decisions.known(ROUTER_SCORES) is not False:
                scores = self._checked_affinity(raw, top_k_index, decisions)
        return self.dispatch(hidden_states, Routing(top_k_index, top_k_weights, scores))

    def _checked_affinity(
        self, raw: torch.Tensor, top_k_index: torch.Tensor, decisions: BlockDecisions
    ):
        router_scores = self.scores

        def affinity() -> torch.Tensor | None:
            values = router_scores.affinity(raw)
            routed = torch.zeros_like(values, dtype=torch.bool).scatter_(
                1, top_k_index, True
            )
            # open (no tokens anywhere yet): the empty values select nothing
            usable = router_scores.verify(values, routed, decisions)
            return None if usable is False else values

        return affinity

    def restore(self, original: torch.nn.Module) -> torch.nn.Module:
        if self.scores is not None:
            self.scores.remove()
        return original
