"""oneshot end to end on a tiny Glm4MoeForCausalLM with every shipped GLM4 recipe."""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM

import llmcompressor_moe_plugins as plugins
from llmcompressor_moe_plugins import recipes
from llmcompressor_moe_plugins.checkpoint.verify import verify_checkpoint
from llmcompressor_moe_plugins.checkpoint.vllm_rules import vllm_layout_violations
from llmcompressor_moe_plugins.modifier import DEFAULT_MODE
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

from .helpers import quantization_config, relative_error, saved_tensor_names

pytestmark = pytest.mark.slow

NUM_SAMPLES, SEQ_LEN = 8, 64
TOKENS = NUM_SAMPLES * SEQ_LEN
# Relative logit error of the reloaded checkpoint vs the unquantized model, on a
# random-init model. Measured: GPTQ W4A16 0.11, AWQ W4A16 0.25 (plain RTN: 0.24;
# smoothing has little to gain on random weights), W8A8 0.014, NVFP4 0.27. The bound
# catches a zeroed or garbage expert (which moves logits far more), not noise.
MAX_RELATIVE_ERROR = {"w4a16": 0.35, "w8a8": 0.05, "nvfp4": 0.4}
# Relative error of each expert's gate_proj weight after GPTQ W4A16; a zeroed
# expert has 1.0. int4 rounding of random weights: about 0.1.
MAX_EXPERT_ERROR = {"w4a16": 0.25}


@pytest.mark.parametrize(
    "recipe_name",
    [
        "glm4_moe_w4a16_gptq",
        "glm4_moe_w4a16_awq",
        "glm4_moe_w8a8_int8",
        "glm4_moe_nvfp4",
    ],
)
def test_glm4_recipe_end_to_end(
    recipe_name, glm4_dir, tokenizer, calibration_data, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calibration_data,
            recipe=str(recipes.path(recipe_name)),
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
        )
    scheme = recipe_name.split("_")[2]
    original = AutoModelForCausalLM.from_pretrained(glm4_dir).eval()
    x = torch.tensor(calibration_data[0]["input_ids"])[None]
    with torch.no_grad():
        in_memory_error = relative_error(model(x).logits, original(x).logits)
    assert in_memory_error < MAX_RELATIVE_ERROR[scheme], in_memory_error
    # per expert, not only logits (a zeroed expert layer moves them by ~0.13):
    # GPTQ writes each expert's quantized weights in place, so every one moved by
    # rounding, none zeroed or left as is. (AWQ and NVFP4 quantize on the fly and
    # SmoothQuant rescales weights: the scale check before saving covers those.)
    for layer in (1, 2) if recipe_name == "glm4_moe_w4a16_gptq" else ():
        fused = original.model.layers[layer].mlp.experts
        width = fused.gate_up_proj.shape[1] // 2
        experts = model.model.layers[layer].mlp.experts
        for expert in range(fused.gate_up_proj.shape[0]):
            error = relative_error(
                experts[expert].gate_proj.weight, fused.gate_up_proj[expert, :width]
            )
            assert 0 < error < MAX_EXPERT_ERROR[scheme], (layer, expert, error)
    model.save_pretrained(tmp_path, save_compressed=True)
    # reloads as saved (what transformers 5.17 can read of it) and keeps vLLM's
    # MoE layout rules, scale values included
    verify_checkpoint(tmp_path)
    assert vllm_layout_violations(tmp_path, check_values=True) == []
    report = plugins.last_coverage_report()
    assert [b.name for b in report.blocks] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]
    # counts are per calibration pass: oneshot's independent pipeline gives each
    # modifier that needs data its own (SmoothQuant, then GPTQ, for W8A8)
    passes = 2 if recipe_name == "glm4_moe_w8a8_int8" else 1
    assert len(report.passes) == passes
    for calibration_pass in report.passes:
        for block in calibration_pass.blocks:
            assert block.mode == DEFAULT_MODE  # the recipes leave it to the default
            assert block.block_class == "Glm4MoeMoE"
            assert sum(block.routed) == TOKENS * 2
            assert all(
                c >= r for c, r in zip(block.calibrated, block.routed, strict=True)
            )
            assert min(block.calibrated) >= 16  # the default floor: nobody starved

    if scheme == "w8a8":
        # transformers 5.17 cannot reload int-quantized GLM4 experts into its fused
        # layout ("Concatenate on tensors destined for ...gate_up_proj"); load the
        # saved per-expert int8 weights into a linearized model instead
        reloaded = load_dequantized_int8(tmp_path)
    elif scheme == "w4a16":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    else:
        # transformers 5.17 drops per-expert NVFP4 global scales when it fuses
        # experts on load ("UNEXPECTED ...weight_global_scale"); vLLM reads them.
        # The in-memory check above covers NVFP4; here, that they were saved.
        reloaded = None
    if reloaded is not None:
        with torch.no_grad():
            error = relative_error(reloaded(x).logits, original(x).logits)
        assert error < MAX_RELATIVE_ERROR[scheme], error

    names = saved_tensor_names(tmp_path)
    weight_key = "weight" if scheme == "w8a8" else "weight_packed"
    for layer in (1, 2):
        for expert in range(16):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                assert f"{prefix}.{weight_key}" in names, prefix
                assert f"{prefix}.weight_scale" in names, prefix
                if scheme == "nvfp4":
                    assert f"{prefix}.weight_global_scale" in names, prefix
                    assert f"{prefix}.input_global_scale" in names, prefix
        assert f"model.layers.{layer}.mlp.shared_experts.up_proj.weight_scale" in names
        assert f"model.layers.{layer}.mlp.gate.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight_scale" in names  # dense layer
    ignored = quantization_config(tmp_path)["ignore"]
    assert "lm_head" in ignored
    # the routers are not Linears, so they never match `targets: Linear`
    assert not any(name.endswith("layers.1.mlp.gate.weight_scale") for name in names)


def load_dequantized_int8(directory):
    """The saved W8A8 checkpoint as a float model: int8 weights times scales,
    into a linearized Glm4MoeForCausalLM (activation quantization not simulated)."""
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from safetensors import safe_open
    from transformers import AutoConfig, Glm4MoeForCausalLM

    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    model = Glm4MoeForCausalLM(config)
    linearize_moe(model)
    state = {}
    with safe_open(str(directory / "model.safetensors"), "pt") as saved:
        for key in saved.keys():
            tensor = saved.get_tensor(key)
            if tensor.dtype == torch.int8:
                tensor = tensor.float() * saved.get_tensor(f"{key}_scale")
            state[key] = tensor
    state = {k: v for k, v in state.items() if not k.endswith("_scale")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval()


def test_routed_only_starves_experts_and_ours_does_not(
    glm4_dir, tokenizer, calibration_data, tmp_path, record_linear_inputs
):
    from llmcompressor.modeling.moe.linearize import linearize_moe

    gptq = dict(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    data = calibration_data.select(range(2))

    def expert_rows(recipe, **kwargs):
        model = AutoModelForCausalLM.from_pretrained(glm4_dir)
        linearize_moe(model)  # so hooks sit on the Linears oneshot will use
        recorder = record_linear_inputs(model)
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=recipe,
            num_calibration_samples=2,
            max_seq_length=SEQ_LEN,
            **kwargs,
        )
        return {
            n: r
            for n, r in recorder.rows.items()
            if ".experts." in n and "gate_proj" in n
        }

    upstream_routed = expert_rows(
        [GPTQModifier(**gptq)], moe_calibrate_all_experts=False
    )
    ours = expert_rows(
        [plugins.MoECalibrationModifier(mode="all"), GPTQModifier(**gptq)]
    )
    assert set(ours) == set(upstream_routed)
    assert all(rows == 2 * SEQ_LEN for rows in ours.values())
    assert any(upstream_routed[n] < ours[n] for n in ours)
    assert min(upstream_routed.values()) < 2 * SEQ_LEN
