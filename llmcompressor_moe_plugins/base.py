"""The contract every calibration module fulfils, and the expert-calling helpers
that make modes, coverage counting and chunking the same for all of them.

Mirrors the constructor contract of upstream llmcompressor 0.10/0.11's
``MoECalibrationModule`` (removed upstream in 0.12): ``Cls(original, config,
calibrate_all_experts=True)``, ``is_permanent`` and ``restore(original)``. A module
written for upstream ports by changing its import; ``@MoECalibrationModule.register``
still works as a decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin

from .batched_experts import (
    ExpertInputConsumer,
    GatedMLP,
    forward_from_weights,
    gated_mlp,
    matches_module,
    silent_linear,
)
from .modes import AllExpertsMode, CalibrationMode, RoutedMode, parse_mode

__all__ = ["MoECalibrationModule", "AUTO_CHUNK"]

AUTO_CHUNK = "auto"
# Floor for the automatic chunk size, so a forward where every expert gets a handful
# of tokens does not degrade into one expert call per token.
_MIN_AUTO_CHUNK = 32


class MoECalibrationModule(torch.nn.Module):
    """Temporarily replaces an MoE block during calibration.

    Subclasses keep the original block's submodules (router, experts, shared experts)
    as their own children under the same names, so parameter objects, module names
    (recipe targets, checkpoint keys) and offloading are untouched. Their ``forward``
    returns exactly what the original block returns; they route expert calls through
    :meth:`run_expert` so that the calibration mode, the coverage counts and chunking
    apply uniformly.
    """

    is_permanent: ClassVar[bool] = False
    # Linears inside an expert that take the expert's input as is; in all-expert
    # mode they all see the block's input, so GPTQ can share one Hessian for them.
    expert_input_projections: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj")

    def __init__(
        self,
        original: torch.nn.Module,
        config: Any,
        calibrate_all_experts: bool = True,
        *,
        mode: CalibrationMode | str | dict | None = None,
        chunk_size: int | str = AUTO_CHUNK,
    ):
        super().__init__()
        if mode is None:
            mode = AllExpertsMode() if calibrate_all_experts else RoutedMode()
        self.calibration_mode: CalibrationMode = parse_mode(mode)
        self.calibrate_all_experts = isinstance(self.calibration_mode, AllExpertsMode)
        if chunk_size != AUTO_CHUNK and (
            not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive int or {AUTO_CHUNK!r}, got "
                f"{chunk_size!r}"
            )
        self.chunk_size = chunk_size
        self._expert_width: int | None = None
        self.routed_token_counts: torch.Tensor | None = None
        self.calibrated_token_counts: torch.Tensor | None = None
        # set by a modifier that observes expert inputs itself (shared-Hessian
        # GPTQ); lets all-mode forwards skip calling the experts as modules
        self.expert_input_consumer: ExpertInputConsumer | None = None
        # the experts as gated MLPs over their weights ([] if they are not), and
        # whether a probe found them equal to the modules within rounding / exactly
        self._gated_mlp_list: list[GatedMLP] | None = None
        self._gated_mlps_are_close: bool | None = None
        self._gated_mlps_are_exact: bool | None = None

    # -- registration (upstream-compatible decorator) ----------------------------

    @classmethod
    def register(cls, name: str) -> Callable[[type], type]:
        """``@MoECalibrationModule.register("BlockClassName")``, as upstream had."""

        def decorator(module_cls: type) -> type:
            from .registry import register

            register(name, module_cls)
            return module_cls

        return decorator

    # -- lifecycle ----------------------------------------------------------------

    def restore(self, original: torch.nn.Module) -> torch.nn.Module:
        """Module to put back after calibration: the original block (which shares
        this module's children, so calibration-time quantization stays applied)."""
        return self if self.is_permanent else original

    def shared_input_linears(self) -> list[torch.nn.Module]:
        """Linears whose calibration input is exactly this block's input (every
        token of every calibrating forward): the input projections of all experts
        in ``all`` mode, none otherwise. Used by ``SharedHessianGPTQModifier``.
        Assumes ``self.experts`` holds the experts, as in every module here."""
        if not isinstance(self.calibration_mode, AllExpertsMode):
            return []
        return [
            linear
            for expert in getattr(self, "experts", [])
            for linear in self.input_projections(expert)
        ]

    @classmethod
    def input_projections(cls, mlp: torch.nn.Module) -> list[torch.nn.Linear]:
        """The Linears of ``mlp`` named in ``expert_input_projections``."""
        return [
            linear
            for name in cls.expert_input_projections
            if isinstance(linear := getattr(mlp, name, None), torch.nn.Linear)
        ]

    # -- helpers for subclasses ---------------------------------------------------

    def init_coverage(self, num_experts: int, device: torch.device | None = None):
        # kept on the routing's device: adding to them then needs no device sync
        self.routed_token_counts = torch.zeros(
            num_experts, dtype=torch.long, device=device
        )
        self.calibrated_token_counts = torch.zeros(
            num_experts, dtype=torch.long, device=device
        )

    @staticmethod
    def is_calibrating() -> bool:
        """True while quantization hooks listen. llmcompressor disables hooks for
        the sequential pipeline's propagation pass and AWQ's search forwards;
        extra expert calls there would cost time and observe nothing."""
        return not HooksMixin._HOOKS_DISABLED

    def select_calibration_tokens(
        self,
        routed: torch.Tensor,
        affinity_fn: Callable[[], torch.Tensor],
    ) -> torch.Tensor | None:
        """Per the mode, bool [tokens, experts] of tokens to calibrate on, or None
        outside calibration (then experts see routed tokens only). Also counts."""
        if not self.is_calibrating():
            return None
        if self.routed_token_counts is None:
            self.init_coverage(routed.shape[1], routed.device)
        mode = self.calibration_mode
        affinity = affinity_fn() if mode.needs_affinity else None
        selected = mode.select(routed, affinity, self.calibrated_token_counts)
        self.routed_token_counts += routed.sum(dim=0)
        self.calibrated_token_counts += selected.sum(dim=0)
        return selected

    @staticmethod
    def group_by_expert(
        expert_ids: torch.Tensor, num_experts: int
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Positions in ``expert_ids`` (flattened row-major) grouped by expert id,
        ascending within each group, as ``torch.where(expert_ids == e)`` lists them,
        and the group sizes: one device sync for all experts, not one per expert.
        Groups are only split, never reordered, so expert calls and outputs are
        those of a ``torch.where`` loop bit for bit."""
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        return list(order.split(counts)), counts

    @staticmethod
    def extra_token_indices(
        routed: torch.Tensor, calibrate: torch.Tensor | None
    ) -> list[torch.Tensor | None]:
        """Per expert, the tokens it is calibrated on but not routed (None where
        there are none). One device sync for all experts, not one per expert."""
        num_experts = routed.shape[1]
        if calibrate is None:
            return [None] * num_experts
        extra = calibrate & ~routed
        counts = extra.sum(dim=0).tolist()
        if not any(counts):
            return [None] * num_experts
        _, tokens = torch.nonzero(extra.t(), as_tuple=True)  # grouped by expert
        return [
            chunk if count else None
            for chunk, count in zip(tokens.split(counts), counts, strict=True)
        ]

    # what experts without ``act_fn`` or ``_apply_gate`` apply to ``gate_proj``'s
    # output; checked against the expert's own forward before use
    default_expert_activation: ClassVar[Callable | None] = None

    def forward_from_weights(
        self,
        hidden_states: torch.Tensor,
        routing_weights: Callable[[], torch.Tensor],
        busiest: int,
    ) -> torch.Tensor | None:
        """The experts' combined output computed from their weights, all tokens
        through all experts, with ``down_proj`` inputs handed to
        ``expert_input_consumer``; None where that path does not apply (not
        calibrating, not ``all`` mode, no consumer, experts that are not plain
        gated MLPs or that someone else observes), and the caller then runs the
        per-expert calls.

        :param routing_weights: builds float [tokens, experts], the routing
            weight of each token's chosen experts, zero elsewhere
        """
        consumer = self.expert_input_consumer
        if (
            consumer is None
            or self._gated_mlps_are_close is False
            or not isinstance(self.calibration_mode, AllExpertsMode)
            or not self.is_calibrating()
        ):
            return None
        experts, mlps = self._experts(), self._gated_mlps()
        if mlps is None:
            return None
        if not consumer.accepts([linear for mlp in mlps for linear in mlp.linears]):
            return None
        if self._gated_mlps_are_close is None:
            self._gated_mlps_are_close = matches_module(
                mlps[0], experts[0], hidden_states
            )
            if not self._gated_mlps_are_close:
                return None
        chunk = self._chunk_length(experts[0], hidden_states, busiest)
        return forward_from_weights(
            mlps, hidden_states, routing_weights(), chunk, consumer
        )

    def callable_experts(self, hidden_states: torch.Tensor) -> list:
        """What to call for routed outputs: each expert's arithmetic straight from
        its weights where that is bit for bit the module call and nothing is
        listening (propagation and search forwards, every llmcompressor hook off),
        which skips per-call wrapper overhead; else the expert modules."""
        experts = self._experts()
        if self._gated_mlps_are_exact is False or self.is_calibrating():
            return experts
        mlps = self._gated_mlps()
        if mlps is None or not all(
            silent_linear(linear, hidden_states.device)
            for mlp in mlps
            for linear in mlp.linears
        ):
            return experts
        if self._gated_mlps_are_exact is None:
            self._gated_mlps_are_exact = matches_module(
                mlps[0], experts[0], hidden_states, exact=True
            )
        return mlps if self._gated_mlps_are_exact else experts

    def _experts(self) -> list[torch.nn.Module]:
        container = getattr(self, "experts", None)
        if container is None:
            return []
        count = getattr(self, "num_experts", None) or len(container)
        return [container[i] for i in range(count)]

    def _gated_mlps(self) -> list[GatedMLP] | None:
        # built once: the experts (and so their Linears) never change here
        if self._gated_mlp_list is None:
            experts = self._experts()
            mlps = [gated_mlp(e, self.default_expert_activation) for e in experts]
            self._gated_mlp_list = mlps if experts and all(mlps) else []
        return self._gated_mlp_list or None

    def run_expert(
        self,
        expert: Callable[[torch.Tensor], torch.Tensor],
        hidden_states: torch.Tensor,
        routed_tokens: torch.Tensor,
        extra_tokens: torch.Tensor | None,
        chunk_hint: int,
    ) -> torch.Tensor | None:
        """Call ``expert`` (a module, or from :meth:`callable_experts`) on its routed
        tokens (one call, exactly as the original block does, so outputs are
        bit-identical), then on ``extra_tokens`` in
        chunks for statistics only. Never calls an expert with zero tokens: an
        empty call leaves GPTQ an all-zero Hessian and zeroes the expert.

        :return: the expert's output for ``routed_tokens``, None if there are none
        """
        routed_output = None
        if routed_tokens.numel() > 0:
            routed_output = expert(hidden_states[routed_tokens])
        if extra_tokens is not None and extra_tokens.numel() > 0:
            chunk = self._chunk_length(expert, hidden_states, chunk_hint)
            with torch.no_grad():
                for start in range(0, extra_tokens.numel(), chunk):
                    expert(hidden_states[extra_tokens[start : start + chunk]])
        return routed_output

    def _chunk_length(
        self, expert: torch.nn.Module, hidden_states: torch.Tensor, busiest: int
    ) -> int:
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
                for m in expert.modules()
                if isinstance(m, torch.nn.Linear)
            )
        tokens, hidden = hidden_states.shape[0], hidden_states.shape[-1]
        per_call_token = hidden + 2 * max(self._expert_width, hidden)
        allowance = (tokens * 2 * hidden) // (4 * per_call_token)
        return max(busiest + allowance, _MIN_AUTO_CHUNK)

    def extra_repr(self) -> str:
        return f"mode={self.calibration_mode.spec()}, chunk_size={self.chunk_size}"
