"""The CLI and model families: the family's recipe when none is named, the
recipes listed by family, and families whose checkpoints cannot be written
refused from the config alone, before any weight loads."""

import json
import subprocess
import sys

import pytest

from llmcompressor_moe_plugins import recipes
from llmcompressor_moe_plugins.cli import main
from llmcompressor_moe_plugins.cli.args import DEFAULT_RECIPE, build_parser
from llmcompressor_moe_plugins.cli.recipe import choose_recipe, recipe_choice_line

from .families import save_tiny


def parse(*argv):
    return build_parser().parse_args(["quantize", *argv])


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("qwen3_moe", "qwen3_moe_w4a16_gptq"),
        ("deepseek_v3", "deepseek_v3_w4a16_gptq"),
        ("mixtral", "mixtral_w4a16_gptq"),
        ("glm4_moe", "glm4_moe_w4a16_gptq"),
        ("olmoe", DEFAULT_RECIPE),  # no recipe shipped for the family
    ],
)
def test_the_family_recipe_is_picked_when_none_is_named(tmp_path, model_type, expected):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    args = parse("--model", str(tmp_path))
    assert choose_recipe(args) == expected
    line = recipe_choice_line(args)
    assert line.startswith(f"No --recipe: using {expected} (") and model_type in line
    named = parse("--model", str(tmp_path), "--recipe", "glm4_moe_nvfp4")
    assert choose_recipe(named) == "glm4_moe_nvfp4"
    assert recipe_choice_line(named) is None


def test_a_vlm_config_is_read_by_its_text_model(tmp_path):
    config = {"model_type": "qwen3_vl_moe", "text_config": {"model_type": "qwen3_moe"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert choose_recipe(parse("--model", str(tmp_path))) == "qwen3_moe_w4a16_gptq"


def test_recipes_are_listed_by_family_with_each_default_first(capsys):
    assert main(["recipes"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    listed = {(row[0], row[1]) for row in rows}
    for model_type, names in recipes.families().items():
        for name in names:
            assert (model_type, name) in listed
        first = next(row for row in rows if row[0] == model_type)
        assert first[1] == recipes.default_for(model_type) and first[2] == "(default)"


def test_a_fused_checkpoint_family_is_refused_before_its_weights_load(
    tmp_path, tokenizer
):
    source = save_tiny("gpt_oss", tmp_path / "gpt_oss", tokenizer)
    (source / "model.safetensors").write_bytes(b"not weights")  # never read
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcompressor_moe_plugins",
            "quantize",
            "--model",
            str(source),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "gpt_oss: its checkpoints store" in errors[0]
    assert "refuses it before calibrating" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_checkpoint_that_fails_its_check_is_not_written(
    tmp_path, tokenizer, monkeypatch, capsys
):
    from llmcompressor_moe_plugins.checkpoint import verify

    from .test_family_checkpoints import expert_width_overrides

    overrides = expert_width_overrides("qwen3_moe", 128)
    source = save_tiny("qwen3_moe", tmp_path / "model", tokenizer, **overrides)
    monkeypatch.setattr(
        verify, "checkpoint_problems", lambda *a, **k: ["missing on load: x.weight"]
    )
    output = tmp_path / "out"
    argv = ["quantize", "--model", str(source), "--output", str(output)]
    assert main([*argv, "--num-samples", "2", "--seq-len", "16"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "missing on load: x.weight" in errors[0]
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
