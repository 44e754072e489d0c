"""Where a oneshot run's time goes (``real_shapes.py --profile``): wall time of a few
phases, each timed around its function with the device synchronized on entry and
exit, so GPU work is charged to the phase that queued it. Inclusive: a phase
nested in another (GPTQ solves inside compression) is also in its parent's time;
a phase re-entered inside itself counts once. The synchronizations slow a run
slightly, so compare profiled runs with profiled runs.

With ``count_ops`` each phase also counts the ATen operators it dispatches (each is
about one kernel launch on a GPU, and one trip through PyTorch's dispatcher): a
machine-independent measure of the per-call overhead that dominates a launch-bound
layer, which a CPU can check. Counting slows the run; its times are not timings."""

from __future__ import annotations

import functools
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PhaseTimers", "ORDER", "TOP_LEVEL"]

# the phases in reading order ("  of which" ones belong to the line above them)
ORDER = (
    "dense layer forwards, calibrating",
    "MoE layer forwards, calibrating",
    "  of which upstream's MoE block",
    "  of which the dispatcher",
    "  of which weighted Hessian sums",
    "dense layer forwards, other",
    "MoE layer forwards, other",
    "compression",
    "  of which GPTQ solves",
    "  of which shrinkage mixes",
    "  of which budget replays",
)
TOP_LEVEL = tuple(p for p in ORDER if not p.startswith(" "))


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active (nested counters
    each see an operator once)."""

    def __init__(self, ops: Counter) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class PhaseTimers:
    def __init__(self, count_ops: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.count_ops = count_ops
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self._active: set[str] = set()
        self._undo: list = []

    def wrap(self, owner, attribute: str, phase, when=None) -> None:
        """Time ``owner.attribute`` as ``phase`` (a name, or a function of the
        call's first argument giving one), only in calls where ``when()``."""
        original = getattr(owner, attribute)
        name_of = phase if callable(phase) else lambda _: phase

        @functools.wraps(original)
        def timed(*args, **kwargs):
            phase = name_of(args[0] if args else None)
            if phase in self._active or (when is not None and not when()):
                return original(*args, **kwargs)
            self._active.add(phase)
            _sync()
            start = time.perf_counter()
            try:
                if self.count_ops:
                    with _OpCounter(self.ops[phase]):
                        return original(*args, **kwargs)
                return original(*args, **kwargs)
            finally:
                _sync()
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1
                self._active.discard(phase)

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    def install(self, model) -> None:
        """The phases of one oneshot run of ``model`` (ours or upstream)."""
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.gptq import base as gptq_base
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        from llmcompressor_moe_plugins import SharedHessianGPTQModifier
        from llmcompressor_moe_plugins.calibration.dispatch import ExpertDispatcher
        from llmcompressor_moe_plugins.statistics import (
            expert_budget,
            shrinkage,
            stacked_gptq,
        )

        def calibrating() -> bool:
            return not HooksMixin._HOOKS_DISABLED

        def propagating() -> bool:
            return HooksMixin._HOOKS_DISABLED

        # classes, not instances: offloading re-binds each module's forward
        layers = list(model.model.layers)
        moe = {id(layer) for layer in layers if hasattr(layer.mlp, "experts")}
        moe_classes = {type(layer.mlp) for layer in layers if id(layer) in moe}
        for cls in {type(layer) for layer in layers}:
            for name, when in (("calibrating", calibrating), ("other", propagating)):

                def phase(layer, name=name):
                    kind = "MoE" if id(layer) in moe else "dense"
                    return f"{kind} layer forwards, {name}"

                self.wrap(cls, "forward", phase, when)
        # upstream's blocks (ours replace them with calibration modules, whose
        # expert work is the dispatcher's)
        for cls in moe_classes:
            self.wrap(cls, "forward", "  of which upstream's MoE block", calibrating)
        self.wrap(
            ExpertDispatcher, "__call__", "  of which the dispatcher", calibrating
        )
        self.wrap(
            SharedHessianGPTQModifier,
            "consume_weighted",
            "  of which weighted Hessian sums",
        )
        for owner in (GPTQModifier, SharedHessianGPTQModifier):
            self.wrap(owner, "compress_modules", "compression")
        for owner in (gptq_base, stacked_gptq):
            self.wrap(owner, "quantize_weight", "  of which GPTQ solves")
        self.wrap(shrinkage.Shrinkage, "apply", "  of which shrinkage mixes")
        self.wrap(expert_budget.ExpertRecord, "replay", "  of which budget replays")

    def uninstall(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)
        self._undo.clear()

    def report(self) -> dict[str, list]:
        """phase -> [seconds, calls] or, counting operators, [seconds, calls,
        operators, the five most frequent as [name, count]]"""
        report = {}
        for phase, seconds in self.seconds.items():
            row = [round(seconds, 3), self.calls[phase]]
            if self.count_ops:
                ops = self.ops[phase]
                row += [sum(ops.values()), [list(x) for x in ops.most_common(5)]]
            report[phase] = row
        return report


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
