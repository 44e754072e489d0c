"""All-mode forwards computed from the expert weights for an expert-input consumer:
same down_proj statistics and (up to rounding) the same output as calling each
expert, and the per-expert calls wherever the path does not apply."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from llmcompressor.modifiers.utils.hooks import HooksMixin

from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.calibration.architectures.moe_layer import (
    CalibrationMoeLayer,
)

from ..helpers import calibration_module
from .test_glm4_moe import linearized_block
from .test_moe_layer import make_layer


class GramConsumer:
    """Sums x^T x of what each down_proj would see: GPTQ's Hessian up to scale."""

    def __init__(self, accept: bool = True):
        self.accept = accept
        self.grams: dict[torch.nn.Module, torch.Tensor] = {}

    def accepts(self, linears) -> bool:
        return self.accept

    def consume(self, down_proj, inputs) -> None:
        gram = inputs.double().T @ inputs.double()
        self.grams[down_proj] = self.grams.get(down_proj, 0) + gram


def make_block(kind, dtype=torch.float32):
    if kind == "glm4":
        block = linearized_block(dtype)
        return block, CalibrationGlm4MoeMoE, block.config, block.config.hidden_size
    layer = make_layer(dtype)
    return layer, CalibrationMoeLayer, None, layer.gate.in_features


def routed_experts(calibration):
    return calibration.expert_modules()


# Rounding bounds from the arithmetic, not from one CPU: a sum of n float32
# products computed in another order (other BLAS blocking, other chunks) differs by
# at most about n * eps times the sum of the terms' magnitudes.
EPS32 = torch.finfo(torch.float32).eps


def assert_within_rounding(actual, expected, magnitude, terms):
    """|actual - expected| <= 4 * terms * eps * magnitude, elementwise."""
    bound = 4 * terms * EPS32 * magnitude
    excess = (actual.double() - expected.double()).abs() - bound.double()
    assert (excess <= 0).all(), f"off by up to {float(excess.max()):.3g} past bound"


def call_counter(calibration) -> Counter:
    calls = Counter()
    for expert in routed_experts(calibration):
        for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
            linear.register_forward_hook(lambda m, a, o: calls.update([m]))
    return calls


def per_expert_grams(calibration, x, magnitudes=None):
    grams = {}

    def hook(module, args):
        gram = args[0].double().T @ args[0].double()
        grams[module] = grams.get(module, 0) + gram
        if magnitudes is not None:
            size = args[0].abs().double()
            magnitudes[module] = magnitudes.get(module, 0) + size.T @ size

    handles = [
        e.down_proj.register_forward_pre_hook(hook) for e in routed_experts(calibration)
    ]
    with torch.no_grad():
        output = calibration(x)
    for handle in handles:
        handle.remove()
    return grams, output


@pytest.mark.parametrize("kind", ["glm4", "moe_layer"])
@pytest.mark.parametrize("chunk_size", ["auto", 7])
def test_statistics_and_output_match_per_expert_calls(kind, chunk_size):
    block, cls, config, hidden = make_block(kind)
    x = torch.randn(2, 19, hidden)
    with torch.no_grad():
        original = block(x)
    magnitudes = {}
    reference_grams, _ = per_expert_grams(
        calibration_module(cls, block, config, "all"), x, magnitudes
    )

    calibration = calibration_module(cls, block, config, "all", chunk_size=chunk_size)
    calibration.dispatcher.consumer = GramConsumer()
    with torch.no_grad():
        calibration(x)  # the first forward probes expert 0's own forward once
        consumer = calibration.dispatcher.consumer = GramConsumer()
        calls = call_counter(calibration)
        output = calibration(x)

    assert not calls  # no expert Linear was called as a module
    experts = routed_experts(calibration)
    width = experts[0].down_proj.in_features
    # each output sums hidden-wide, intermediate-wide and top-k-wide products
    assert_within_rounding(
        output, original, original.abs().max(), hidden + width + len(experts)
    )
    down_projs = [e.down_proj for e in experts]
    assert set(consumer.grams) == set(down_projs) == set(reference_grams)
    for down_proj in down_projs:
        # inputs differ by rounding of hidden-wide products; Gram sums in float64
        assert_within_rounding(
            consumer.grams[down_proj],
            reference_grams[down_proj],
            magnitudes[down_proj],
            2 * (hidden + 4),
        )
    assert calibration.dispatcher.calibrated_counts.tolist() == [2 * 38] * len(
        down_projs
    )


def test_bfloat16_output_within_rounding():
    block, cls, config, hidden = make_block("glm4", torch.bfloat16)
    x = torch.randn(3, 11, hidden, dtype=torch.bfloat16)
    with torch.no_grad():
        original = block(x)
        calibration = calibration_module(cls, block, config, "all")
        calibration.dispatcher.consumer = GramConsumer()
        output = calibration(x)
    assert output.dtype == original.dtype
    torch.testing.assert_close(output, original, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "why", ["consumer_refuses", "wrong_activation", "routed_mode", "hooks_disabled"]
)
def test_per_expert_calls_where_the_path_does_not_apply(why, monkeypatch):
    block, cls, config, hidden = make_block("moe_layer")
    x = torch.randn(24, hidden)
    with torch.no_grad():
        original = block(x)
    if why == "wrong_activation":  # the probe against the expert's own forward
        monkeypatch.setattr(cls, "default_expert_activation", staticmethod(F.relu))
    calibration = calibration_module(
        cls, block, config, "routed" if why == "routed_mode" else "all"
    )
    consumer = GramConsumer(accept=why != "consumer_refuses")
    calibration.dispatcher.consumer = consumer
    calls = call_counter(calibration)
    with torch.no_grad():
        if why == "hooks_disabled":  # propagation pass: nothing is calibrating
            with HooksMixin.disable_hooks():
                output = calibration(x)
        else:
            output = calibration(x)
    assert torch.equal(output, original)  # the exact per-expert path
    assert consumer.grams == {}
    assert calls  # experts were called as modules


class LinearCalls:
    """Counts calls of Linear modules (F.linear on their weights is not a call)."""

    def __init__(self, monkeypatch):
        self.count = 0
        forward = torch.nn.Linear.forward

        def counted(module, x):
            self.count += 1
            return forward(module, x)

        monkeypatch.setattr(torch.nn.Linear, "forward", counted)


@pytest.mark.parametrize("kind", ["glm4", "moe_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncalibrated_forwards_skip_module_calls_bit_for_bit(kind, dtype, monkeypatch):
    block, cls, config, hidden = make_block(kind, dtype)
    x = torch.randn(2, 21, hidden, dtype=dtype)
    with torch.no_grad():
        original = block(x)
    calibration = calibration_module(cls, block, config, "all")
    with torch.no_grad(), HooksMixin.disable_hooks():  # as in propagation
        calibration(x)  # the first forward probes expert 0 against its module
        calls = LinearCalls(monkeypatch)
        output = calibration(x)
    assert torch.equal(output, original)
    # only the shared expert's Linears (GLM4) or the gate Linear (book) remain
    assert calls.count == (3 if kind == "glm4" else 1)
    assert not HooksMixin._HOOKS_DISABLED  # the probe restored the hook state


@pytest.mark.parametrize("why", ["plain_hook", "quantizing", "wrong_activation"])
def test_uncalibrated_forwards_call_modules_where_needed(why, monkeypatch):
    block, cls, config, hidden = make_block("moe_layer")
    x = torch.randn(24, hidden)
    with torch.no_grad():
        original = block(x)
    seen = []
    if why == "plain_hook":  # not llmcompressor's: nothing disables it
        block.experts[2].up_proj.register_forward_hook(lambda *a: seen.append(1))
    if why == "quantizing":  # compressed-tensors QDQ on: the weights alone differ
        block.experts[2].up_proj.quantization_scheme = object()
    if why == "wrong_activation":
        monkeypatch.setattr(cls, "default_expert_activation", staticmethod(F.gelu))
    calibration = calibration_module(cls, block, config, "all")
    with torch.no_grad(), HooksMixin.disable_hooks():
        calibration(x)
        calls = LinearCalls(monkeypatch)
        output = calibration(x)
    assert torch.equal(output, original)
    assert calls.count > 1  # more than the gate: the experts were called
    assert seen or why != "plain_hook"
