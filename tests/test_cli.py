import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import CoverageReport, recipes
from llmcompressor_moe_plugins.cli import main


def test_recipes_lists_every_shipped_recipe_via_python_m():
    result = subprocess.run(
        [sys.executable, "-m", "llmcompressor_moe_plugins", "recipes"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in recipes.names():
        assert name in result.stdout
    assert "GPTQ W4A16" in result.stdout


def test_plugins_lists_our_modules(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "Glm4MoeMoE" in out and "CalibrationGlm4MoeMoE" in out
    assert "MoeLayer" in out and "llmcompressor-moe-plugins" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model"], "no config.json"),
        (["--recipe", "no_such_recipe"], "No shipped recipe named 'no_such_recipe'"),
        (["--recipe", "missing.yaml"], "does not exist"),
        (["--mode", "sometimes"], "Unknown calibration mode"),
        (["--mode", "affinity:2"], "strength must be in"),
        (["--block-mode", "Glm4MoeMoE"], "expected CLASS=MODE"),
        (["--dataset", "/nonexistent.txt"], "does not exist"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(argv, message, tmp_path, capsys):
    assert main(["quantize", "--output", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_recipe_without_quantization_modifier(tmp_path, capsys):
    recipe = tmp_path / "smooth_only.yaml"
    recipe.write_text(
        "default_stage:\n  default_modifiers:\n    MoECalibrationModifier: {}\n"
    )
    assert main(["quantize", "--recipe", str(recipe), "--output", str(tmp_path)]) == 2
    assert "has no quantization modifier" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path):
    output = tmp_path / "out"
    code = main(
        ["quantize", "--output", str(output), "--num-samples", "4", "--seq-len", "64"]
    )
    assert code == 0
    report = CoverageReport.from_dict(
        json.loads((output / "coverage.json").read_text())
    )
    assert report.blocks
    for block in report.blocks:  # the default mode, affinity-sampled
        assert block.mode == "affinity:0.1"
        assert sum(block.routed) == 4 * 64 * 2
        assert all(c >= r for c, r in zip(block.calibrated, block.routed, strict=True))
        assert sum(block.calibrated) > sum(block.routed)
    assert (output / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_starved_experts_fail_then_fall_back(textbook_dir, tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    common = [
        "quantize",
        "--model",
        str(textbook_dir),
        "--recipe",
        "moe_layer_w4a16_gptq",
        "--dataset",
        str(text),
        "--num-samples",
        "1",
        "--seq-len",
        "4",
        "--routed-only",
    ]
    failed = tmp_path / "failed"
    assert main([*common, "--output", str(failed)]) == 2
    assert "fewer than 1 calibration token" in capsys.readouterr().err
    assert not (failed / "model.safetensors").exists()
    starved = CoverageReport.from_dict(
        json.loads((failed / "coverage.json").read_text())
    )
    assert starved.undercalibrated()

    fallback = tmp_path / "fallback"
    assert main([*common, "--rtn-fallback", "--output", str(fallback)]) == 0
    report = json.loads((fallback / "coverage.json").read_text())
    assert report["rtn_fallback"] == starved.undercalibrated()
    # RTN gave the starved experts real scales: the checkpoint reloads and runs
    model = AutoModelForCausalLM.from_pretrained(fallback)
    expert = report["rtn_fallback"][0].removeprefix("model.") + ".gate_proj"
    scale = model.model.get_submodule(expert).weight_scale
    assert torch.isfinite(scale).all() and (scale > 1e-6).all()
