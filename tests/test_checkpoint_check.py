"""check_quantized_tensors: no NaN, Inf or non-positive scale gets saved."""

import pytest
import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import Glm4MoeForCausalLM

from llmcompressor_moe_plugins.checkpoint.checks import (
    bad_quantized_tensors,
    check_quantized_tensors,
)
from llmcompressor_moe_plugins.checkpoint.rtn import quantize_round_to_nearest
from llmcompressor_moe_plugins.real_configs import tiny_config_like

EXPERT = "model.layers.1.mlp.experts.3.down_proj"


def quantized_twin(preset: str) -> torch.nn.Module:
    """The GLM-4.5-Air twin under ``preset``, every weight qparam from its weights
    and every calibrated activation qparam set to a plausible value."""
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(tiny_config_like("GLM-4.5-Air", num_hidden_layers=2))
    linearize_moe(model)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head", "model.layers.0.mlp.down_proj"],  # as the fit does
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config)
    quantize_round_to_nearest([model.model])
    for module in model.modules():
        for name in ("input_global_scale", "input_scale"):
            if hasattr(module, name):
                getattr(module, name).data.fill_(1.5)
    return model


@pytest.mark.parametrize("preset", ["NVFP4", "W4A16", "W8A8", "FP8"])
def test_calibrated_model_passes(preset):
    check_quantized_tensors(quantized_twin(preset))


@pytest.mark.parametrize(
    ("qparam", "value", "problem"),
    [
        ("input_global_scale", float("nan"), "NaN"),
        ("input_global_scale", 0.0, "a zero scale"),
        ("weight_global_scale", float("inf"), "Inf"),
        ("weight_scale", -0.5, "a negative scale"),
    ],
)
def test_poisoned_nvfp4_expert_is_named(qparam, value, problem):
    model = quantized_twin("NVFP4")
    module = model.get_submodule(EXPERT)
    tensor = getattr(module, qparam)
    flat = tensor.data.view(-1)
    flat[flat.numel() // 2] = value  # one bad element is enough
    assert bad_quantized_tensors(model) == [(f"{EXPERT}.{qparam}", problem)]
    with pytest.raises(ValueError) as error:
        check_quantized_tensors(model)
    message = str(error.value)
    assert f"{EXPERT}.{qparam}: {problem}" in message
    assert "rtn_fallback=True" in message  # the fix, for experts


def test_static_input_scale_and_non_expert_message():
    model = quantized_twin("FP8")
    attention = "model.layers.0.self_attn.o_proj"
    model.get_submodule(attention).input_scale.data.fill_(0.0)
    with pytest.raises(ValueError, match=rf"{attention}\.input_scale: a zero scale"):
        check_quantized_tensors(model)
    with pytest.raises(ValueError, match="ignore list"):
        check_quantized_tensors(model)


def test_integer_zero_points_and_unquantized_modules_are_not_checked():
    model = quantized_twin("W4A16")
    # W4A16 is symmetric: integer zero points are zero, and that is fine
    assert model.get_submodule(EXPERT).weight_zero_point.dtype == torch.int8
    model.lm_head.weight.data[0, 0] = float("nan")  # not quantized: not a qparam
    check_quantized_tensors(model)


def test_many_bad_tensors_are_summarized():
    model = quantized_twin("NVFP4")
    for module in model.modules():
        if hasattr(module, "input_global_scale"):
            module.input_global_scale.data.fill_(float("nan"))
    bad = bad_quantized_tensors(model)
    assert len(bad) > 20
    with pytest.raises(ValueError, match=rf"and {len(bad) - 20} more"):
        check_quantized_tensors(model)
