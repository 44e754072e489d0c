"""A weighted calibrating forward's cost in ATen operators (each about one kernel
launch on a GPU, and one trip through PyTorch's dispatcher): at real widths a
layer of 128-384 experts is launch-bound, so its time follows this count
(issue 22, "a faster layer"). Counted on the CPU, where it is the same."""

import collections

import pytest
import torch
from llmcompressor.core import State
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from torch.utils._python_dispatch import TorchDispatchMode

from llmcompressor_moe_plugins import SharedHessianGPTQModifier, upstream
from llmcompressor_moe_plugins.calibration import grouped_experts
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.defaults import DEFAULT_FLOOR, DEFAULT_MODE

from .helpers import calibration_module
from .modules.test_glm4_moe import linearized_block

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = 32


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def calibrating_forward_operators(
    ours: bool, propagating: bool = False, experts: int = EXPERTS
) -> collections.Counter:
    """Operators of the second calibrating forward (the first also makes the
    block's one-time decisions) of a GLM4-MoE block with linearized experts:
    ours, the default mode under the shared-Hessian GPTQ modifier (the floor
    gives every expert tokens); or upstream's block under GPTQ, routed. With
    ``propagating``, the forward after those two with llmcompressor's hooks off."""
    torch.manual_seed(0)
    block = linearized_block(n_routed_experts=experts)
    module, modifier_class = block, GPTQModifier
    if ours:
        module = calibration_module(
            CalibrationGlm4MoeMoE,
            block,
            block.config,
            DEFAULT_MODE,
            floor=DEFAULT_FLOOR,
        )
        modifier_class = SharedHessianGPTQModifier
    state = State(model=torch.nn.ModuleDict({"mlp": module}))
    modifier = modifier_class(targets=["Linear"], scheme="W4A16", ignore=["re:.*gate$"])
    x = torch.randn(256, 128)
    try:
        modifier.initialize(state)
        modifier.on_calibration_start(state, None)
        with torch.no_grad():
            module(x)
            with OperatorCount() as count:
                module(x)
            if propagating:
                with HooksMixin.disable_hooks():
                    module(x)  # the first propagating forward also checks
                    with OperatorCount() as count:
                        module(x)
    finally:
        upstream.end_run()
    if ours:
        _, calibrated = module.dispatcher.counts()
        assert min(calibrated) > 0  # every expert ran: the count is per expert
    return count.ops


def test_the_default_forward_costs_few_operators_per_expert():
    ours = calibrating_forward_operators(ours=True)
    upstream_routed = calibrating_forward_operators(ours=False)
    per_expert = sum(ours.values()) / EXPERTS
    upstream_per_expert = sum(upstream_routed.values()) / EXPERTS
    detail = f"{per_expert:.1f} vs upstream {upstream_per_expert:.1f}: {ours}"
    # 22.0 on torch 2.13 (36.1 before the per-forward gathers and totals);
    # upstream's routed block with GPTQ's hooks: 50.3
    assert per_expert <= 23, detail
    assert per_expert <= 0.45 * upstream_per_expert, detail


# operators that only make views: no kernel on a GPU
VIEWS = {"aten.slice", "aten.t", "aten.view", "aten.detach", "aten.unsqueeze"}
VIEWS |= {"aten._unsafe_view", "aten.split", "aten.split_with_sizes", "aten.alias"}


@pytest.mark.parametrize("propagating", [False, True])
def test_grouped_gemms_cost_few_kernels_per_expert(propagating, monkeypatch):
    """On a GPU the default runs the experts as grouped GEMMs: what is left per
    expert is the calibrating forward's two Hessian sums (a weighting and an
    ``addmm_`` each), and nothing in a propagating forward. Counted as the growth
    from 16 to 32 experts; the CPU's grouped GEMM stands in for the GPU's (one
    operator either way)."""

    def per_expert() -> float:
        counts = [
            calibrating_forward_operators(True, propagating, experts)
            for experts in (16, 32)
        ]
        kernels = [sum(n for op, n in c.items() if op not in VIEWS) for c in counts]
        return (kernels[1] - kernels[0]) / 16, counts[1]

    loop, _ = per_expert()
    monkeypatch.setattr(grouped_experts, "device_runs_grouped_gemms", lambda *_: True)
    try:
        grouped, count = per_expert()
    finally:
        grouped_experts.drop_stack()
    detail = f"{grouped:.2f} per expert vs the loop's {loop:.2f}: {count}"
    assert count["aten._grouped_mm"] == 2, detail
    # the loop: 12.2 (calibrating), 8.4 (propagating); grouped: 3.75 and 0
    assert grouped <= (4.5 if not propagating else 0.5), detail
