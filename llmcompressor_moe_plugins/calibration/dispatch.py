"""One dispatcher for every MoE block: the routing goes in, the combined expert
output comes out, and in between the calibration mode decides which tokens each
expert is calibrated on.

An architecture supplies only its routing (:class:`Routing`, taken from the
router's own output). The dispatcher owns everything else, the same for GLM4, the
textbook layer, the generic path and third-party modules:

- mode selection and the floor (each block with its own seeded generator);
- coverage counts (on the device; read at pass and layer boundaries);
- the no-empty-call rule and chunking of extra (statistics-only) calls;
- the weight-computed paths: all-expert calibration forwards and routing-weighted
  statistics handed to a statistics consumer, and unobserved forwards computed
  straight from the weights (on a GPU, in one grouped GEMM per projection);
- combining the outputs with the real routing weights, in the order
  ``LinearExperts2D.forward`` (or the block's own loop) uses, so outputs are
  bit-identical to the original block's (the grouped GEMMs' up to their rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from loguru import logger

from .. import upstream
from . import grouped_experts
from .batched_experts import ExpertInputConsumer, GatedMLP
from .decisions import EXPERT_WIDTH, BlockDecisions
from .from_weights import WeightComputedPaths
from .modes import CalibrationMode, apply_floor
from .routing import (
    AUTO_CHUNK,
    NOT_GATED_MLPS,
    RouterScoresUnavailable,
    Routing,
    block_seed,
)
from .tokens import extra_token_indices, routed_by_expert

__all__ = [
    "AUTO_CHUNK",
    "Routing",
    "RouterScoresUnavailable",
    "ExpertDispatcher",
    "block_seed",
    "NOT_GATED_MLPS",
]

# Floor for the automatic chunk size, so a forward where every expert gets a handful
# of tokens does not degrade into one expert call per token.
_MIN_AUTO_CHUNK = 32


class ExpertDispatcher(WeightComputedPaths):
    """Runs a block's experts for one forward, as the calibration mode says.

    :param name: the block's module path (names it in messages, seeds it)
    :param experts: the expert modules, by expert index
    :param order: ``"slot"`` lists an expert's tokens by (top-k slot, token), as
        ``LinearExperts2D`` and transformers' fused experts do; ``"token"`` by
        (token, slot), as a loop over ``torch.where(indices == e)`` does
    :param floor: every expert is calibrated on at least this many tokens per pass
        (or all there are), topped up with its highest-affinity candidates
    :param weighting_required: a weighted mode stops the run where the experts
        cannot be computed from their weights; False (the default mode, not the
        user's choice) calibrates its token choice unweighted there instead
    """

    def __init__(
        self,
        name: str,
        experts: Sequence[torch.nn.Module],
        mode: CalibrationMode,
        *,
        floor: int = 0,
        chunk_size: int | str = AUTO_CHUNK,
        seed: int = 0,
        rank: int = 0,
        order: Literal["slot", "token"] = "slot",
        default_activation: Callable | None = None,
        weighting_required: bool = True,
    ):
        if chunk_size != AUTO_CHUNK and (
            not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive int or {AUTO_CHUNK!r}, got "
                f"{chunk_size!r}"
            )
        if floor < 0:
            raise ValueError(f"floor must be at least 0, got {floor}")
        self.name = name
        self.experts = list(experts)
        self.num_experts = len(self.experts)
        self.mode = mode
        self.floor = floor
        self.chunk_size = chunk_size
        self.order = order
        self.default_activation = default_activation
        self.weighting_required = weighting_required
        self.generator = torch.Generator().manual_seed(block_seed(seed, name, rank))
        # per calibration pass; kept on the routing's device (no sync to add)
        self.routed_counts: torch.Tensor | None = None
        self.calibrated_counts: torch.Tensor | None = None
        # set by a modifier that observes expert inputs itself (shared-Hessian
        # GPTQ); lets all-mode forwards skip calling the experts as modules
        self.consumer: ExpertInputConsumer | None = None
        # one-time decisions (experts match their weights, router scores usable,
        # chunk width): on a batch with tokens, the same on every rank
        self.decisions = BlockDecisions(name)
        self._gated_mlp_list: list[GatedMLP] | None = None
        # the experts in grouped GEMMs (GPU): None until checked against the loop
        self._grouped_agrees: bool | None = None
        self._paths_logged: set[str] = set()

    # -- counts ---------------------------------------------------------------

    def reset_counts(self) -> None:
        """Start a new calibration pass."""
        self.routed_counts = self.calibrated_counts = None

    def counts(self) -> tuple[list[int], list[int]]:
        """(routed, calibrated) tokens per expert in this pass so far."""
        zeros = [0] * self.num_experts
        if self.routed_counts is None:
            return zeros, list(zeros)
        return self.routed_counts.tolist(), self.calibrated_counts.tolist()

    def remove(self) -> None:
        """At the block's restore: free what the dispatcher holds on the device."""
        grouped_experts.drop_stack(owner=self)

    # -- the forward ----------------------------------------------------------

    def __call__(self, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts' combined output for ``hidden_states`` [tokens, hidden]."""
        indices, weights = routing.indices, routing.weights
        num_tokens, num_experts = hidden_states.shape[0], self.num_experts
        with torch.no_grad():
            routed = torch.zeros(
                num_tokens, num_experts, dtype=torch.bool, device=indices.device
            ).scatter_(1, indices, True)
            routed_tokens = routed_by_expert(
                indices, weights, self.order == "slot", num_experts
            )
        calibrating = upstream.hooks_enabled()
        selected = self._select(routed, routing) if calibrating else None
        busiest = max(routed_tokens.counts)
        grouped = None
        if calibrating:  # statistics need the memory: only this block's may stay
            grouped_experts.drop_stack(unless_owner=self)
        else:
            grouped = self._grouped_forward(
                hidden_states, routed_tokens, indices.shape[1]
            )
            if grouped is not None and self._grouped_agrees:
                return grouped

        if calibrating:
            combined = self._forward_from_weights(
                hidden_states, routed, indices, weights, busiest
            )
            if combined is not None:
                return combined

        weighted = self._weighted_consumer(hidden_states) if calibrating else None
        if calibrating and weighted is None:
            self._log_once("calls", "calibrating forwards call each expert module")
        token_weights = routed_token_weights = None
        if weighted is not None:
            token_weights = self._token_weights(routed, indices, weights)
            # one gather for every expert's routed tokens
            routed_token_weights = token_weights[
                routed_tokens.tokens, routed_tokens.experts
            ].split(routed_tokens.counts)
        if weighted is not None and hasattr(weighted, "observe_block_input"):
            # all-token statistics, and every expert's weights in one call
            calibrated = routed | selected
            weighted.observe_block_input(
                self, hidden_states, torch.where(calibrated, token_weights, 0.0)
            )
        extras = extra_token_indices(routed, selected)
        if calibrating:
            stack = self._statistics_stack(hidden_states, weighted)
            if stack is not None and self._grouped_agrees:
                return grouped_experts.weighted_forward(
                    stack,
                    self.gated_mlps(),
                    hidden_states,
                    routed_tokens,
                    extras,
                    token_weights,
                    routed_token_weights,
                    weighted.consume_weighted,
                    indices.shape[1],
                )
            if stack is not None:  # checked against this forward's loop first
                grouped = self._grouped_output(
                    stack, hidden_states, routed_tokens, indices.shape[1]
                )
        combined = torch.zeros_like(hidden_states)
        experts = self._callable_experts(hidden_states, calibrating)
        for expert_index in range(num_experts):
            tokens = routed_tokens.by_expert[expert_index]
            if weighted is not None:
                output = self._run_weighted(
                    expert_index,
                    weighted,
                    hidden_states,
                    tokens,
                    extras[expert_index],
                    token_weights,
                    routed_token_weights[expert_index],
                    busiest,
                )
            else:
                output = self._run_expert(
                    experts[expert_index],
                    hidden_states,
                    tokens,
                    extras[expert_index],
                    busiest,
                )
            if output is None:
                continue
            routing_weights = routed_tokens.routing_weights[expert_index]
            weighted_output = output * routing_weights[:, None]
            combined.index_add_(0, tokens, weighted_output.to(combined.dtype))
        if grouped is not None:  # the block's first grouped forward
            self._check_grouped(grouped, combined)
        return combined

    def _select(self, routed: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.routed_counts is None:
            self.routed_counts = torch.zeros(
                self.num_experts, dtype=torch.long, device=routed.device
            )
            self.calibrated_counts = torch.zeros_like(self.routed_counts)
        mode = self.mode
        affinity = None
        if mode.needs_affinity or self.floor:
            affinity = routing.scores() if routing.scores is not None else None
            if affinity is None and mode.needs_affinity:
                raise RouterScoresUnavailable(
                    f"MoE block {self.name}: calibration mode {mode.spec()!r} ranks "
                    "tokens by router affinity, but this block's router output gives "
                    "no usable per-expert scores. Use mode 'all' or 'routed' for it "
                    "(block_modes), or register a calibration module whose route() "
                    "returns scores."
                )
            if affinity is None:
                self._log_once(
                    "floor-random",
                    "the router gives no per-expert scores; floor top-ups are "
                    "drawn uniformly at random (seeded)",
                )
        selected = mode.select(routed, affinity, self.calibrated_counts, self.generator)
        if self.floor:
            selected = apply_floor(
                selected, affinity, self.calibrated_counts, self.floor, self.generator
            )
        self.routed_counts += routed.sum(dim=0)
        self.calibrated_counts += selected.sum(dim=0)
        return selected

    def _run_expert(
        self,
        expert: Callable[[torch.Tensor], torch.Tensor],
        hidden_states: torch.Tensor,
        routed_tokens: torch.Tensor,
        extra_tokens: torch.Tensor | None,
        busiest: int,
    ) -> torch.Tensor | None:
        """One call on the routed tokens, exactly as the original block makes it
        (so outputs are bit-identical), then the extra tokens in chunks, for
        statistics only. Never an empty call: it would leave GPTQ an all-zero
        Hessian and zero the expert."""
        routed_output = None
        if routed_tokens.numel() > 0:
            routed_output = expert(hidden_states[routed_tokens])
        if extra_tokens is not None:
            chunk = self._chunk_length(hidden_states, busiest)
            with torch.no_grad():
                for start in range(0, extra_tokens.numel(), chunk):
                    expert(hidden_states[extra_tokens[start : start + chunk]])
        return routed_output

    def _chunk_length(self, hidden_states: torch.Tensor, busiest: int) -> int:
        if self.chunk_size != AUTO_CHUNK:
            return int(self.chunk_size)
        # Routed mode's peak holds the block's per-token buffers (input and output,
        # ~2 x hidden per token) plus its busiest expert call; a call costs about
        # (hidden + 2 x summed Linear widths) per token. Extra calls of this many
        # tokens keep the all-expert peak within 1.25x of routed, however many
        # experts there are, with as few calls as that allows.
        expert_width = self.decisions.remember(
            EXPERT_WIDTH,
            lambda: sum(
                m.out_features
                for m in self.experts[0].modules()
                if isinstance(m, torch.nn.Linear)
            ),
        )
        tokens, hidden = hidden_states.shape[0], hidden_states.shape[-1]
        per_call_token = hidden + 2 * max(expert_width, hidden)
        allowance = (tokens * 2 * hidden) // (4 * per_call_token)
        return max(busiest + allowance, _MIN_AUTO_CHUNK)

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._paths_logged:
            self._paths_logged.add(key)
            logger.debug(f"{self.name}: {message}")
