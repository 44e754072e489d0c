"""The contract every calibration module fulfils.

A calibration module replaces an MoE block during calibration. It keeps the block's
children (router, experts, shared experts) under the same names, so parameters,
recipe targets, checkpoint keys and offloading are untouched. An architecture
supplies only its routing, :meth:`MoECalibrationModule.route`, read from the
router's own output; ``forward`` is route -> :meth:`dispatch` -> whatever the block
adds (shared experts). The dispatcher (``dispatch.py``) owns modes, the floor,
coverage, chunking, the fast paths and combining outputs.

Upstream llmcompressor 0.10/0.11's ``MoECalibrationModule`` (removed upstream in
0.12) had the constructor ``Cls(original, config, calibrate_all_experts=True)``,
``is_permanent`` and ``restore(original)``; every module here keeps that contract,
so a module written for upstream ports by changing its import. Such a module writes
its own expert loop instead of ``route``: it runs in ``routed`` or ``all`` (from
``calibrate_all_experts``), and its coverage is counted by observing its experts'
Linears. ``@MoECalibrationModule.register`` still works as a decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from .. import upstream
from .dispatch import ExpertDispatcher
from .modes import AllExpertsMode, CalibrationMode, RoutedMode
from .routing import AUTO_CHUNK, Routing

__all__ = ["MoECalibrationModule", "LinearObserver", "AUTO_CHUNK", "Routing"]


class MoECalibrationModule(torch.nn.Module):
    """Temporarily replaces an MoE block during calibration.

    Subclasses set the original block's children as their own and implement
    :meth:`route`; see ``architectures/glm4_moe.py`` for the reference.
    """

    is_permanent: ClassVar[bool] = False
    # Linears inside an expert that take the expert's input as is; in all-expert
    # mode they all see the block's input, so GPTQ can share one Hessian for them.
    expert_input_projections: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj")
    # how the original block lists an expert's tokens (see ExpertDispatcher)
    dispatch_order: ClassVar[Literal["slot", "token"]] = "slot"
    # what experts without ``act_fn`` or llmcompressor's gate apply to ``gate_proj``'s
    # output; checked against the expert's own forward before use
    default_expert_activation: ClassVar[Callable | None] = None

    def __init__(
        self,
        original: torch.nn.Module | None = None,
        config: Any = None,
        calibrate_all_experts: bool = True,
    ):
        super().__init__()
        self.calibrate_all_experts = calibrate_all_experts
        # set by configure(); plain attributes, not submodules
        self.dispatcher: ExpertDispatcher | LinearObserver | None = None

    # -- registration (upstream-compatible decorator) ----------------------------

    # classes decorated with register(), until the registry takes them (the
    # registry imports this module, not the other way round)
    _decorated: ClassVar[list[tuple[str, type]]] = []

    @classmethod
    def register(cls, name: str) -> Callable[[type], type]:
        """``@MoECalibrationModule.register("BlockClassName")``, as upstream had:
        the same as ``llmcompressor_moe_plugins.register(name, module_cls)``."""

        def decorator(module_cls: type) -> type:
            MoECalibrationModule._decorated.append((name, module_cls))
            return module_cls

        return decorator

    @staticmethod
    def take_decorated() -> list[tuple[str, type]]:
        """The ``(name, class)`` pairs decorated since the last call."""
        taken = list(MoECalibrationModule._decorated)
        MoECalibrationModule._decorated.clear()
        return taken

    # -- what an architecture supplies ---------------------------------------------

    def route(self, hidden_states: torch.Tensor) -> Routing:
        """The router's decision for ``hidden_states`` (flattened to [tokens,
        hidden] as the block's experts see them), from the router's own output."""
        raise NotImplementedError

    @classmethod
    def writes_own_forward(cls) -> bool:
        """True for modules written to upstream's contract: no :meth:`route`, an
        expert loop of their own."""
        return cls.route is MoECalibrationModule.route

    # -- set up by the context, used by forward ------------------------------------

    def expert_modules(self) -> list[torch.nn.Module]:
        """The routed experts by index (``self.experts``, without extras such as
        ``LinearExperts2D``'s ``act_fn``)."""
        container = getattr(self, "experts", None)
        if container is None:
            return []
        count = getattr(container, "num_experts", None) or len(container)
        return [container[i] for i in range(count)]

    def configure(
        self,
        name: str,
        mode: CalibrationMode,
        *,
        floor: int = 0,
        chunk_size: int | str = AUTO_CHUNK,
        seed: int = 0,
        rank: int = 0,
        weighting_required: bool = True,
    ) -> None:
        """Give this block its dispatcher (called once, after construction).
        ``weighting_required=False`` (a weighted mode the user did not choose): where
        this block's experts cannot be computed from their weights, calibrate the
        mode's token choice unweighted instead of stopping."""
        experts = self.expert_modules()
        if self.writes_own_forward():
            self.dispatcher = LinearObserver(name, self, experts, mode, floor)
            return
        self.dispatcher = ExpertDispatcher(
            name,
            experts,
            mode,
            floor=floor,
            chunk_size=chunk_size,
            seed=seed,
            rank=rank,
            order=self.dispatch_order,
            default_activation=self.default_expert_activation,
            weighting_required=weighting_required,
        )

    def ensure_dispatcher(self) -> ExpertDispatcher | LinearObserver:
        """The dispatcher; a module used on its own, as upstream's were, gets one
        running ``all`` or ``routed`` per ``calibrate_all_experts``."""
        if self.dispatcher is None:
            mode = AllExpertsMode() if self.calibrate_all_experts else RoutedMode()
            self.configure(type(self).__name__, mode)
        return self.dispatcher

    def dispatch(self, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts' combined output for flat ``hidden_states``."""
        return self.ensure_dispatcher()(hidden_states, routing)

    @property
    def calibration_mode(self) -> CalibrationMode | None:
        return self.dispatcher.mode if self.dispatcher is not None else None

    # -- lifecycle ----------------------------------------------------------------

    def restore(self, original: torch.nn.Module) -> torch.nn.Module:
        """Module to put back after calibration: the original block (which shares
        this module's children, so calibration-time quantization stays applied)."""
        return self if self.is_permanent else original

    def shared_input_linears(self) -> list[torch.nn.Module]:
        """Linears whose calibration input is exactly this block's input (every
        token of every calibrating forward): the input projections of all experts
        in ``all`` mode, none otherwise. Used by ``SharedHessianGPTQModifier``."""
        if not isinstance(self.calibration_mode, AllExpertsMode) or isinstance(
            self.dispatcher, LinearObserver
        ):
            return []
        return [
            linear
            for expert in self.expert_modules()
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

    def extra_repr(self) -> str:
        mode = self.calibration_mode
        return f"mode={mode.spec() if mode else None}"


class LinearObserver:
    """Coverage for a module that runs its own expert loop (upstream's contract):
    counts the rows each expert's first Linear is called with while calibrating.
    Such a module decides itself which tokens its experts see, so only ``routed``
    and ``all`` apply (its ``calibrate_all_experts``); ``routed`` counts are the
    calibrated counts in routed mode and are not observed in ``all`` mode."""

    def __init__(
        self,
        name: str,
        module: MoECalibrationModule,
        experts: list[torch.nn.Module],
        mode: CalibrationMode,
        floor: int,
    ):
        if not isinstance(mode, AllExpertsMode | RoutedMode) or floor:
            raise ValueError(
                f"{type(module).__name__} (block {name}) runs its own expert loop, "
                "written to upstream llmcompressor's contract, so only modes "
                f"'routed' and 'all' apply to it, not {mode.spec()!r}"
                + (f" with a floor of {floor}" if floor else "")
                + ". Set its mode in block_modes (e.g. {<BlockClass>: all}, floor "
                "0), or give the module a route() method to get every mode."
            )
        self.name = name
        self.mode = mode
        self.floor = 0
        self.num_experts = len(experts)
        self.consumer = None
        self._calibrated = [0] * self.num_experts
        self._handles = []
        for index, expert in enumerate(experts):
            first = next(
                (m for m in expert.modules() if isinstance(m, torch.nn.Linear)), None
            )
            if first is not None:
                self._handles.append(first.register_forward_pre_hook(self._hook(index)))

    def _hook(self, index: int):
        def count(_module, args):
            if upstream.hooks_enabled():
                self._calibrated[index] += (
                    args[0].reshape(-1, args[0].shape[-1]).shape[0]
                )

        return count

    def reset_counts(self) -> None:
        self._calibrated = [0] * self.num_experts

    def counts(self) -> tuple[list[int], list[int]]:
        calibrated = list(self._calibrated)
        routed = (
            calibrated if isinstance(self.mode, RoutedMode) else [0] * len(calibrated)
        )
        return routed, calibrated

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
