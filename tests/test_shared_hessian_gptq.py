"""SharedHessianGPTQModifier: one Hessian per MoE block input in all-expert mode,
quantized weights as GPTQ's own within GPTQ's own re-run noise."""

import pytest
import torch
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq import base as gptq_base
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier, SharedHessianGPTQModifier
from llmcompressor_moe_plugins.statistics import shared_hessian_gptq

from .helpers import calibrate, relative_error

pytestmark = pytest.mark.slow

NUM_SAMPLES, SEQ_LEN = 8, 64
MOE_LAYERS = ("model.layers.1.", "model.layers.2.")


def quantize(
    glm4_dir,
    tokenizer,
    data,
    gptq_cls,
    mode="all",
    chunk_size="auto",
    scheme="W4A16",
    **gptq_fields,
):
    model = AutoModelForCausalLM.from_pretrained(glm4_dir)
    recipe = [
        MoECalibrationModifier(mode=mode, chunk_size=chunk_size),
        gptq_cls(targets=["Linear"], scheme=scheme, ignore=["lm_head"], **gptq_fields),
    ]
    calibrate(model, tokenizer, data, recipe, SEQ_LEN)
    return model


def quantized_linears(model) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale")
    }


def is_shared_member(name: str) -> bool:
    # every routed and shared expert's input projections of the MoE layers
    return name.startswith(MOE_LAYERS) and name.endswith(("gate_proj", "up_proj"))


def is_routed_down_proj(name: str) -> bool:
    # observed from the experts' weights by batched all-expert forwards
    return name.startswith(MOE_LAYERS) and ".experts." in name and "down_proj" in name


def differing_fraction(first, second, names) -> float:
    differing = sum(int((first[n].weight != second[n].weight).sum()) for n in names)
    return differing / sum(first[n].weight.numel() for n in names)


# W4A16 (per-row group scales) quantizes the shared Linears stacked by rows;
# NVFP4A16 (per-tensor global scales) takes GPTQ's own batched path with the shared
# Hessian. With batched expert statistics (default) the routed experts' down_proj
# Hessians come from weight-computed forwards: equal up to rounding, like sharing.
@pytest.mark.parametrize(
    "scheme, batched",
    [("W4A16", True), ("NVFP4A16", True), ("W4A16", False)],
)
def test_weights_match_unshared_gptq_within_rerun_noise(
    scheme, batched, glm4_dir, tokenizer, calibration_data
):
    data = glm4_dir, tokenizer, calibration_data
    unshared = quantize(*data, GPTQModifier, scheme=scheme)
    shared = quantize(
        *data,
        SharedHessianGPTQModifier,
        scheme=scheme,
        batched_expert_statistics=batched,
    )
    # "GPTQ run twice": the same unshared path with expert calls chunked
    # differently, which only reorders the Hessian's floating-point sums
    rerun = quantize(*data, GPTQModifier, chunk_size=5, scheme=scheme)
    a, b, r = (quantized_linears(m) for m in (unshared, shared, rerun))
    assert a.keys() == b.keys()
    shared_members = [n for n in a if is_shared_member(n)]
    assert len(shared_members) == 2 * (2 * 16 + 2)  # 2 layers x (16 + shared) x 2
    down_projs = [n for n in a if is_routed_down_proj(n)]
    assert len(down_projs) == 2 * 16
    members = shared_members + (down_projs if batched else [])

    for name in a:  # observer qparams come from the weights alone: identical
        assert torch.equal(a[name].weight_scale, b[name].weight_scale), name
        assert torch.equal(a[name].weight_zero_point, b[name].weight_zero_point)
    # before the first MoE layer's output is quantized nothing else can differ:
    # everything of the first MoE layer outside the members is bit-identical
    first_layer_rest = [
        n for n in a if n.startswith(MOE_LAYERS[0]) and n not in members
    ]
    assert "model.layers.1.mlp.shared_experts.down_proj" in first_layer_rest
    for name in first_layer_rest:
        assert torch.equal(a[name].weight, b[name].weight), name

    noise = differing_fraction(a, r, members)
    shared_difference = differing_fraction(a, b, members)
    assert shared_difference <= max(3 * noise, 0.005), (shared_difference, noise)
    first_layer_members = [n for n in members if n.startswith(MOE_LAYERS[0])]
    for name in first_layer_members if scheme == "W4A16" else []:
        # same inputs, Hessians equal up to rounding: no weight moves by more than
        # one quantization step (later layers see already-different inputs)
        weight = a[name].weight
        scale = a[name].weight_scale.repeat_interleave(128, dim=1)[:, : weight.shape[1]]
        steps = (weight - b[name].weight).abs() / scale
        assert steps.max() <= 1.01, name

    original = AutoModelForCausalLM.from_pretrained(glm4_dir).eval()
    x = torch.tensor(calibration_data[0]["input_ids"])[None]
    with torch.no_grad():
        reference = original(x).logits
        unshared_logits = unshared(x).logits
        quantization_error = relative_error(unshared_logits, reference)
        sharing_error = relative_error(shared(x).logits, unshared_logits)
        rerun_error = relative_error(rerun(x).logits, unshared_logits)
    # the logits move no more than GPTQ's own re-run moves them (or, where the
    # re-run is bit-identical, by a small fraction of the quantization error)
    assert sharing_error <= max(3 * rerun_error, 0.1 * quantization_error), (
        sharing_error,
        rerun_error,
        quantization_error,
    )


def test_one_hessian_per_block_input(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    per_linear_modules: set[torch.nn.Module] = set()
    block_inputs: list[int] = []

    def count_per_linear(inp, module, hessian, num_samples):
        per_linear_modules.add(module)
        return accumulate(inp, module, hessian, num_samples)

    def count_shared(inp, module, hessian, num_samples):
        block_inputs.append(inp.reshape(-1, inp.shape[-1]).shape[0])
        return accumulate(inp, module, hessian, num_samples)

    accumulate = gptq_base.accumulate_hessian
    monkeypatch.setattr(gptq_base, "accumulate_hessian", count_per_linear)
    monkeypatch.setattr(shared_hessian_gptq, "accumulate_hessian", count_shared)
    model = quantize(glm4_dir, tokenizer, calibration_data, SharedHessianGPTQModifier)
    per_linear = {n for n, m in model.named_modules() if m in per_linear_modules}
    assert len(per_linear) == len(per_linear_modules)
    assert not any(is_shared_member(n) for n in per_linear)
    # routed experts are computed from their weights, so their down_proj is never
    # called: its Hessian comes from the batched forward (tested in tests/modules)
    assert not any(is_routed_down_proj(n) for n in per_linear)
    # what cannot share keeps its own Hessian: down_proj, attention, dense layer
    assert "model.layers.1.mlp.shared_experts.down_proj" in per_linear
    assert "model.layers.0.mlp.gate_proj" in per_linear
    assert "model.layers.2.self_attn.q_proj" in per_linear
    # one accumulation per MoE layer per calibration batch, over all its tokens
    assert block_inputs == [SEQ_LEN] * (2 * NUM_SAMPLES)


def test_other_modes_take_the_normal_path(
    glm4_dir, tokenizer, calibration_data, monkeypatch
):
    # routed plus a top-up, so no expert is starved: inputs differ per expert
    MODE = "min_tokens:4"
    plain = quantize(glm4_dir, tokenizer, calibration_data, GPTQModifier, MODE)
    calls = []
    monkeypatch.setattr(
        shared_hessian_gptq, "accumulate_hessian", lambda *a: calls.append(a)
    )
    shared = quantize(
        glm4_dir, tokenizer, calibration_data, SharedHessianGPTQModifier, MODE
    )
    assert calls == []
    a, b = quantized_linears(plain), quantized_linears(shared)
    for name in a:
        assert torch.equal(a[name].weight, b[name].weight), name


def test_recipes_name_it_with_gptq_fields():
    recipe = Recipe.create_instance(
        "default_stage:\n  default_modifiers:\n"
        "    MoECalibrationModifier: {mode: all}\n"
        "    SharedHessianGPTQModifier:\n"
        "      targets: [Linear]\n      scheme: W4A16\n      block_size: 64\n"
        "      rows_per_call: 4096\n"
    )
    _, modifier = recipe.modifiers
    assert isinstance(modifier, SharedHessianGPTQModifier)
    assert isinstance(modifier, GPTQModifier)
    assert (modifier.block_size, modifier.rows_per_call) == (64, 4096)


def test_batched_forwards_only_where_nothing_else_listens():
    modifier = SharedHessianGPTQModifier(targets=["Linear"], scheme="W4A16")
    linear = torch.nn.Linear(4, 4)
    assert modifier.accepts([linear])
    modifier.register_hook(linear, modifier.calibrate_module, "forward")
    assert modifier.accepts([linear])
    for register in (linear.register_forward_hook, linear.register_forward_pre_hook):
        other = register(lambda *args: None)  # e.g. an activation observer
        assert not modifier.accepts([linear])
        other.remove()
    linear.forward = lambda x: 2 * x  # a wrapper the weights alone do not show
    assert not modifier.accepts([linear])
    modifier.remove_hooks()


def test_static_activation_observers_keep_the_expert_calls(
    glm4_dir, tokenizer, calibration_data
):
    # FP8's static input scales are observed by hooks on every expert Linear, so
    # the experts must still be called: same result as with the path switched off
    data = glm4_dir, tokenizer, calibration_data
    runs = [
        quantized_linears(
            quantize(
                *data,
                SharedHessianGPTQModifier,
                scheme="FP8",
                batched_expert_statistics=batched,
            )
        )
        for batched in (True, False)
    ]
    down_proj = "model.layers.1.mlp.experts.3.down_proj"
    assert runs[0][down_proj].input_scale.item() > 0
    for name, module in runs[0].items():
        assert torch.equal(module.weight, runs[1][name].weight), name
        assert torch.equal(module.input_scale, runs[1][name].input_scale), name
