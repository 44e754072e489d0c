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
  straight from the weights;
- combining the outputs with the real routing weights, in the order
  ``LinearExperts2D.forward`` (or the block's own loop) uses, so outputs are
  bit-identical to the original block's.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from loguru import logger

from .. import distributed, upstream
from .batched_experts import (
    ExpertInputConsumer,
    GatedMLP,
    forward_from_weights,
    gated_mlp,
    matches_module,
    silent_linear,
)
from .modes import AllExpertsMode, CalibrationMode, WeightedMode, apply_floor

__all__ = [
    "AUTO_CHUNK",
    "Routing",
    "RouterScoresUnavailable",
    "ExpertDispatcher",
    "block_seed",
]

AUTO_CHUNK = "auto"
# Floor for the automatic chunk size, so a forward where every expert gets a handful
# of tokens does not degrade into one expert call per token.
_MIN_AUTO_CHUNK = 32


NOT_GATED_MLPS = (
    "computes its experts from their weights, but they are not gated MLPs "
    "(gate_proj/up_proj/down_proj)"
)


class RouterScoresUnavailable(ValueError):
    """A mode needs per-token affinities that this block's router does not give."""


@dataclass
class Routing:
    """What the router decided for a flat batch of tokens.

    :param indices: long [tokens, k], the experts each token is sent to
    :param weights: [tokens, k], their routing weights as the block applies them
    :param scores: builds float [tokens, experts], the router's affinity of each
        token for each expert (higher = preferred), from the router's own output;
        None (or a builder returning None) where the router gives none
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: Callable[[], torch.Tensor | None] | None = None


# seeds of different runs (seed) and blocks (name) stay apart; each rank of a
# torchrun calibration adds its rank times a prime, so ranks, which calibrate on
# different tokens, draw different numbers (a run is reproducible for a given
# world size: same data partition, same seeds)
BLOCK_SEED_RUN_STRIDE = 1_000_003
BLOCK_SEED_RANK_STRIDE = 7919


def block_seed(seed: int, block_name: str, rank: int = 0) -> int:
    """A block's own seed: ``seed * BLOCK_SEED_RUN_STRIDE + crc32(block_name) +
    rank * BLOCK_SEED_RANK_STRIDE`` (mod 2**63): stable across runs and processes
    (not ``hash()``), and different for every data-parallel rank."""
    return (
        seed * BLOCK_SEED_RUN_STRIDE
        + zlib.crc32(block_name.encode())
        + rank * BLOCK_SEED_RANK_STRIDE
    ) % 2**63


class ExpertDispatcher:
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
        self._expert_width: int | None = None
        self._gated_mlp_list: list[GatedMLP] | None = None
        self._gated_mlps_are_close: bool | None = None
        self._gated_mlps_are_exact: bool | None = None
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

    # -- the forward ----------------------------------------------------------

    def __call__(self, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts' combined output for ``hidden_states`` [tokens, hidden]."""
        indices, weights = routing.indices, routing.weights
        num_tokens, num_experts = hidden_states.shape[0], self.num_experts
        with torch.no_grad():
            routed = torch.zeros(
                num_tokens, num_experts, dtype=torch.bool, device=indices.device
            ).scatter_(1, indices, True)
            by_slot = self.order == "slot"
            positions, counts = group_by_expert(
                indices.t() if by_slot else indices, num_experts
            )
        calibrating = upstream.hooks_enabled()
        selected = self._select(routed, routing) if calibrating else None
        busiest = max(counts)

        if calibrating:
            combined = self._forward_from_weights(
                hidden_states, routed, indices, weights, busiest
            )
            if combined is not None:
                return combined

        weighted = self._weighted_consumer(hidden_states) if calibrating else None
        if calibrating and weighted is None:
            self._log_once("calls", "calibrating forwards call each expert module")
        extras = extra_token_indices(routed, selected)
        combined = torch.zeros_like(hidden_states)
        experts = self._callable_experts(hidden_states, calibrating)
        token_weights = (
            self._token_weights(routed, indices, weights)
            if weighted is not None
            else None
        )
        top_k = indices.shape[1]
        for expert_index in range(num_experts):
            position = positions[expert_index]
            if by_slot:
                slot, tokens = position // num_tokens, position % num_tokens
            else:
                tokens, slot = position // top_k, position % top_k
            if weighted is not None:
                output = self._run_weighted(
                    expert_index,
                    weighted,
                    hidden_states,
                    tokens,
                    extras[expert_index],
                    token_weights,
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
            weighted_output = output * weights[tokens, slot, None]
            combined.index_add_(0, tokens, weighted_output.to(combined.dtype))
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
        if self._expert_width is None:
            self._expert_width = sum(
                m.out_features
                for m in self.experts[0].modules()
                if isinstance(m, torch.nn.Linear)
            )
        tokens, hidden = hidden_states.shape[0], hidden_states.shape[-1]
        per_call_token = hidden + 2 * max(self._expert_width, hidden)
        allowance = (tokens * 2 * hidden) // (4 * per_call_token)
        return max(busiest + allowance, _MIN_AUTO_CHUNK)

    # -- routing-weighted statistics ------------------------------------------

    def _weighted_consumer(self, hidden_states: torch.Tensor):
        """The consumer of routing-weighted statistics, or None where the mode is
        not weighted or nobody accumulates weighted Hessians (then the mode's
        token choice is calibrated unweighted, as for AWQ or range observers)."""
        consumer = self.consumer
        if not isinstance(self.mode, WeightedMode) or not hasattr(
            consumer, "consume_weighted"
        ):
            return None
        mlps = self.gated_mlps()
        if mlps is None:
            return self.weighting_unavailable(NOT_GATED_MLPS)
        if self._gated_mlps_are_close is None:
            close = all(
                matches_module(mlp, expert, hidden_states)
                for mlp, expert in zip(mlps, self.experts, strict=True)
            )
            # decided on each rank's own probe tokens: raise on all or none
            self._gated_mlps_are_close = not distributed.any_rank(not close)
            self._gated_mlps_are_exact = self._gated_mlps_are_close and all(
                matches_module(mlp, expert, hidden_states, exact=True)
                for mlp, expert in zip(mlps, self.experts, strict=True)
            )
        if not self._gated_mlps_are_close:
            return self.weighting_unavailable(
                "computes its experts from their weights, and that does not "
                "reproduce the experts' own forward (an activation this plugin "
                "does not know)",
                mlps,
                error=RuntimeError,
            )
        self._log_once("weighted", "routing-weighted statistics from the weights")
        return consumer

    def weighting_unavailable(
        self,
        why: str,
        mlps: list[GatedMLP] | None = None,
        error: type[Exception] = ValueError,
    ) -> None:
        """This block's experts cannot be weighted (``why``): stop if the user
        chose the weighted mode; else hand the experts back to the consumer's
        per-Linear statistics (before any expert runs: this is the block's first
        forward, or calibration start) and calibrate the mode's token choice
        unweighted, said once."""
        if self.weighting_required:
            raise error(
                f"MoE block {self.name}: mode {self.mode.spec()!r} {why}. Use "
                "another mode for this block (block_modes)."
            )
        if mlps is not None and hasattr(self.consumer, "release_weighted"):
            self.consumer.release_weighted(mlps)
        self.consumer = None
        if "unweighted" not in self._paths_logged:
            self._paths_logged.add("unweighted")
            logger.warning(
                f"MoE block {self.name}: the default mode {self.mode.spec()!r} "
                f"{why}; calibrating its tokens unweighted (choose a mode to "
                "silence this)"
            )
        return None

    def _token_weights(
        self, routed: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        routing_weights = dense_routing_weights(routed, indices, weights)
        return self.mode.token_weights(routing_weights, routed)

    def _run_weighted(
        self,
        expert_index: int,
        consumer,
        hidden_states: torch.Tensor,
        routed_tokens: torch.Tensor,
        extra_tokens: torch.Tensor | None,
        token_weights: torch.Tensor,
        busiest: int,
    ) -> torch.Tensor | None:
        """Weighted statistics of the expert's routed and extra tokens go to the
        consumer; the routed output comes from the same intermediate where that
        is bit for bit the module call and nothing else observes the expert,
        else from the module (whose other observers then see the token choice)."""
        mlp = self.gated_mlps()[expert_index]
        pieces = [t for t in (routed_tokens, extra_tokens) if t is not None]
        pieces = [t for t in pieces if t.numel()]
        if not pieces:
            return None
        with torch.no_grad():
            rows = [hidden_states[t] for t in pieces]
            intermediates = [mlp.intermediate(r) for r in rows]
            consumer.consume_weighted(
                mlp,
                torch.cat(rows),
                torch.cat(intermediates),
                token_weights[torch.cat(pieces), expert_index],
            )
        bypass = self._gated_mlps_are_exact and consumer.accepts(mlp.linears)
        if not bypass:
            return self._run_expert(
                self.experts[expert_index],
                hidden_states,
                routed_tokens,
                extra_tokens,
                busiest,
            )
        if not routed_tokens.numel():
            return None
        return mlp.output(intermediates[0])

    # -- weight-computed paths ------------------------------------------------

    def gated_mlps(self) -> list[GatedMLP] | None:
        """The experts as gated MLPs computed from their weights, or None where
        they are not all such."""
        # built once: the experts (and so their Linears) never change here
        if self._gated_mlp_list is None:
            mlps = [gated_mlp(e, self.default_activation) for e in self.experts]
            self._gated_mlp_list = mlps if mlps and all(mlps) else []
        return self._gated_mlp_list or None

    def _forward_from_weights(
        self,
        hidden_states: torch.Tensor,
        routed: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        busiest: int,
    ) -> torch.Tensor | None:
        """All tokens through all experts from their weights, ``down_proj`` inputs
        handed to the consumer; None where that does not apply (then the caller
        runs the per-expert calls). Outputs equal the per-expert path up to
        rounding; the sequential pipeline discards calibration outputs."""
        consumer = self.consumer
        if (
            consumer is None
            or self._gated_mlps_are_close is False
            or not isinstance(self.mode, AllExpertsMode)
        ):
            return None
        mlps = self.gated_mlps()
        if mlps is None:
            self._log_once("calls", "experts are not plain gated MLPs")
            return None
        if not consumer.accepts([linear for mlp in mlps for linear in mlp.linears]):
            self._log_once("calls", "another observer listens on the expert Linears")
            return None
        if self._gated_mlps_are_close is None:
            self._gated_mlps_are_close = all(
                matches_module(mlp, expert, hidden_states)
                for mlp, expert in zip(mlps, self.experts, strict=True)
            )
            if not self._gated_mlps_are_close:
                self._log_once(
                    "calls", "computing experts from weights did not match them"
                )
                return None
        self._log_once("weights", "all-expert statistics computed from the weights")
        routing_weights = dense_routing_weights(routed, indices, weights)
        chunk = self._chunk_length(hidden_states, busiest)
        return forward_from_weights(
            mlps, hidden_states, routing_weights, chunk, consumer
        )

    def _callable_experts(
        self, hidden_states: torch.Tensor, calibrating: bool
    ) -> Sequence[Callable]:
        """Each expert's arithmetic straight from its weights where that is bit
        for bit the module call and nothing listens (propagation and search
        forwards), skipping per-call wrapper overhead; else the expert modules."""
        if calibrating or self._gated_mlps_are_exact is False:
            return self.experts
        mlps = self.gated_mlps()
        if mlps is None or not all(
            silent_linear(linear, hidden_states.device)
            for mlp in mlps
            for linear in mlp.linears
        ):
            return self.experts
        if self._gated_mlps_are_exact is None:
            self._gated_mlps_are_exact = all(
                matches_module(mlp, expert, hidden_states, exact=True)
                for mlp, expert in zip(mlps, self.experts, strict=True)
            )
            if not self._gated_mlps_are_exact:
                self._log_once(
                    "exact",
                    "unobserved forwards call the expert modules "
                    "(their weights alone do not reproduce them bit for bit)",
                )
        return mlps if self._gated_mlps_are_exact else self.experts

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._paths_logged:
            self._paths_logged.add(key)
            logger.debug(f"{self.name}: {message}")


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
