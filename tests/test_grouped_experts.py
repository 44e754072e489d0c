"""Unobserved forwards in one grouped GEMM per projection (issue 22, "a faster
layer"): the loop's output up to the GEMMs' rounding, a stack of the experts that
follows their weights, is counted before it is built and never outlives
propagation.

The grouped path runs on CUDA GPUs only; here the CPU's ``F.grouped_mm`` (a loop of
GEMMs) stands in for it, on float32 blocks, where differently shaped GEMMs round
within :data:`ROUNDING` of each other."""

import pytest
import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin

from llmcompressor_moe_plugins.calibration import grouped_experts
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.calibration.tokens import routed_by_expert

from .helpers import calibration_module, relative_error
from .modules.test_glm4_moe import linearized_block

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = 16
# float32 sums of 32-128 products in another order; a wrong expert or weight is O(1)
ROUNDING = 1e-5


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """Let the CPU take the grouped path, as a CUDA GPU does."""
    monkeypatch.setattr(grouped_experts, "device_runs_grouped_gemms", lambda *_: True)
    yield
    grouped_experts.drop_stack()


@pytest.fixture
def block():
    return linearized_block(n_routed_experts=EXPERTS)


def swapped(block):
    return calibration_module(CalibrationGlm4MoeMoE, block, block.config, "routed")


def propagate(module, x):
    with torch.no_grad(), HooksMixin.disable_hooks():
        return module(x)


class LoopCalls:
    def __init__(self, monkeypatch, dispatcher):
        self.count = 0
        run = type(dispatcher)._run_expert

        def counted(*args, **kwargs):
            self.count += 1
            return run(*args, **kwargs)

        monkeypatch.setattr(type(dispatcher), "_run_expert", counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_sums_in_expert_order_bit_for_bit_as_one_index_add_per_expert(dtype, top_k):
    torch.manual_seed(0)
    tokens, experts, hidden = 37, 12, 24
    indices = torch.rand(tokens, experts).argsort(dim=1)[:, :top_k]
    weights = torch.rand(tokens, top_k)
    routed = routed_by_expert(indices, weights, True, experts)
    rows = torch.randn(tokens * top_k, hidden).to(dtype) * 100
    expected = torch.zeros(tokens, hidden, dtype=dtype)
    for piece, by_expert in zip(
        rows.split(routed.counts), routed.by_expert, strict=True
    ):
        expected.index_add_(0, by_expert, piece)
    summed = grouped_experts.sum_in_expert_order(rows, routed.tokens, tokens, top_k)
    assert torch.equal(summed, expected)


def test_propagation_takes_the_grouped_path_with_the_loops_output(
    block, grouped_on_cpu, monkeypatch
):
    x = torch.randn(3, 40, 128)
    with torch.no_grad():
        original = block(x)
    module = swapped(block)
    builds = grouped_experts.stack_builds
    first = propagate(module, x)  # checked against the loop, which it returns
    assert torch.equal(first, original)
    assert module.dispatcher._grouped_agrees is True
    loop = LoopCalls(monkeypatch, module.dispatcher)
    second = propagate(module, x)
    assert loop.count == 0  # no expert called one by one
    assert grouped_experts.stack_builds == builds + 1  # built once, then kept
    assert relative_error(second, original) < ROUNDING
    stack = grouped_experts.held_stack()
    experts = module.dispatcher.gated_mlps()
    width = experts[5].gate_proj.out_features
    assert torch.equal(stack.gate_up[5, :width], experts[5].gate_proj.weight)
    assert torch.equal(stack.gate_up[5, width:], experts[5].up_proj.weight)
    assert torch.equal(stack.down[EXPERTS - 1], experts[-1].down_proj.weight)


def test_an_expert_changed_in_place_is_restacked(block, grouped_on_cpu):
    x = torch.randn(2, 50, 128)
    module = swapped(block)
    propagate(module, x)
    propagate(module, x)
    builds = grouped_experts.stack_builds
    # GPTQ writes the quantized weights in place, as AWQ scales them
    with torch.no_grad():
        module.dispatcher.gated_mlps()[3].down_proj.weight.mul_(3.0)
        changed = block(x)
    output = propagate(module, x)
    assert grouped_experts.stack_builds == builds + 1
    assert relative_error(output, changed) < ROUNDING


def test_a_calibrating_forward_drops_the_stack(block, grouped_on_cpu):
    x = torch.randn(2, 30, 128)
    module = swapped(block)
    propagate(module, x)
    propagate(module, x)
    assert grouped_experts.held_stack() is not None
    following = swapped(linearized_block(n_routed_experts=EXPERTS))
    with torch.no_grad():
        following(x)  # hooks on: the next layer's calibration
    assert grouped_experts.held_stack() is None
    propagate(module, x)
    with torch.no_grad():
        module(x)  # its own, in a mode that calibrates without the stack
    assert grouped_experts.held_stack() is None


def test_the_restore_drops_the_stack(grouped_on_cpu):
    from llmcompressor_moe_plugins import moe_calibration_context

    from .modules.test_glm4_moe import make_model

    model = make_model(n_routed_experts=EXPERTS)
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    with moe_calibration_context(model, mode="routed"):
        with torch.no_grad(), HooksMixin.disable_hooks():
            model(x)
            model(x)
        assert grouped_experts.held_stack() is not None
    assert grouped_experts.held_stack() is None


def test_a_stack_that_does_not_fit_leaves_the_loop(block, grouped_on_cpu, monkeypatch):
    x = torch.randn(2, 30, 128)
    with torch.no_grad():
        original = block(x)
    mlps = swapped(block).dispatcher.gated_mlps()
    needed = grouped_experts.stack_bytes(mlps)
    width = mlps[0].gate_proj.out_features
    assert needed == EXPERTS * 3 * width * 128 * 4  # three float32 projections
    room = needed / grouped_experts.STACK_FRACTION
    monkeypatch.setattr(grouped_experts, "allocatable_bytes", lambda _: room - 1)
    module = swapped(block)
    for _ in range(2):
        assert torch.equal(propagate(module, x), original)  # the loop, exactly
    assert grouped_experts.held_stack() is None
    monkeypatch.setattr(grouped_experts, "allocatable_bytes", lambda _: room)
    propagate(module, x)
    assert grouped_experts.held_stack() is not None


def test_a_block_whose_grouped_output_differs_keeps_the_loop(
    block, grouped_on_cpu, monkeypatch
):
    x = torch.randn(2, 30, 128)
    with torch.no_grad():
        original = block(x)
    real = grouped_experts.grouped_forward

    def one_expert_lost(stack, *args):
        stack.down[2].zero_()  # as if the stack had lost expert 2
        return real(stack, *args)

    monkeypatch.setattr(grouped_experts, "grouped_forward", one_expert_lost)
    module = swapped(block)
    for _ in range(3):
        assert torch.equal(propagate(module, x), original)
    assert module.dispatcher._grouped_agrees is False
    assert grouped_experts.held_stack() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_keeps_the_exact_loop(dtype):
    block = linearized_block(dtype, n_routed_experts=EXPERTS)
    x = torch.randn(2, 30, 128, dtype=dtype)
    with torch.no_grad():
        original = block(x)
    module = swapped(block)
    for _ in range(2):
        assert torch.equal(propagate(module, x), original)
    assert grouped_experts.held_stack() is None
    assert module.dispatcher._grouped_agrees is None


def test_experts_with_biases_keep_the_loop(block, grouped_on_cpu):
    mlps = swapped(block).dispatcher.gated_mlps()
    x = torch.randn(4, 128)
    assert grouped_experts.supported(mlps, x)
    mlps[0].down_proj.bias = torch.nn.Parameter(torch.zeros(128))
    assert not grouped_experts.supported(mlps, x)


# -- weighted calibrating forwards (the default mode) --------------------------


def calibrate_twice(block, x, monkeypatch, budget_gib=None):
    """Two calibrating forwards of the default mode under the shared-Hessian GPTQ
    modifier (a floor high enough to give most experts extra tokens), then the
    layer's compression; returns the Hessians each Linear was solved against and
    the outputs."""
    from .test_weighted_hessians import SolveRecorder

    with monkeypatch.context() as patches:  # undone for the next run
        return _calibrate_twice(block, x, SolveRecorder(patches), budget_gib)


def _calibrate_twice(block, x, solves, budget_gib):
    from llmcompressor_moe_plugins.defaults import DEFAULT_MODE

    from .test_weighted_hessians import calibrate_and_compress

    module = calibration_module(
        CalibrationGlm4MoeMoE, block, block.config, DEFAULT_MODE, floor=80
    )
    _, outputs = calibrate_and_compress(module, x, forwards=2, budget_gib=budget_gib)
    names = {m: n for n, m in module.named_modules(prefix="mlp")}
    return {names[m]: h for m, h in solves.solved.items()}, outputs, module


class Calls:
    def __init__(self, monkeypatch, owner, name):
        self.count = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def test_weighted_forwards_give_the_loops_statistics_and_outputs(monkeypatch):
    x = torch.randn(60, 128)
    expected, expected_outputs, _ = calibrate_twice(
        linearized_block(n_routed_experts=EXPERTS), x, monkeypatch
    )
    monkeypatch.setattr(grouped_experts, "device_runs_grouped_gemms", lambda *_: True)
    grouped = Calls(monkeypatch, grouped_experts, "weighted_forward")
    block = linearized_block(n_routed_experts=EXPERTS)
    builds = grouped_experts.stack_builds
    try:
        solved, outputs, module = calibrate_twice(block, x, monkeypatch)
    finally:
        grouped_experts.drop_stack()
    assert grouped.count == 1  # the second forward; the first checked it
    assert grouped_experts.stack_builds == builds + 1  # kept between forwards
    _, calibrated = module.dispatcher.counts()
    routed, _ = module.dispatcher.counts()
    assert min(calibrated) >= 80 and sum(calibrated) > sum(routed)  # extra tokens
    assert torch.equal(outputs[0], expected_outputs[0])  # the loop's, while checked
    assert relative_error(outputs[1], expected_outputs[1]) < ROUNDING
    assert solved.keys() == expected.keys()
    experts = [n for n in solved if ".experts." in n]
    assert len(experts) == 3 * EXPERTS
    for name in experts:
        for ours, loop in zip(solved[name], expected[name], strict=True):
            assert relative_error(ours, loop) < ROUNDING, name


def test_a_layer_split_by_the_budget_keeps_its_recorded_statistics(monkeypatch):
    x = torch.randn(60, 128)
    budget = 0.002  # GiB: the block in groups of a few experts
    from llmcompressor_moe_plugins.statistics import budgeted_statistics

    plans = []
    plan_groups = budgeted_statistics.plan_groups
    monkeypatch.setattr(
        budgeted_statistics,
        "plan_groups",
        lambda *a, **k: plans.append(plan_groups(*a, **k)) or plans[-1],
    )
    expected, _, _ = calibrate_twice(
        linearized_block(n_routed_experts=EXPERTS), x, monkeypatch, budget
    )
    monkeypatch.setattr(grouped_experts, "device_runs_grouped_gemms", lambda *_: True)
    grouped = Calls(monkeypatch, grouped_experts, "weighted_forward")
    block = linearized_block(n_routed_experts=EXPERTS)
    try:
        solved, _, _ = calibrate_twice(block, x, monkeypatch, budget)
    finally:
        grouped_experts.drop_stack()
    assert grouped.count == 0
    assert len(plans) == 2 and len(plans[-1]) > 1  # one plan a run, in groups
    for name, hessians in expected.items():
        for ours, loop in zip(solved[name], hessians, strict=True):
            assert torch.equal(ours, loop), name


@pytest.mark.parametrize("calibrating", [False, True])
def test_kernels_that_fail_on_the_first_try_leave_the_block_to_the_loop(
    calibrating, monkeypatch
):
    x = torch.randn(60, 128)
    if calibrating:  # the loop's, before the kernels are refused
        expected, expected_outputs, _ = calibrate_twice(
            linearized_block(n_routed_experts=EXPERTS), x, monkeypatch
        )
    monkeypatch.setattr(grouped_experts, "device_runs_grouped_gemms", lambda *_: True)

    def refused(*_args, **_kwargs):
        raise RuntimeError("grouped gemm: strides must be 16-byte aligned")

    monkeypatch.setattr(grouped_experts.F, "grouped_mm", refused)
    block = linearized_block(n_routed_experts=EXPERTS)
    try:
        if calibrating:
            solved, outputs, module = calibrate_twice(block, x, monkeypatch)
            assert all(map(torch.equal, outputs, expected_outputs))
            for name, hessians in expected.items():
                assert all(map(torch.equal, solved[name], hessians)), name
        else:
            with torch.no_grad():
                original = block(x)
            module = swapped(block)
            for _ in range(2):
                assert torch.equal(propagate(module, x), original)
    finally:
        grouped_experts.drop_stack()
    assert module.dispatcher._grouped_agrees is False
    assert grouped_experts.held_stack() is None


def test_kernels_that_fail_after_the_check_stop_the_run(
    block, grouped_on_cpu, monkeypatch
):
    x = torch.randn(2, 30, 128)
    module = swapped(block)
    propagate(module, x)  # checked: the grouped path is trusted from here

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(grouped_experts.F, "grouped_mm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        propagate(module, x)
    assert module.dispatcher._grouped_agrees is True
