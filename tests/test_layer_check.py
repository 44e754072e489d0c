"""Coverage is checked when a layer's calibration ends, before the layer is
compressed; the default floor calibrates every expert whatever the router's skew;
a failed run leaves no calibration module in the model."""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import (
    MoECalibrationModifier,
    MoECalibrationModule,
    UndercalibratedExpertsError,
)
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

pytestmark = pytest.mark.slow

STARVED = [0, 1, 2]


def skewed_glm4(glm4_dir):
    """The tiny GLM4 with a trained-like uneven router bias: experts 0-2 of every
    MoE layer are never chosen."""
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias[STARVED] = -5.0
    return model


def run(model, tokenizer, data, *modifiers):
    gptq = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=[*modifiers, gptq],
            num_calibration_samples=len(data),
            max_seq_length=64,
        )


def calibrating_calls(router) -> list:
    from llmcompressor_moe_plugins import upstream

    calls = []
    router.register_forward_hook(
        lambda *_: calls.append(1) if upstream.hooks_enabled() else None
    )
    return calls


def test_starved_expert_stops_the_run_in_its_layer(
    glm4_dir, tokenizer, calibration_data
):
    model = skewed_glm4(glm4_dir)
    fused = model.model.layers[1].mlp.experts
    width = fused.gate_up_proj.shape[1] // 2
    gate_weights = fused.gate_up_proj[:, :width].detach().clone()
    second_layer_calls = calibrating_calls(model.model.layers[2].mlp.gate)

    with pytest.raises(UndercalibratedExpertsError) as failure:
        run(model, tokenizer, calibration_data, MoECalibrationModifier(mode="routed"))

    message = str(failure.value)
    assert "model.layers.1.mlp.experts.0" in message and "layers.2" not in message
    assert "floor" in message and "rtn_fallback" in message  # names the fixes
    assert not second_layer_calls  # layer 2 was never calibrated
    # layer 1 was not compressed: its experts keep their original weights
    experts = model.model.layers[1].mlp.experts
    for expert in range(len(STARVED) + 5):
        assert torch.equal(experts[expert].gate_proj.weight, gate_weights[expert])
    assert not any(isinstance(m, MoECalibrationModule) for m in model.modules())


def test_default_mode_calibrates_every_expert_on_the_floor(
    glm4_dir, tokenizer, calibration_data
):
    model = skewed_glm4(glm4_dir)
    modifier = MoECalibrationModifier()
    run(model, tokenizer, calibration_data, modifier)
    report = modifier.coverage_report
    assert report.min_tokens == 16  # resolved while oneshot's flag was on
    assert [b.name for b in report.blocks] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]
    for block in report.blocks:
        assert block.floor == 16
        assert [block.routed[e] for e in STARVED] == [0, 0, 0]
        assert min(block.calibrated) >= 16
        # the floor adds tokens only where they are missing, on top of sampling
        assert block.calibrated[STARVED[0]] < len(calibration_data) * 64
    # each expert that had no token was compressed from real statistics
    for layer in model.model.layers[1:]:
        for expert in STARVED:
            weight = layer.mlp.experts[expert].gate_proj.weight
            assert weight.abs().sum() > 0


class ExplodingModifier(Modifier):
    def on_initialize(self, state, **kwargs) -> bool:
        raise RuntimeError("boom in another modifier")


def test_failure_elsewhere_restores_the_blocks(glm4_dir, tokenizer, calibration_data):
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    with pytest.raises(RuntimeError, match="boom"):
        run(
            model,
            tokenizer,
            calibration_data,
            MoECalibrationModifier(),
            ExplodingModifier(),
        )
    assert not any(isinstance(m, MoECalibrationModule) for m in model.modules())
    assert type(model.model.layers[1].mlp).__name__ == "Glm4MoeMoE"
