"""GPTQ with one Hessian per distinct input instead of one per Linear.

In all-expert calibration every routed expert's input projections (``gate_proj``,
``up_proj``) see every token of the block's input, and so do the shared experts':
their GPTQ Hessians are all ``2 X^T X`` of the same ``X``. Upstream accumulates and
stores one per Linear (2E+2 matrices of hidden x hidden per layer). This modifier
accumulates one per MoE block from the block's input and quantizes those Linears
against it, stacked by rows, so the Hessian is also factorized once per chunk of
experts instead of once per Linear. Everything else (``down_proj``, attention,
blocks in routed or sampled modes) takes GPTQ's normal path.

Blocks in a weighted mode (``weighted:P``, see ``modes.WeightedMode``) get
routing-weighted Hessians, accumulated here: each expert's ``gate_proj`` and
``up_proj`` share one Hessian ``2 sum_t w_t x_t x_t^T`` of the expert's own
tokens, and ``down_proj`` gets its own from the same forward. Only this modifier
knows the weights, so those Linears skip GPTQ's per-Linear hooks. Each expert's
Hessians are shrunk toward the block's all-token statistics by how few effective
tokens it saw (``shrinkage``).

With ``batched_expert_statistics`` (default on), all-mode blocks compute every
expert from its weights and hand each ``down_proj`` input straight here (see
``batched_experts``): no per-expert call overhead, where nothing else observes the
expert Linears. A layer whose weighted statistics exceed ``statistics_budget_gib``
is rebuilt in groups of experts at compression (``expert_budget``). Recipes name it
like GPTQ (``SharedHessianGPTQModifier: {targets: [Linear], scheme: W4A16}``).
"""

from __future__ import annotations

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.utils import getattr_chain
from llmcompressor.core import Event, State
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.helpers import (
    accumulate_hessian,
)
from loguru import logger
from pydantic import Field, PrivateAttr

from .. import upstream
from ..calibration.base import MoECalibrationModule
from ..calibration.batched_experts import GatedMLP
from ..calibration.modes import WeightedMode
from ..calibration.routing import NOT_GATED_MLPS
from ..upstream import gptq, module_hooks
from .budgeted_statistics import ExpertBudget
from .shared_reduction import compress_shared_hessians
from .shrinkage import Shrinkage, target_bytes
from .stacked_gptq import compress_stacked_groups, row_stackable

__all__ = ["SharedHessianGPTQModifier", "with_shared_hessian_gptq"]


class SharedHessianGPTQModifier(GPTQModifier):
    """
    :param rows_per_call: most weight rows quantized in one GPTQ call for a shared
        Hessian (bounds the working memory of stacked experts)
    :param batched_expert_statistics: let all-mode blocks compute their experts from
        the weights and pass ``down_proj`` inputs here instead of calling each
        expert (same statistics, far fewer kernel launches; block outputs during
        calibration equal up to rounding instead of bit for bit)
    :param statistics_budget_gib: most GiB of a layer's weighted per-expert
        Hessians held at once, per process under torchrun (``expert_budget``;
        unset: automatic)
    """

    rows_per_call: int = Field(default=16384, ge=1)
    batched_expert_statistics: bool = True
    statistics_budget_gib: float | None = Field(default=None, gt=0)

    # group (an MoE block, or in a weighted mode an expert's gate_proj) -> the
    # Linears that share one Hessian
    _shared_members: dict[torch.nn.Module, list[torch.nn.Module]] = PrivateAttr(
        default_factory=dict
    )
    _member_of: dict[torch.nn.Module, torch.nn.Module] = PrivateAttr(
        default_factory=dict
    )
    _shared_hessians: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(
        default_factory=dict
    )
    _shared_num_samples: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(
        default_factory=dict
    )
    # weighted groups' consume_weighted calls, GPTQ's sample count for them
    _weighted_calls: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    # weighted modes: every Linear whose statistics only consume_weighted accumulates
    _weighted_members: set[torch.nn.Module] = PrivateAttr(default_factory=set)
    _dispatchers: list = PrivateAttr(default_factory=list)
    # down_proj -> Hessian and sample count from batched all-expert forwards
    _consumed_hessians: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(
        default_factory=dict
    )
    _consumed_num_samples: dict[torch.nn.Module, int] = PrivateAttr(
        default_factory=dict
    )
    _budget: ExpertBudget = PrivateAttr(default_factory=ExpertBudget)
    _shrinkage: Shrinkage = PrivateAttr(default_factory=Shrinkage)

    def on_initialize(self, state: State, **kwargs) -> bool:
        upstream.begin_run()
        return super().on_initialize(state, **kwargs)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        # GPTQ's own target map (set in on_initialize), narrowed as its hooks are
        targeted = {
            module
            for module in gptq.module_names(self)
            if getattr_chain(module, "quantization_scheme.weights", None) is not None
        }
        weighted_blocks = 0
        for block in state.model.modules():
            if not isinstance(block, MoECalibrationModule):
                continue
            if isinstance(block.calibration_mode, WeightedMode):
                weighted_blocks += self._take_weighted_block(block, targeted)
                continue
            members = [m for m in block.shared_input_linears() if m in targeted]
            if len(members) < 2:
                continue
            self._shared_members[block] = members
            for member in members:
                self._member_of[member] = block
            self.register_hook(block, self._accumulate_block_input, "forward")
            if self.batched_expert_statistics:
                self._consume_for(block.dispatcher)
        if weighted_blocks:
            logger.info(
                f"Routing-weighted Hessians for the experts of {weighted_blocks} MoE "
                "block(s)"
            )
        shared = len(self._member_of)
        if not shared:
            if not weighted_blocks:
                logger.warning(
                    "SharedHessianGPTQModifier: no MoE block calibrates in 'all' "
                    "mode, so no Linears share inputs and this runs as plain GPTQ. "
                    "Set MoECalibrationModifier mode: all (before this modifier) to "
                    "share."
                )
            return
        logger.info(
            f"Shared Hessians: {shared} Linears in {len(set(self._member_of.values()))}"
            " MoE block(s) share one Hessian per block"
        )

    def _take_weighted_block(self, block: MoECalibrationModule, targeted) -> bool:
        # modules with their own expert loop never run weighted modes
        # (LinearObserver refuses them), so this is the plugin's dispatcher
        dispatcher = block.dispatcher
        mlps = dispatcher.gated_mlps()
        if mlps is None:  # stops a chosen mode; the default goes on unweighted
            dispatcher.weighting_unavailable(NOT_GATED_MLPS)
            return False
        for mlp in mlps:
            inputs = [m for m in (mlp.gate_proj, mlp.up_proj) if m in targeted]
            if inputs:
                self._shared_members[mlp.gate_proj] = inputs
            self._weighted_members.update(inputs)
            if mlp.down_proj in targeted:
                self._weighted_members.add(mlp.down_proj)
        strength = block.calibration_mode.shrink
        reserved = target_bytes(mlps, strength)
        self._budget.add_block(self, dispatcher.name, mlps, reserved)
        self._shrinkage.add_block(dispatcher, mlps, strength)
        self._consume_for(dispatcher)
        return True

    @property
    def shrinkage_shares(self) -> dict[str, float]:
        """Per expert Linear solved in a weighted mode, the all-token statistics'
        share in its Hessian (``shrinkage``)."""
        return dict(self._shrinkage.shares)

    def release_weighted(self, mlps: list[GatedMLP]) -> None:
        """The dispatcher cannot weight these experts (the default mode on experts
        it cannot compute): GPTQ's own per-Linear hooks take them, unweighted."""
        for mlp in mlps:
            self._shared_members.pop(mlp.gate_proj, None)
            self._weighted_members.difference_update(
                (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            )

    def _consume_for(self, dispatcher) -> None:
        dispatcher.consumer = self
        self._dispatchers.append(dispatcher)

    def calibrate_module(self, module, args, _output):
        if module in self._member_of or module in self._weighted_members:
            return  # accumulated here, once per group or with routing weights
        super().calibrate_module(module, args, _output)

    # -- ExpertInputConsumer (batched all-expert forwards) -------------------------

    def accepts(self, linears) -> bool:
        if upstream.global_hooks_attached():
            return False
        return all(self._observed_only_by_us(linear) for linear in linears)

    def _observed_only_by_us(self, linear: torch.nn.Module) -> bool:
        pre_hooks, hooks = module_hooks(linear)
        if pre_hooks or any(
            getattr(hook, "__wrapped__", None) != self.calibrate_module
            for hook in hooks.values()
        ):
            return False
        if "forward" in vars(linear):
            # compressed-tensors' QDQ forward is plain F.linear only while
            # quantization is disabled (as GPTQ does during calibration); any other
            # wrapper might do something the weights alone do not show
            return getattr(linear, "quantization_scheme", None) is not None and (
                getattr(linear, "quantization_enabled", True) is False
            )
        return True

    def consume(self, down_proj, inputs) -> None:
        if (
            down_proj not in gptq.module_names(self)
            or getattr_chain(down_proj, "quantization_scheme.weights", None) is None
        ):
            return  # not quantized by GPTQ: nothing to observe
        self._consume_rows(down_proj, inputs)

    def _consume_rows(self, down_proj, rows, weights=None) -> None:
        # what accumulate_hessian adds for one 2-D call: 2 X^T X, one sample
        hessian = self._consumed_hessians.get(down_proj)
        if hessian is None:
            hessian = gptq.zero_hessian(rows.shape[-1], rows.device)
            self._consumed_hessians[down_proj] = hessian
            self._consumed_num_samples[down_proj] = 0
        gptq.add_rows(hessian, rows, weights)
        self._consumed_num_samples[down_proj] += 1

    def consume_weighted(
        self,
        mlp: GatedMLP,
        tokens: torch.Tensor,
        intermediate: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """One expert's calibration tokens [n, hidden], its ``down_proj`` inputs
        [n, intermediate] and each token's weight [n]: adds ``2 sum w x x^T`` to
        the expert's input Hessian and to its ``down_proj`` Hessian."""
        group = mlp.gate_proj
        if group in self._shared_members:
            if group not in self._shared_hessians:
                self._shared_hessians[group] = gptq.zero_hessian(
                    tokens.shape[-1], tokens.device
                )
                self._weighted_calls[group] = 0
            gptq.add_rows(self._shared_hessians[group], tokens, weights)
            self._weighted_calls[group] += 1  # a count on the host: no kernel
        if mlp.down_proj in self._weighted_members:
            self._consume_rows(mlp.down_proj, intermediate, weights)

    def observe_block_input(
        self, dispatcher, hidden_states: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """A weighted block's whole input of one calibrating forward, and each
        token's weight for each expert [tokens, experts] (zero where the expert is
        not calibrated on it)."""
        self._shrinkage.observe(dispatcher, hidden_states, weights)

    def weighted_in_one_pass(self, mlp, hidden_states) -> bool:
        """Whether this block's weighted statistics are summed as its forwards run
        (then they may come from any path), not recorded for a budget's groups."""
        return self._budget.one_pass(mlp, hidden_states)

    def record_weighted(self, mlp, hidden_states, index, routed, weights) -> bool:
        """Keep what rebuilds these statistics if the layer is planned in groups."""
        return self._budget.record(self, mlp, hidden_states, index, routed, weights)

    def _merge_consumed_statistics(self) -> None:
        hessians, num_samples = gptq.statistics(self)
        for module in list(self._consumed_hessians):
            hessian = self._consumed_hessians.pop(module)
            count = self._consumed_num_samples.pop(module)
            if module in num_samples:  # also called as a module: add both
                hessians[module] += hessian
                num_samples[module] += count
            else:
                hessians[module] = hessian
                num_samples[module] = torch.tensor(float(count), device=hessian.device)

    def _accumulate_block_input(self, block, args, _output):
        representative = self._shared_members[block][0]
        if block not in self._shared_hessians:
            hessian = gptq.module_zero_hessian(representative)
            self._shared_hessians[block] = hessian
            self._shared_num_samples[block] = torch.zeros((), device=hessian.device)
        accumulate_hessian(
            args[0],
            representative,
            self._shared_hessians[block],
            self._shared_num_samples[block],
        )

    def compress_modules(self):
        # what has statistics now first (a split layer's attention and shared
        # experts too, while none of its groups is held), then the groups
        self._compress_pending()
        for room in self._budget.rebuild_groups(self):  # layers over the budget
            self._compress_pending(room)
        self._shrinkage.end_pass()

    def _compress_pending(self, solve_room: int | None = None):
        """Compress what has statistics; GPTQ's batches hold at most ``solve_room``
        bytes of workspace where a budgeted group leaves only that."""
        for group, calls in self._weighted_calls.items():
            device = self._shared_hessians[group].device
            self._shared_num_samples[group] = torch.tensor(float(calls), device=device)
        self._weighted_calls.clear()
        with disable_offloading():
            self._shrinkage.apply(self, gptq.module_names(self), due=self._budget.due)
        self._merge_consumed_statistics()
        if is_distributed():
            # one reduction per shared Hessian onto an owning rank, not one per
            # member Linear; the rest takes upstream's (aligned) distributed path
            compress_shared_hessians(self, solve_room)
        else:
            self._compress_shared_hessians_here(solve_room)
        with gptq.batches_within(self, solve_room):
            super().compress_modules()

    def _compress_shared_hessians_here(self, solve_room: int | None) -> None:
        """One process: stack the shared Hessians' members and solve them; the
        members that cannot be stacked go to GPTQ's own statistics."""
        hessians, counts = gptq.statistics(self)
        stacked = []
        for group in list(self._shared_hessians):
            hessian = self._shared_hessians.pop(group)
            num_samples = self._shared_num_samples.pop(group)
            members = self._shared_members[group]
            if not row_stackable(members):
                # normal path; members share the Hessian object (prepare_batch
                # divides into a new tensor)
                for member in members:
                    hessians[member] = hessian
                    counts[member] = num_samples
                continue
            stacked.append((members, hessian / num_samples))
        compress_stacked_groups(self, stacked, solve_room)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._shared_hessians:
            raise ValueError(
                f"Failed to compress the shared-Hessian Linears of "
                f"{len(self._shared_hessians)} MoE block(s)"
            )
        for dispatcher in self._dispatchers:
            dispatcher.consumer = None
        self._dispatchers.clear()
        self._shared_members.clear()
        self._member_of.clear()
        self._weighted_members.clear()
        self._budget = ExpertBudget()
        self._shrinkage = Shrinkage(shares=self._shrinkage.shares)
        finalized = super().on_finalize(state, **kwargs)
        upstream.end_run_outside_oneshot()
        return finalized


def with_shared_hessian_gptq(modifiers: list) -> list:
    """``modifiers`` with every plain ``GPTQModifier`` replaced by a
    ``SharedHessianGPTQModifier`` of the same fields (weighted modes need it)."""
    return [
        SharedHessianGPTQModifier(**m.model_dump(exclude_unset=True))
        if type(m) is GPTQModifier
        else m
        for m in modifiers
    ]


ModifierFactory.register("SharedHessianGPTQModifier", SharedHessianGPTQModifier)
