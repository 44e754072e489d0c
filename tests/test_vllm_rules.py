"""vLLM's MoE layout rules, checked on checkpoint files: each rule on a small
checkpoint written by hand that breaks it, and on one that keeps it. The shipped
recipes' and every family's real outputs are checked in tests/test_oneshot_glm4.py,
tests/test_fit.py and tests/test_family_checkpoints.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from llmcompressor_moe_plugins.checkpoint.vllm_rules import vllm_layout_violations

EXPERTS = "model.layers.1.mlp.experts"
W4A16 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
    "input_activations": None,
}
NVFP4 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"},
    "input_activations": {"num_bits": 4, "type": "float", "dynamic": "local"},
}
W8A8 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
    "input_activations": {"num_bits": 8, "type": "int", "dynamic": True},
}


def write(directory, groups, tensors, ignore=(), layers=2, mtp=0):
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": mtp,
        "quantization_config": {"config_groups": groups, "ignore": list(ignore)},
    }
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def experts(suffixes, count=2, leaves=("gate_proj", "up_proj", "down_proj")):
    return {
        f"{EXPERTS}.{index}.{leaf}.{suffix}": torch.ones(2)
        for index in range(count)
        for leaf in leaves
        for suffix in suffixes
    }


PACKED = ("weight_packed", "weight_scale", "weight_shape")


def test_a_kept_layout_has_no_violations(tmp_path):
    checkpoint = write(tmp_path / "ok", {"group_0": W4A16}, experts(PACKED))
    assert vllm_layout_violations(checkpoint, check_values=True) == []


def test_experts_of_one_layer_under_two_schemes(tmp_path):
    tensors = experts(PACKED)
    other = {**W4A16, "targets": [f"{EXPERTS}.1.down_proj"]}
    checkpoint = write(tmp_path / "c", {"group_0": W4A16, "group_1": other}, tensors)
    (problem,) = vllm_layout_violations(checkpoint)
    assert problem.startswith(f"{EXPERTS}: its experts resolve to 2 schemes")


def test_an_ignored_expert_in_a_quantized_layer(tmp_path):
    tensors = experts(PACKED)
    checkpoint = write(
        tmp_path / "c", {"group_0": W4A16}, tensors, ignore=[f"{EXPERTS}.0.up_proj"]
    )
    assert "resolve to 2 schemes" in vllm_layout_violations(checkpoint)[0]


def test_an_expert_without_its_schemes_tensors(tmp_path):
    tensors = experts(PACKED)
    del tensors[f"{EXPERTS}.1.up_proj.weight_scale"]
    checkpoint = write(tmp_path / "c", {"group_0": W4A16}, tensors)
    (problem,) = vllm_layout_violations(checkpoint)
    assert problem.startswith(f"{EXPERTS}.1.up_proj: holds")


@pytest.mark.parametrize("leaves", [("gate_proj", "up_proj"), ("w1", "w3")])
def test_nvfp4_gate_and_up_share_their_global_scale(tmp_path, leaves):
    suffixes = (*PACKED, "weight_global_scale", "input_global_scale")
    tensors = experts(suffixes, leaves=(*leaves, "down_proj"))
    checkpoint = write(tmp_path / "ok", {"group_0": NVFP4}, tensors)
    assert vllm_layout_violations(checkpoint) == []
    tensors[f"{EXPERTS}.1.{leaves[1]}.weight_global_scale"] = torch.full((2,), 2.0)
    checkpoint = write(tmp_path / "split", {"group_0": NVFP4}, tensors)
    (problem,) = vllm_layout_violations(checkpoint)
    assert problem == (
        f"{EXPERTS}: experts [1] have different gate and up weight_global_scale; "
        "vLLM fuses them and keeps gate's"
    )


def test_int8_experts_take_dynamic_activations_only(tmp_path):
    tensors = experts(("weight", "weight_scale"))
    assert vllm_layout_violations(write(tmp_path / "ok", {"g": W8A8}, tensors)) == []
    static = {**W8A8, "input_activations": {**W8A8["input_activations"]}}
    static["input_activations"]["dynamic"] = False
    tensors.update(experts(("input_scale",)))
    problems = vllm_layout_violations(
        write(tmp_path / "static", {"g": static}, tensors)
    )
    assert any("activations are static" in p for p in problems)
    assert any("static input_scale" in p for p in problems)


def test_mtp_layers_are_unquantized_and_ignored(tmp_path):
    mtp = "model.layers.2.eh_proj"
    kept = {**experts(PACKED), f"{mtp}.weight": torch.ones(2)}
    ok = write(tmp_path / "ok", {"g": W4A16}, kept, ignore=[mtp], mtp=1)
    assert vllm_layout_violations(ok) == []
    unlisted = write(tmp_path / "unlisted", {"g": W4A16}, kept, mtp=1)
    assert (
        "MTP Linears not in quantization_config.ignore"
        in (vllm_layout_violations(unlisted)[0])
    )
    packed = {**experts(PACKED), f"{mtp}.weight_packed": torch.ones(2)}
    packed[f"{mtp}.weight_scale"] = torch.ones(2)
    quantized = write(tmp_path / "quantized", {"g": W4A16}, packed, ignore=[mtp], mtp=1)
    assert "the MTP layer is stored quantized" in vllm_layout_violations(quantized)[0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_every_scale_finite_and_positive(tmp_path, bad):
    tensors = experts(PACKED)
    tensors[f"{EXPERTS}.1.down_proj.weight_scale"] = torch.tensor([1.0, bad])
    checkpoint = write(tmp_path / "c", {"g": W4A16}, tensors)
    assert vllm_layout_violations(checkpoint) == []  # values are read on request
    assert vllm_layout_violations(checkpoint, check_values=True) == [
        f"{EXPERTS}.1.down_proj.weight_scale: a scale that is not finite and > 0"
    ]


def test_a_bias_is_not_a_missing_qparam(tmp_path):
    # GLM-4.5-Air's attention has biases, its experts none: both hold their
    # scheme's quantization tensors, and only those are compared
    from llmcompressor_moe_plugins.checkpoint.verify import qparam_problems

    tensors = experts(PACKED)
    attention = "model.layers.1.self_attn.q_proj"
    tensors |= {f"{attention}.{s}": torch.ones(2) for s in (*PACKED, "bias")}
    checkpoint = write(tmp_path / "c", {"g": W4A16}, tensors)
    assert qparam_problems(checkpoint) == []
    del tensors[f"{attention}.weight_scale"]
    checkpoint = write(tmp_path / "missing", {"g": W4A16}, tensors)
    (problem,) = qparam_problems(checkpoint)
    assert problem.startswith("quantized Linears of scheme g without weight_scale")
    assert attention in problem
