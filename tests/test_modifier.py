import pytest
from llmcompressor.modeling.moe.context import moe_calibration_context as upstream_flag
from llmcompressor.pipelines.registry import CalibrationPipeline
from llmcompressor.recipe import Recipe

from llmcompressor_moe_plugins import MoECalibrationModifier
from llmcompressor_moe_plugins.modifier import DEFAULT_MODE


def test_yaml_recipe_names_the_modifier_and_its_fields():
    recipe = Recipe.create_instance(
        "default_stage:\n  default_modifiers:\n"
        "    MoECalibrationModifier:\n      mode: 'top_k:4'\n"
        "      block_modes: {Glm4MoeMoE: routed}\n"
    )
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, MoECalibrationModifier)
    assert modifier.mode == "top_k:4" and modifier.block_modes == {
        "Glm4MoeMoE": "routed"
    }


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mode": "sometimes"}, "mode"),
        ({"block_modes": {"Glm4MoeMoE": "top_k:0"}}, "block_modes\\['Glm4MoeMoE'\\]"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"calibrat_all_experts": True}, "calibrat_all_experts"),
        ({"mode": {"affinity": 1.5}}, "strength must be in"),
    ],
)
def test_bad_fields_fail_at_parse_time_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MoECalibrationModifier(**fields)


def test_floor_and_min_tokens_follow_the_mode():
    with upstream_flag():  # oneshot's default, moe_calibrate_all_experts=True
        default = MoECalibrationModifier()
        assert (default.resolved_floor(), default.resolved_min_tokens()) == (16, 16)
        chosen = MoECalibrationModifier(mode="routed")
        assert (chosen.resolved_floor(), chosen.resolved_min_tokens()) == (0, 1)
        # the default mode spelled out is a choice: no floor unless asked
        spelled = MoECalibrationModifier(mode="affinity:0.1")
        assert (spelled.resolved_floor(), spelled.resolved_min_tokens()) == (0, 1)
        both = MoECalibrationModifier(mode="top_k:4", floor=16, min_tokens=8)
        assert (both.resolved_floor(), both.resolved_min_tokens()) == (16, 8)


def test_affinity_strength_spelled_as_a_yaml_mapping():
    recipe = Recipe.create_instance(
        "default_stage:\n  default_modifiers:\n"
        "    MoECalibrationModifier:\n      mode: {affinity: 0.25}\n"
    )
    (modifier,) = recipe.modifiers
    assert modifier.mode == {"affinity": 0.25}


def test_mode_resolution_default_flag_and_explicit_settings():
    with upstream_flag():  # oneshot's default, moe_calibrate_all_experts=True
        assert MoECalibrationModifier().resolved_mode() == DEFAULT_MODE
        assert MoECalibrationModifier(mode="top_k:4").resolved_mode() == "top_k:4"
        assert (
            MoECalibrationModifier(calibrate_all_experts=True).resolved_mode() == "all"
        )
    # oneshot(moe_calibrate_all_experts=False) asks for routed calibration
    assert MoECalibrationModifier().resolved_mode() == "routed"
    assert MoECalibrationModifier(mode="all").resolved_mode() == "all"


def test_modifier_gets_the_data_free_pipeline():
    # under oneshot's independent pipeline this means no calibration pass of its own
    assert CalibrationPipeline._infer_pipeline([MoECalibrationModifier()]) == "datafree"


@pytest.mark.slow
def test_modifier_adds_no_forward_pass(glm4_dir, tokenizer, calibration_data):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    from llmcompressor_moe_plugins.upstream.compat import cpu_only_calibration

    def q_proj_calls(with_ours: bool) -> int:
        model = AutoModelForCausalLM.from_pretrained(glm4_dir)
        calls = []
        model.model.layers[2].self_attn.q_proj.register_forward_pre_hook(
            lambda *_: calls.append(1)
        )
        recipe = [GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])]
        if with_ours:
            recipe.insert(0, MoECalibrationModifier(mode="routed", rtn_fallback=True))
        with cpu_only_calibration():
            oneshot(
                model=model,
                processor=tokenizer,
                dataset=calibration_data,
                recipe=recipe,
                num_calibration_samples=len(calibration_data),
                max_seq_length=64,
                moe_calibrate_all_experts=False,
            )
        return len(calls)

    upstream = q_proj_calls(with_ours=False)
    # one calibration and one propagation forward per sample, with or without ours
    assert upstream == 2 * len(calibration_data)
    assert q_proj_calls(with_ours=True) == upstream
