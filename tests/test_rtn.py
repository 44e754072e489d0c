"""Starved experts get weight qparams from their weights and activation qparams
from their calibrated peers."""

import pytest
import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier
from llmcompressor_moe_plugins.checkpoint.checks import check_quantized_tensors
from llmcompressor_moe_plugins.checkpoint.rtn import (
    fill_activation_qparams,
    fill_starved_activation_qparams,
    quantize_round_to_nearest,
)
from llmcompressor_moe_plugins.real_configs import build_tiny_like
from llmcompressor_moe_plugins.tiny import stdlib_texts, tokenize_for_calibration

pytestmark = pytest.mark.usefixtures("one_thread")


class Expert(torch.nn.Module):
    def __init__(self, hidden=32, width=64):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, width, bias=False)
        self.up_proj = torch.nn.Linear(hidden, width, bias=False)
        self.down_proj = torch.nn.Linear(width, hidden, bias=False)


class Block(torch.nn.Module):
    def __init__(self, experts=4):
        super().__init__()
        self.experts = torch.nn.ModuleList(Expert() for _ in range(experts))


def quantized_block(scheme: QuantizationScheme, experts=4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.mlp = Block(experts)
    scheme = scheme.model_copy(update={"targets": ["Linear"]})
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config)
    return model


def nvfp4_block(experts=4):
    return quantized_block(preset_name_to_scheme("NVFP4", ["Linear"]), experts)


def set_(module, name, value):
    getattr(module, name).data.copy_(torch.as_tensor(value).reshape(-1))


def test_nvfp4_global_scale_takes_the_widest_peer_range():
    model = nvfp4_block()
    experts = model.mlp.experts
    # global scale = 448 * 6 / amax: the smallest is the widest range
    for expert, value in zip(experts, (0.0, 5.0, 2.0, 9.0), strict=True):
        for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
            set_(linear, "input_global_scale", value)
    set_(experts[2].down_proj, "input_global_scale", 7.0)  # roles are separate

    done = fill_starved_activation_qparams(model, ["mlp.experts.0"])
    assert done == [
        "mlp.experts.0.gate_proj.input_global_scale",
        "mlp.experts.0.up_proj.input_global_scale",
        "mlp.experts.0.down_proj.input_global_scale",
    ]
    assert experts[0].gate_proj.input_global_scale.item() == 2.0
    assert experts[0].up_proj.input_global_scale.item() == 2.0
    assert experts[0].down_proj.input_global_scale.item() == 5.0


def test_starved_peers_and_unusable_values_are_not_taken():
    model = nvfp4_block()
    experts = model.mlp.experts
    values = (float("nan"), 0.5, float("inf"), 3.0)
    for expert, value in zip(experts, values, strict=True):
        set_(expert.gate_proj, "input_global_scale", value)
    # expert 1 is starved too, expert 2 holds Inf: only expert 3 counts
    fill_starved_activation_qparams(model, ["mlp.experts.0", "mlp.experts.1"])
    assert experts[0].gate_proj.input_global_scale.item() == 3.0
    assert experts[1].gate_proj.input_global_scale.item() == 3.0


def test_static_fp8_input_scale_takes_the_largest_peer_scale():
    model = quantized_block(preset_name_to_scheme("FP8", ["Linear"]))
    experts = model.mlp.experts
    for expert, value in zip(experts, (float("nan"), 0.1, 0.4, 0.2), strict=True):
        set_(expert.up_proj, "input_scale", value)
    assert fill_activation_qparams(
        experts[0].up_proj, [e.up_proj for e in experts[1:]]
    ) == ["input_scale"]
    assert experts[0].up_proj.input_scale.item() == pytest.approx(0.4)


def test_asymmetric_static_int8_covers_the_union_of_peer_ranges():
    activations = QuantizationArgs(
        num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=False
    )
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", strategy="channel"),
        input_activations=activations,
    )
    model = quantized_block(scheme, experts=3)
    target, low_peer, high_peer = (e.down_proj for e in model.mlp.experts)
    # peer ranges [-1, 0.5] and [-0.2, 2]: the union is [-1, 2]
    for peer, (low, high) in ((low_peer, (-1.0, 0.5)), (high_peer, (-0.2, 2.0))):
        scale = (high - low) / 255
        set_(peer, "input_scale", scale)
        set_(peer, "input_zero_point", round(-128 - low / scale))
    assert fill_activation_qparams(target, [low_peer, high_peer]) == [
        "input_scale",
        "input_zero_point",
    ]
    scale = target.input_scale.item()
    zero_point = target.input_zero_point.item()
    assert scale == pytest.approx(3.0 / 255, rel=1e-3)
    assert (-128 - zero_point) * scale == pytest.approx(-1.0, abs=2 * scale)
    assert (127 - zero_point) * scale == pytest.approx(2.0, abs=2 * scale)


def test_dynamic_activations_have_nothing_to_fill():
    for preset in ("W4A16", "W8A8"):
        model = quantized_block(preset_name_to_scheme(preset, ["Linear"]))
        assert fill_starved_activation_qparams(model, ["mlp.experts.0"]) == []


def test_round_to_nearest_shares_the_nvfp4_global_scale_of_gate_and_up():
    model = nvfp4_block()
    expert = model.mlp.experts[1]
    with torch.no_grad():
        expert.up_proj.weight.mul_(10)  # a wider range than gate_proj's
    for linear in expert.modules():
        linear.quantization_status = QuantizationStatus.FROZEN  # as after calibration
    quantize_round_to_nearest([expert])
    gate, up = expert.gate_proj, expert.up_proj
    assert torch.equal(gate.weight_global_scale, up.weight_global_scale)
    assert not hasattr(gate, "weight_observer") and not hasattr(up, "weight_observer")
    assert torch.isfinite(expert.down_proj.weight_scale.float()).all()


@pytest.mark.slow
def test_nvfp4_routed_starves_experts_and_the_fill_repairs_them(tmp_path, tokenizer):
    """oneshot NVFP4 with routed-only calibration on a twin whose router bias is
    very uneven: some experts get no token, so their input_global_scale is never
    calibrated."""
    directory = build_tiny_like(
        "GLM-4.5-Air", tmp_path / "twin", tokenizer=tokenizer, bias_spread=1.0
    )
    model = AutoModelForCausalLM.from_pretrained(directory)
    data = tokenize_for_calibration(tokenizer, stdlib_texts(skip_files=100), 4, 32)
    ours = MoECalibrationModifier(mode="routed", rtn_fallback=True)
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=data,
        recipe=[
            ours,
            QuantizationModifier(
                targets=["Linear"],
                scheme="NVFP4",
                ignore=["lm_head", r"re:.*mlp\.gate$"],
            ),
        ],
        num_calibration_samples=4,
        max_seq_length=32,
    )
    starved = ours.coverage_report.rtn_fallback
    assert starved, "the uneven bias starves nobody: raise bias_spread"
    modules = dict(model.named_modules())
    # uninitialized memory may hold anything; make it the zero it often is
    for name in starved:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            modules[f"{name}.{proj}"].input_global_scale.data.zero_()
    with pytest.raises(
        ValueError, match=rf"{starved[0]}\.gate_proj\.input_global_scale"
    ):
        check_quantized_tensors(model)

    done = fill_starved_activation_qparams(model, starved)
    assert len(done) == 3 * len(starved)
    for name in starved:
        block = name.rpartition(".")[0]
        peers = [
            f"{block}.{child}"
            for child, _ in modules[block].named_children()
            if child.isdigit() and f"{block}.{child}" not in starved
        ]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            value = modules[f"{name}.{proj}"].input_global_scale
            widest = min(
                modules[f"{p}.{proj}"].input_global_scale.item() for p in peers
            )
            assert torch.isfinite(value).all() and value.item() > 0
            assert value.item() == widest
    check_quantized_tensors(model)
