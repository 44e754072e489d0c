"""The dispatcher's paths through the experts' weights (``batched_experts``):
routing-weighted statistics handed to a consumer, all-expert forwards computed from
the weights, and unobserved forwards skipping the module calls. Each applies only
where the experts computed from their weights match the modules (a one-time
decision, ``decisions.py``) and nothing else observes them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from loguru import logger

from . import grouped_experts
from .batched_experts import (
    GatedMLP,
    forward_from_weights,
    gated_mlp,
    matches_module,
    silent_linear,
)
from .decisions import EXPERTS_MATCH
from .modes import AllExpertsMode, WeightedMode
from .routing import NOT_GATED_MLPS
from .tokens import RoutedTokens, dense_routing_weights

__all__ = ["WeightComputedPaths"]


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    # most experts have one piece (no extra tokens): no copy, no kernel
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class WeightComputedPaths:
    """Mixed into ``ExpertDispatcher``: uses its ``name``, ``mode``, ``experts``,
    ``consumer``, ``decisions``, ``default_activation``, ``weighting_required``,
    ``_run_expert``, ``_chunk_length`` and ``_log_once``."""

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
        match = self.experts_match(hidden_states)
        if match is None:  # no tokens yet (then nothing to weight either)
            return None
        if not match[0]:
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
        routed_weights: torch.Tensor,
        busiest: int,
    ) -> torch.Tensor | None:
        """Weighted statistics of the expert's routed and extra tokens go to the
        consumer; the routed output comes from the same intermediate where that
        is bit for bit the module call and nothing else observes the expert,
        else from the module (whose other observers then see the token choice).

        :param routed_weights: ``token_weights`` of the routed tokens"""
        mlp = self.gated_mlps()[expert_index]
        pieces = [t for t in (routed_tokens, extra_tokens) if t is not None]
        pieces = [t for t in pieces if t.numel()]
        if not pieces:
            return None
        with torch.no_grad():
            index = _joined(pieces)
            if extra_tokens is None:
                weights = routed_weights
            else:
                extra_weights = token_weights[extra_tokens, expert_index]
                weights = _joined([routed_weights, extra_weights])
            record = getattr(consumer, "record_weighted", None)
            if record is not None and record(
                mlp, hidden_states, index, routed_tokens.numel(), weights
            ):
                # the consumer rebuilds the statistics later (a memory budget):
                # only the routed output is needed now
                routed = hidden_states[routed_tokens]
                intermediates = [mlp.intermediate(routed)] if routed.numel() else []
            else:
                rows = [hidden_states[t] for t in pieces]
                intermediates = [mlp.intermediate(r) for r in rows]
                consumer.consume_weighted(
                    mlp, _joined(rows), _joined(intermediates), weights
                )
        bypass = self._exact() and consumer.accepts(mlp.linears)
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

    def experts_match(self, hidden_states: torch.Tensor) -> tuple[bool, bool] | None:
        """Whether the experts computed from their weights (:meth:`gated_mlps`)
        reproduce the expert modules: (within rounding, bit for bit), decided once
        on a batch with tokens, the same on every rank; None while open."""
        mlps = self.gated_mlps()

        def votes() -> tuple[bool, bool]:
            pairs = list(zip(mlps, self.experts, strict=True))
            close = all(matches_module(m, e, hidden_states) for m, e in pairs)
            exact = close and all(
                matches_module(m, e, hidden_states, exact=True) for m, e in pairs
            )
            return close, exact

        return self.decisions.decide(
            EXPERTS_MATCH,
            hidden_states.shape[0],
            votes,
            lambda ranks, summed: (summed[0] == ranks, summed[1] == ranks),
        )

    def _exact(self) -> bool:
        match = self.decisions.known(EXPERTS_MATCH)
        return match is not None and match[1]

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
        rounding (see the README on calibration outputs)."""
        consumer = self.consumer
        known = self.decisions.known(EXPERTS_MATCH)
        if (
            consumer is None
            or (known is not None and not known[0])
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
        match = self.experts_match(hidden_states)
        if match is None or not match[0]:  # no tokens yet, or they differ
            if match is not None:
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
        known = self.decisions.known(EXPERTS_MATCH)
        if calibrating or (known is not None and not known[1]):
            return self.experts
        mlps = self.gated_mlps()
        if mlps is None or not all(
            silent_linear(linear, hidden_states.device)
            for mlp in mlps
            for linear in mlp.linears
        ):
            return self.experts
        match = self.experts_match(hidden_states)
        if match is not None and not match[1]:
            self._log_once(
                "exact",
                "unobserved forwards call the expert modules "
                "(their weights alone do not reproduce them bit for bit)",
            )
        return mlps if match is not None and match[1] else self.experts

    # -- forwards in grouped GEMMs --------------------------------------------

    def _grouped_forward(
        self, hidden_states: torch.Tensor, routed: RoutedTokens, top_k: int
    ) -> torch.Tensor | None:
        """The combined output from one grouped GEMM per projection
        (``grouped_experts``), or None where that does not apply: the experts are
        not exactly their weights' gated MLPs with nothing listening, the device or
        dtype has no grouped GEMMs, the stack does not fit, or the block's check
        against the loop failed."""
        if self._grouped_agrees is False:
            return None
        mlps = self._callable_experts(hidden_states, calibrating=False)
        if mlps is self.experts or not grouped_experts.supported(mlps, hidden_states):
            return None
        stack = grouped_experts.stack_for(self, mlps)
        if stack is None:
            self._log_unstacked(mlps)
            return None
        return self._grouped_output(stack, hidden_states, routed, top_k)

    def _grouped_output(
        self, stack, hidden_states: torch.Tensor, routed: RoutedTokens, top_k: int
    ) -> torch.Tensor | None:
        """The grouped GEMMs' block output; on the block's first (checked) try, a
        failure of the kernels (a shape or alignment they refuse, their memory)
        leaves the block to the loop instead of stopping the run."""
        activate = self.gated_mlps()[0].activate
        try:
            return grouped_experts.grouped_forward(
                stack, activate, hidden_states, routed, top_k
            )
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if self._grouped_agrees:  # past the check: a real failure
                raise
            self._grouped_agrees = False
            grouped_experts.drop_stack()
            logger.warning(
                f"MoE block {self.name}: grouped GEMMs failed "
                f"({str(error).splitlines()[0][:200]}); its experts are called "
                "one by one"
            )
            return None

    def _statistics_stack(self, hidden_states: torch.Tensor, consumer):
        """The experts' stack for a weighted calibrating forward in grouped GEMMs,
        or None (and this block's stack freed) where that does not apply: no
        weighted consumer, experts not exactly their gated MLPs or observed by
        others, no grouped GEMMs here, statistics recorded for a budget's groups
        (then only the routed outputs are computed), or the block's check failed."""
        mlps = self.gated_mlps()
        usable = (
            consumer is not None
            and self._grouped_agrees is not False
            and self._exact()
            and hasattr(consumer, "weighted_in_one_pass")
            and grouped_experts.supported(mlps, hidden_states)
            and consumer.accepts([linear for mlp in mlps for linear in mlp.linears])
            # planned first: the automatic budget sees the memory before the stack
            and consumer.weighted_in_one_pass(mlps[0], hidden_states)
        )
        if not usable:
            grouped_experts.drop_stack(owner=self)
            return None
        stack = grouped_experts.stack_for(self, mlps)
        if stack is None:
            self._log_unstacked(mlps)
        return stack

    def _log_unstacked(self, mlps: list[GatedMLP]) -> None:
        self._log_once(
            "no-stack",
            f"stacking the experts ({grouped_experts.stack_bytes(mlps) / 2**30:.1f}"
            f" GiB) exceeds {grouped_experts.STACK_FRACTION:.0%} of the free "
            "device memory: each expert is called",
        )

    def _check_grouped(self, grouped: torch.Tensor, loop: torch.Tensor) -> None:
        """Decide once whether the grouped GEMMs give this block's loop output up to
        rounding (the loop's output is the one used meanwhile)."""
        error = (grouped.float() - loop.float()).norm() / loop.float().norm().clamp_min(
            1e-12
        )
        self._grouped_agrees = bool(error <= grouped_experts.AGREEMENT)
        if self._grouped_agrees:
            # said once per run at info (the first block), then per block at debug
            log = logger.debug if grouped_experts.stack_builds > 1 else logger.info
            log(
                f"{self.name}: the experts in one grouped GEMM per projection "
                "(relative difference from calling each expert "
                f"{float(error):.1e})"
            )
        else:
            grouped_experts.drop_stack()
            logger.warning(
                f"MoE block {self.name}: grouped GEMMs differ from calling each "
                f"expert by {float(error):.1e} (relative); its experts are called "
                "one by one"
            )
