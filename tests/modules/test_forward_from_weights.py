"""All-mode forwards computed from the expert weights for an expert-input consumer:
same down_proj statistics and (up to rounding) the same output as calling each
expert, and the per-expert calls wherever the path does not apply."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from llmcompressor.modifiers.utils.hooks import HooksMixin

from llmcompressor_moe_plugins.modules.glm4_moe import CalibrationGlm4MoeMoE
from llmcompressor_moe_plugins.modules.moe_layer import CalibrationMoeLayer

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
    return [calibration.experts[i] for i in range(calibration.num_experts)]


def call_counter(calibration) -> Counter:
    calls = Counter()
    for expert in routed_experts(calibration):
        for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
            linear.register_forward_hook(lambda m, a, o: calls.update([m]))
    return calls


def per_expert_grams(calibration, x):
    grams = {}

    def hook(module, args):
        gram = args[0].double().T @ args[0].double()
        grams[module] = grams.get(module, 0) + gram

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
    reference_grams, _ = per_expert_grams(cls(block, config, mode="all"), x)

    calibration = cls(block, config, mode="all", chunk_size=chunk_size)
    calibration.expert_input_consumer = GramConsumer()
    with torch.no_grad():
        calibration(x)  # the first forward probes expert 0's own forward once
        consumer = calibration.expert_input_consumer = GramConsumer()
        calls = call_counter(calibration)
        output = calibration(x)

    assert not calls  # no expert Linear was called as a module
    torch.testing.assert_close(output, original, rtol=1e-5, atol=1e-6)
    down_projs = [e.down_proj for e in routed_experts(calibration)]
    assert set(consumer.grams) == set(down_projs) == set(reference_grams)
    for down_proj in down_projs:
        torch.testing.assert_close(
            consumer.grams[down_proj], reference_grams[down_proj], rtol=1e-6, atol=1e-8
        )
    assert calibration.calibrated_token_counts.tolist() == [2 * 38] * len(down_projs)


def test_bfloat16_output_within_rounding():
    block, cls, config, hidden = make_block("glm4", torch.bfloat16)
    x = torch.randn(3, 11, hidden, dtype=torch.bfloat16)
    with torch.no_grad():
        original = block(x)
        calibration = cls(block, config, mode="all")
        calibration.expert_input_consumer = GramConsumer()
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
    calibration = cls(block, config, mode="routed" if why == "routed_mode" else "all")
    consumer = GramConsumer(accept=why != "consumer_refuses")
    calibration.expert_input_consumer = consumer
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
    calibration = cls(block, config, mode="all")
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
    calibration = cls(block, config, mode="all")
    with torch.no_grad(), HooksMixin.disable_hooks():
        calibration(x)
        calls = LinearCalls(monkeypatch)
        output = calibration(x)
    assert torch.equal(output, original)
    assert calls.count > 1  # more than the gate: the experts were called
    assert seen or why != "plain_hook"
