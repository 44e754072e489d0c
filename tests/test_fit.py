"""Every shipped GLM4 recipe on the tiny twin of every real GLM layout.

``fit_schemes_to_model`` runs where MoECalibrationModifier.on_initialize will call
it (before the quantization modifiers initialize), through a test subclass until
the modifier calls it itself.
"""

import json

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationMixin, QuantizationModifier
from llmcompressor.recipe import Recipe
from loguru import logger
from transformers import AutoModelForCausalLM, Glm4MoeForCausalLM

from llmcompressor_moe_plugins import MoECalibrationModifier, recipes
from llmcompressor_moe_plugins.checkpoint.fit import fit_schemes_to_model, unfit_linears
from llmcompressor_moe_plugins.real_configs import (
    build_tiny_like,
    names,
    tiny_config_like,
)
from llmcompressor_moe_plugins.tiny import stdlib_texts, tokenize_for_calibration
from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

from .helpers import relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_SAMPLES, SEQ_LEN = 4, 32
AIR_DENSE_DOWN = "model.layers.0.mlp.down_proj"
# relative logit error of the quantized model vs the original (random init): the
# bounds catch a zeroed or garbage layer, not quantization noise
MAX_RELATIVE_ERROR = {"w4a16": 0.35, "w8a8": 0.05, "nvfp4": 0.4}


def recipe_modifiers(name: str, fit_policy: str = "ignore") -> list:
    modifiers = list(Recipe.create_instance(str(recipes.path(name))).modifiers)
    assert isinstance(modifiers[0], MoECalibrationModifier)
    return [MoECalibrationModifier(scheme_fit=fit_policy)] + modifiers[1:]


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tokenizer):
    built = {}

    def get(name):
        if name not in built:
            directory = tmp_path_factory.mktemp(name.replace(".", "_"))
            built[name] = build_tiny_like(name, directory, tokenizer=tokenizer)
        return built[name]

    return get


@pytest.fixture(scope="module")
def small_data(tokenizer):
    return tokenize_for_calibration(
        tokenizer, stdlib_texts(skip_files=100), NUM_SAMPLES, SEQ_LEN
    )


def linearized_twin(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(tiny_config_like(name, **overrides))
    linearize_moe(model)
    return model


# --- unit: what the fit changes, without calibration ---------------------------


@pytest.mark.parametrize("name", ["GLM-4.5", "GLM-4.6", "GLM-4.7"])
def test_multiples_of_128_need_no_change(name):
    model = linearized_twin(name)
    for recipe in recipes.names():
        if not recipe.startswith("glm4_moe"):
            continue
        modifiers = recipe_modifiers(recipe)[1:]
        ignored = [list(getattr(m, "ignore", [])) for m in modifiers]
        assert fit_schemes_to_model(model, modifiers) == [], recipe
        assert [list(getattr(m, "ignore", [])) for m in modifiers] == ignored


def test_air_dense_down_proj_is_kept_unquantized_under_group_128():
    model = linearized_twin("GLM-4.5-Air")
    for recipe in ("glm4_moe_w4a16_gptq", "glm4_moe_w4a16_awq"):
        modifiers = recipe_modifiers(recipe)[1:]
        quantizer = next(m for m in modifiers if isinstance(m, QuantizationMixin))
        assert [n for n, _, _ in unfit_linears(model, quantizer)] == [AIR_DENSE_DOWN]
        changes = fit_schemes_to_model(model, modifiers)
        assert changes[0].modifier == type(quantizer).__name__
        assert changes[0].modules == (AIR_DENSE_DOWN,)
        assert changes[0].widths == (192,)
        assert "int4 group_size 128" in changes[0].scheme
        assert "unquantized" in changes[0].action
        assert AIR_DENSE_DOWN in quantizer.ignore
        assert AIR_DENSE_DOWN in quantizer.resolved_config.ignore
        assert unfit_linears(model, quantizer) == []
        if recipe == "glm4_moe_w4a16_awq":
            # AWQ cannot balance up_proj -> down_proj once down_proj stays float
            assert [c.modifier for c in changes] == [
                "QuantizationModifier",
                "AWQModifier",
            ]
            assert changes[1].modules == (AIR_DENSE_DOWN,)
            assert "model.layers.0.mlp.up_proj" in changes[1].action
        else:
            assert len(changes) == 1
        # a second call finds nothing left to do
        assert fit_schemes_to_model(model, modifiers) == []
    for recipe in ("glm4_moe_w8a8_int8", "glm4_moe_nvfp4"):
        assert fit_schemes_to_model(model, recipe_modifiers(recipe)[1:]) == []


def test_regroup_gives_the_largest_marlin_group_that_divides():
    model = linearized_twin("GLM-4.5-Air")
    gptq = recipe_modifiers("glm4_moe_w4a16_gptq")[1]
    changes = fit_schemes_to_model(model, [gptq], policy="regroup")
    assert "group_size 64" in changes[0].action
    assert AIR_DENSE_DOWN not in gptq.ignore
    groups = gptq.resolved_config.config_groups
    assert groups["fit_group_0"].targets == [AIR_DENSE_DOWN]
    assert groups["fit_group_0"].weights.group_size == 64
    assert groups["fit_group_0"].weights.actorder == "static"
    assert groups["group_0"].weights.group_size == 128


def test_nvfp4_width_not_multiple_of_16_is_kept_unquantized_or_raises():
    # a dense width of 200 (= 12 x 16 + 8) fits no NVFP4 group; no group size helps
    model = linearized_twin("GLM-4.5-Air", intermediate_size=200)
    nvfp4 = recipe_modifiers("glm4_moe_nvfp4")[1]
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj.*200") as error:
        fit_schemes_to_model(model, [nvfp4], policy="raise")
    assert "Choices" in str(error.value) and "multiples of 16" in str(error.value)
    assert nvfp4.ignore == ["lm_head", r"re:.*mlp\.gate$"]

    changes = fit_schemes_to_model(model, [nvfp4], policy="regroup")
    assert [c.modules for c in changes] == [(AIR_DENSE_DOWN,)]
    assert "tensor_group group_size 16" in changes[0].scheme
    assert AIR_DENSE_DOWN in nvfp4.ignore


@pytest.mark.parametrize(
    ("width", "group_size", "strategy"),
    [(192, 64, "group"), (160, 32, "group"), (200, None, "channel")],
)
def test_experts_get_one_scheme_that_fits_them_all(width, group_size, strategy):
    # experts whose down_proj W4A16's group of 128 does not divide: vLLM's fused
    # MoE takes one scheme per layer (expert 0's) and transformers decompresses
    # every expert with one group, so all experts of the model get the largest
    # of vLLM's MoE group sizes dividing every width, else per channel
    model = linearized_twin("GLM-4.5", moe_intermediate_size=width)
    gptq = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])
    changes = fit_schemes_to_model(model, [gptq])
    (experts,) = [c for c in changes if ".experts." in c.modules[0]]
    assert len(experts.modules) == 2 * 8 * 3  # two MoE layers, 8 experts
    assert {m.rsplit(".", 1)[1] for m in experts.modules} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    groups = gptq.resolved_config.config_groups
    assert list(groups)[0] == "fit_group_experts"  # what transformers reads first
    fitted = groups["fit_group_experts"].weights
    assert (fitted.group_size, fitted.strategy) == (group_size, strategy)
    assert not any(".experts." in name for name in gptq.ignore)
    # shared experts are plain Linears to vLLM: only their down_proj changes
    shared = [c.modules for c in changes if "shared_experts" in c.modules[0]]
    if width % 128:
        assert shared == [
            ("model.layers.3.mlp.shared_experts.down_proj",),
            ("model.layers.4.mlp.shared_experts.down_proj",),
        ]


def test_experts_no_scheme_of_vllm_fits_stop_before_calibration():
    model = linearized_twin("GLM-4.5", moe_intermediate_size=200)
    nvfp4 = QuantizationModifier(targets=["Linear"], scheme="NVFP4", ignore=["lm_head"])
    with pytest.raises(ValueError, match="scheme_fit cannot fit them") as error:
        fit_schemes_to_model(model, [nvfp4])
    assert "\n" not in str(error.value)


def test_a_fit_that_leaves_nothing_to_quantize_stops_naming_scheme_fit():
    model = linearized_twin("GLM-4.5-Air")
    gptq = GPTQModifier(targets=[AIR_DENSE_DOWN], scheme="W4A16")
    with pytest.raises(ValueError, match="scheme_fit 'ignore' keeps every Linear"):
        fit_schemes_to_model(model, [gptq])


def test_the_change_is_logged_and_bypass_is_respected():
    model = linearized_twin("GLM-4.5-Air")
    lines = []
    handle = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        fit_schemes_to_model(model, recipe_modifiers("glm4_moe_w4a16_gptq")[1:])
    finally:
        logger.remove(handle)
    assert any(
        AIR_DENSE_DOWN in line and "192" in line and "unquantized" in line
        for line in lines
    ), lines
    gptq = GPTQModifier(scheme="W4A16", bypass_divisibility_checks=True)
    assert fit_schemes_to_model(model, [gptq]) == []
    assert gptq.ignore == []


def test_policy_is_checked():
    with pytest.raises(ValueError, match="policy"):
        fit_schemes_to_model(torch.nn.Linear(2, 2), [], policy="nope")


def test_awq_mappings_resolve_on_every_twin():
    """NOTES: upstream's GLM AWQ mappings fail with first_k_dense_replace >= 1;
    the shipped recipe's own mappings close each layer on its own norm."""
    for name in names("glm4_moe"):
        model = linearized_twin(name)
        awq, quantizer = recipe_modifiers("glm4_moe_w4a16_awq")[1:]
        fit_schemes_to_model(model, [awq, quantizer])
        QuantizationMixin.initialize_quantization(quantizer, model)
        awq._set_resolved_mappings(model)
        smooth = [m.smooth_name for m in awq._resolved_mappings]
        layers = model.config.num_hidden_layers
        dense_up = "model.layers.0.mlp.up_proj"
        # the Air twin's dense down_proj stays unquantized: that pair is dropped
        assert (dense_up in smooth) == (name != "GLM-4.5-Air"), name
        assert "model.layers.1.mlp.shared_experts.up_proj" in smooth or name != (
            "GLM-4.5-Air"
        )
        for layer in range(layers):
            prefix = f"model.layers.{layer}."
            assert f"{prefix}input_layernorm" in smooth, (name, layer)
            assert f"{prefix}post_attention_layernorm" in smooth, (name, layer)
        norm_mappings = [
            m for m in awq._resolved_mappings if m.smooth_name.endswith("layernorm")
        ]
        assert len(norm_mappings) == 2 * layers


# --- end to end: oneshot, save compressed, reload ------------------------------


def run(recipe, model_dir, tokenizer, data, fit_policy="ignore"):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    modifiers = recipe_modifiers(recipe, fit_policy)
    with cpu_only_calibration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=data,
            recipe=modifiers,
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=SEQ_LEN,
        )
    return model, modifiers[0]._fit_changes


# GLM-4.6's and GLM-4.7's twins are GLM-4.5's (only the context length differs,
# and twins take 512 positions): test_twins_of_4_5_4_6_4_7_are_one_model
CASES = [
    ("GLM-4.5-Air", "glm4_moe_w4a16_gptq", "ignore"),
    ("GLM-4.5-Air", "glm4_moe_w4a16_gptq", "regroup"),
    ("GLM-4.5-Air", "glm4_moe_w4a16_awq", "ignore"),
    ("GLM-4.5-Air", "glm4_moe_w8a8_int8", "ignore"),
    ("GLM-4.5-Air", "glm4_moe_nvfp4", "ignore"),
    ("GLM-4.5", "glm4_moe_w4a16_gptq", "ignore"),
]


def test_twins_of_4_5_4_6_4_7_are_one_model():
    twin = tiny_config_like("GLM-4.5").to_dict()
    for name in ("GLM-4.6", "GLM-4.7"):
        assert tiny_config_like(name).to_dict() == twin, name


@pytest.mark.slow
@pytest.mark.parametrize(("name", "recipe", "policy"), CASES)
def test_shipped_recipe_on_twin(
    name, recipe, policy, twins, tokenizer, small_data, tmp_path
):

    model_dir = twins(name)
    model, changes = run(recipe, model_dir, tokenizer, small_data, policy)
    scheme = recipe.split("_")[2]
    x = torch.tensor(small_data[0]["input_ids"])[None]
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = original(x).logits
        error = relative_error(model(x).logits, expected)
    assert error < MAX_RELATIVE_ERROR[scheme], error
    model.save_pretrained(tmp_path, save_compressed=True)
    if scheme == "w4a16":
        # transformers reloads (and decompresses) int4 GLM4 checkpoints
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            error = relative_error(reloaded(x).logits, expected)
        assert error < MAX_RELATIVE_ERROR[scheme], error

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    groups = config["config_groups"]
    fitted = name == "GLM-4.5-Air" and scheme == "w4a16"
    expected = [(AIR_DENSE_DOWN,)] if fitted else []
    if fitted and recipe.endswith("awq") and policy == "ignore":
        expected.append((AIR_DENSE_DOWN,))  # and AWQ no longer balances it
    assert [c.modules for c in changes] == expected
    if fitted and policy == "ignore":
        assert AIR_DENSE_DOWN in config["ignore"]
        assert len(groups) == 1
    elif fitted:  # regroup: one checkpoint, two int4 schemes
        assert AIR_DENSE_DOWN not in config["ignore"]
        by_size = {g["weights"]["group_size"]: g["targets"] for g in groups.values()}
        assert by_size == {128: ["Linear"], 64: [AIR_DENSE_DOWN]}
        assert {g["format"] for g in groups.values()} == {"pack-quantized"}
    else:
        assert AIR_DENSE_DOWN not in config["ignore"]
        # compressed-tensors lists the routers (mlp.gate); nothing else is left out
        left_out = [n for n in config["ignore"] if n.startswith("model.layers.")]
        assert all(n.endswith(".mlp.gate") for n in left_out), left_out
