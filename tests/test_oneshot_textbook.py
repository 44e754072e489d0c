"""oneshot end to end on the textbook MoeLayer model: recipe by path, recipe as
Python objects, AWQ; checkpoint saved, reloaded and compared."""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

import llmcompressor_moe_plugins as plugins
from llmcompressor_moe_plugins.checkpoint.vllm_rules import vllm_layout_violations
from llmcompressor_moe_plugins.modifier import DEFAULT_MODE
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

from .helpers import quantization_config, relative_error, saved_tensor_names

pytestmark = pytest.mark.slow

NUM_SAMPLES, SEQ_LEN = 8, 64
# int4 group-128 weights on a random-init model: about 8% relative logit error
# measured; 25% leaves room for seeds while still failing on broken experts
# (a zeroed or garbage expert moves logits by far more).
MAX_RELATIVE_ERROR = 0.25


def run(model_dir, recipe, tokenizer, data, output_dir, record=None, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    recorder = record(model) if record else None
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe,
            output_dir=str(output_dir),
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
            **kwargs,
        )
    return recorder


def check_round_trip(model_dir, output_dir, data):
    assert vllm_layout_violations(output_dir, check_values=True) == []
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    x = torch.tensor(data[0]["input_ids"])[None]
    with torch.no_grad():
        error = relative_error(reloaded(x).logits, original(x).logits)
    assert error < MAX_RELATIVE_ERROR, error

    names = saved_tensor_names(output_dir)
    config = original.config
    for layer in range(config.num_hidden_layers):
        for expert in range(config.num_local_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                assert f"{prefix}.weight_packed" in names, prefix
                assert f"{prefix}.weight" not in names
        assert f"model.layers.{layer}.mlp.gate.weight" in names  # router kept
    assert "lm_head.weight" in names
    ignored = quantization_config(output_dir)["ignore"]
    assert "lm_head" in ignored
    assert "model.layers.0.mlp.gate" in ignored


def test_gptq_recipe_by_path(
    textbook_dir, tokenizer, calibration_data, tmp_path, record_linear_inputs
):
    recorder = run(
        textbook_dir,
        "recipes/moe_layer_w4a16_gptq.yaml",
        tokenizer,
        calibration_data,
        tmp_path,
        record=record_linear_inputs,
    )
    report = plugins.last_coverage_report()
    # the recipe leaves the mode to the default
    for layer, block in enumerate(report.blocks):
        assert block.mode == DEFAULT_MODE
        assert sum(block.routed) == NUM_SAMPLES * SEQ_LEN * 2
        assert all(c >= r for c, r in zip(block.calibrated, block.routed, strict=True))
        assert sum(block.calibrated) > sum(block.routed)
        # the report says exactly what the experts' hooks saw
        seen = [
            recorder.rows[f"model.layers.{layer}.mlp.experts.{e}.gate_proj"]
            for e in range(block.num_experts)
        ]
        assert seen == block.calibrated
    check_round_trip(textbook_dir, tmp_path, calibration_data)


def test_gptq_recipe_as_python_objects(
    textbook_dir, tokenizer, calibration_data, tmp_path
):
    recipe = [
        plugins.MoECalibrationModifier(mode="min_tokens:64"),
        GPTQModifier(
            targets=["Linear"], scheme="W4A16", ignore=["lm_head", r"re:.*mlp\.gate$"]
        ),
    ]
    run(textbook_dir, recipe, tokenizer, calibration_data, tmp_path)
    report = plugins.last_coverage_report()
    assert all(c >= 64 for block in report.blocks for c in block.calibrated)
    assert any(r < 64 for block in report.blocks for r in block.routed)
    check_round_trip(textbook_dir, tmp_path, calibration_data)


def test_awq_recipe(textbook_dir, tokenizer, calibration_data, tmp_path):
    run(
        textbook_dir,
        "recipes/moe_layer_w4a16_awq.yaml",
        tokenizer,
        calibration_data,
        tmp_path,
    )
    report = plugins.last_coverage_report()
    assert all(c > 0 for block in report.blocks for c in block.calibrated)
    check_round_trip(textbook_dir, tmp_path, calibration_data)
