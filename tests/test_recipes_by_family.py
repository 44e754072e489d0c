"""Shipped recipes by model family: the families()/default_for() API, and what each
family's recipes target and leave out, checked against the family's real modules.
Fast: no calibration (the end-to-end runs are in test_family_recipes.py)."""

import pytest
import torch
from compressed_tensors.utils.match import match_name
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.quantization import QuantizationMixin
from llmcompressor.recipe import Recipe

from llmcompressor_moe_plugins import MoECalibrationModifier, recipes
from llmcompressor_moe_plugins.checkpoint.fit import fit_schemes_to_model
from llmcompressor_moe_plugins.real_configs import names as real_names
from llmcompressor_moe_plugins.real_configs import tiny_config_like

from .families import build_tiny

NEW_FAMILIES = ("qwen3_moe", "deepseek_v3", "mixtral")
# the family's router, and shared-expert gate where it has one, at runtime
# (transformers 5.17 module names); none of them may be quantized
ROUTERS = {
    "qwen3_moe": "model.layers.0.mlp.gate",
    "qwen2_moe": "model.layers.0.mlp.gate",
    "deepseek_v3": "model.layers.1.mlp.gate",
    "mixtral": "model.layers.0.mlp.gate",
}
SHARED_EXPERT_GATE = "model.layers.0.mlp.shared_expert_gate"  # qwen2_moe / qwen3_next


def quantizer(name: str):
    modifiers = list(Recipe.create_instance(recipes.path(name)).modifiers)
    assert isinstance(modifiers[0], MoECalibrationModifier), name
    found = [m for m in modifiers if isinstance(m, QuantizationMixin)]
    assert len(found) == 1, name
    return found[0]


def ignored(modifier, name: str) -> bool:
    return any(match_name(name, pattern) for pattern in modifier.ignore)


def test_families_groups_every_shipped_recipe_by_model_type():
    assert recipes.families() == {
        "deepseek_v3": ["deepseek_v3_nvfp4", "deepseek_v3_w4a16_gptq"],
        "glm4_moe": [
            "glm4_moe_nvfp4",
            "glm4_moe_w4a16_awq",
            "glm4_moe_w4a16_gptq",
            "glm4_moe_w8a8_int8",
        ],
        "mixtral": ["mixtral_nvfp4", "mixtral_w4a16_gptq"],
        "qwen3_moe": ["qwen3_moe_nvfp4", "qwen3_moe_w4a16_gptq"],
        "textbook_moe": ["moe_layer_w4a16_awq", "moe_layer_w4a16_gptq"],
    }
    listed = [n for group in recipes.families().values() for n in group]
    assert sorted(listed) == recipes.names()


def test_family_keys_are_the_model_types_of_config_json():
    from transformers import CONFIG_MAPPING

    from llmcompressor_moe_plugins.models.textbook_moe import TextbookMoeConfig

    for model_type in recipes.families():
        assert model_type in CONFIG_MAPPING, model_type
    assert TextbookMoeConfig.model_type == "textbook_moe"
    for name in real_names():
        model_type = tiny_config_like(name).model_type
        assert model_type in recipes.families(), name


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("glm4_moe", "glm4_moe_w4a16_gptq"),
        ("qwen3_moe", "qwen3_moe_w4a16_gptq"),
        ("deepseek_v3", "deepseek_v3_w4a16_gptq"),
        ("mixtral", "mixtral_w4a16_gptq"),
        ("textbook_moe", "moe_layer_w4a16_gptq"),
        ("gpt_oss", None),
        ("llama", None),
    ],
)
def test_default_for_is_the_family_gptq_w4a16_recipe(model_type, expected):
    assert recipes.default_for(model_type) == expected
    if expected is not None:
        gptq = quantizer(expected)
        assert type(gptq).__name__ == "SharedHessianGPTQModifier"
        assert gptq.scheme == "W4A16" and gptq.actorder == "static"


def test_family_of_reads_the_name_and_refuses_a_name_without_scheme():
    assert recipes.family_of("qwen3_moe_nvfp4") == "qwen3_moe"
    assert recipes.family_of("deepseek_v3_w4a16_gptq.yaml") == "deepseek_v3"
    assert recipes.family_of("moe_layer_w4a16_awq") == "textbook_moe"
    with pytest.raises(ValueError, match=r"'my_recipe'.*<model_type>_<scheme>"):
        recipes.family_of("my_recipe")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_recipes_target_linears_and_ignore_head_and_router(family):
    """Class targets: vLLM resolves the experts' scheme under the checkpoint's names
    (Mixtral: experts.N.w1/w2/w3), which an expert-name regex would miss."""
    chosen = recipes.families()[family]
    assert {n.split(f"{family}_")[1] for n in chosen} == {"w4a16_gptq", "nvfp4"}
    for name in chosen:
        assert recipes.describe(name), name
        modifier = quantizer(name)
        assert modifier.targets == ["Linear"], name
        assert modifier.scheme == ("NVFP4" if name.endswith("nvfp4") else "W4A16")
        assert ignored(modifier, "lm_head"), name
        assert ignored(modifier, ROUTERS[family]), name
        for expert in ("gate_proj", "up_proj", "down_proj"):
            assert not ignored(modifier, f"model.layers.1.mlp.experts.3.{expert}")
        assert not ignored(modifier, "model.layers.1.self_attn.o_proj"), name
    if family == "mixtral":  # the checkpoint's name of the router too
        for name in chosen:
            assert ignored(quantizer(name), "model.layers.0.block_sparse_moe.gate")
    if family == "deepseek_v3":  # shared experts are quantized, as vLLM expects
        for name in chosen:
            shared = "model.layers.1.mlp.shared_experts.gate_proj"
            assert not ignored(quantizer(name), shared)


@pytest.mark.parametrize("name", ["qwen3_moe_w4a16_gptq", "qwen3_moe_nvfp4"])
def test_qwen_recipes_ignore_the_shared_expert_gate_of_qwen2_moe_layouts(name):
    model = build_tiny("qwen2_moe")
    modules = dict(model.named_modules())
    assert isinstance(modules[SHARED_EXPERT_GATE], torch.nn.Linear)
    assert ignored(quantizer(name), SHARED_EXPERT_GATE)
    assert ignored(quantizer(name), ROUTERS["qwen2_moe"])


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_router_names_are_the_runtime_module_names(family):
    """The names the recipes ignore exist in transformers 5.17's models."""
    model = build_tiny(family)
    modules = dict(model.named_modules())
    assert ROUTERS[family] in modules, sorted(modules)[:20]


@pytest.mark.parametrize("name", [n for n in real_names() if not n.startswith("GLM")])
def test_every_width_of_the_real_layouts_fits_their_recipes(name):
    """Every width of Qwen3-30B-A3B/235B-A22B, DeepSeek-V3 and Mixtral-8x7B is a
    multiple of 128: on their twins the recipes' scheme fit changes nothing."""
    import transformers

    config = tiny_config_like(name)
    torch.manual_seed(0)
    model_cls = {
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }[config.model_type]
    model = getattr(transformers, model_cls)(config)
    linearize_moe(model)
    for recipe in recipes.families()[config.model_type]:
        modifier = quantizer(recipe)
        assert fit_schemes_to_model(model, [modifier]) == [], (name, recipe)
