import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import Glm4MoeForCausalLM

from llmcompressor_moe_plugins import moe_calibration_context
from llmcompressor_moe_plugins.calibration.architectures.glm4_moe import (
    CalibrationGlm4MoeMoE,
)
from llmcompressor_moe_plugins.tiny import tiny_glm4_moe_config

from ..helpers import calibration_module


def make_model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(tiny_glm4_moe_config(**overrides)).to(dtype).eval()
    model.config.dtype = dtype  # linearize_moe builds expert Linears in this dtype
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


def linearized_block(dtype=torch.float32, **overrides):
    model = make_model(dtype, **overrides)
    linearize_moe(model)
    return model.model.layers[1].mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 9), (2, 33), (45,)])
@pytest.mark.parametrize(
    "mode", ["routed", "all", "top_k:6", "min_tokens:20", "affinity:0.5"]
)
def test_output_equals_original_block(dtype, shape, mode):
    block = linearized_block(dtype)
    x = torch.randn(*shape, 128, dtype=dtype)
    with torch.no_grad():
        expected = block(x)
        actual = calibration_module(CalibrationGlm4MoeMoE, block, block.config, mode)(x)
    # routed outputs come from the same calls, in the original's order
    assert torch.equal(actual, expected)


def test_matches_the_fused_upstream_block():
    model = make_model()
    fused = model.model.layers[1].mlp
    x = torch.randn(2, 17, 128)
    with torch.no_grad():
        expected = fused(x)
        linearize_moe(model)
        with moe_calibration_context(model, mode="all"):
            actual = model.model.layers[1].mlp(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_router_is_called_not_rederived(monkeypatch):
    block = linearized_block()
    calls = []
    block.gate.register_forward_hook(lambda m, a, o: calls.append(len(o)))
    CalibrationGlm4MoeMoE(block, block.config)(torch.randn(4, 128))
    assert calls == [3]


def test_group_limited_routing_is_respected(record_linear_inputs):
    # 4 groups, only 2 may be chosen per token: routed mode must follow that
    block = linearized_block()
    x = torch.randn(1, 128)
    _, _, indices = block.gate(x)
    calibration = calibration_module(
        CalibrationGlm4MoeMoE, block, block.config, "routed"
    )
    recorder = record_linear_inputs(calibration.experts)
    calibration(x)
    called = {
        int(name.split(".")[0])
        for name, rows in recorder.rows.items()
        if rows and name.endswith("gate_proj")
    }
    assert called == set(indices.flatten().tolist())
    groups = {expert // 4 for expert in called}
    assert len(groups) <= 2


def test_all_expert_token_counts(record_linear_inputs):
    block = linearized_block()
    calibration = calibration_module(CalibrationGlm4MoeMoE, block, block.config, "all")
    recorder = record_linear_inputs(calibration)
    calibration(torch.randn(3, 10, 128))
    for name, rows in recorder.rows.items():
        if name.startswith("experts."):
            assert rows == 30, name
        else:  # shared experts see every token once, as in the original
            assert rows == 30 and len(recorder.calls[name]) == 1
    assert calibration.dispatcher.calibrated_counts.tolist() == [30] * 16
    assert calibration.dispatcher.routed_counts.sum() == 30 * 2


def test_unlinearized_experts_get_a_clear_error():
    model = make_model()
    block = model.model.layers[1].mlp
    with pytest.raises(ValueError, match="linearize_moe"):
        CalibrationGlm4MoeMoE(block, model.config)
