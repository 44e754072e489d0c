"""The CLI as a user meets it.

Every error ends with exit code 2 and exactly one stderr line that names the bad
value and the fix, before any heavy work (checked by ``no_heavy_work``, which fails
the test if weights are loaded, the tiny model is built or oneshot runs).
Hub access is mocked or served from a fake hub cache: there is no network here.
"""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM

from llmcompressor_moe_plugins import CoverageReport, cli, recipes, tiny
from llmcompressor_moe_plugins.cli import datasets as cli_datasets
from llmcompressor_moe_plugins.cli import main
from llmcompressor_moe_plugins.cli import models as cli_models
from llmcompressor_moe_plugins.cli import quantize as cli_quantize
from llmcompressor_moe_plugins.cli import saving as cli_saving
from llmcompressor_moe_plugins.cli.hub import ModelSource
from llmcompressor_moe_plugins.modifier import DEFAULT_FLOOR, DEFAULT_MODE

ERROR = "llmcompressor-moe: error: "


def error_line(capsys) -> str:
    """The one stderr line of a refused run."""
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(ERROR), err
    return err[0]


@pytest.fixture
def no_heavy_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the checks finished")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(tiny, "build_tiny_glm4_moe", forbidden)
    monkeypatch.setattr(cli_quantize, "calibrate", forbidden)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty hub cache of our own."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    """Online mode with an empty hub cache; tests mock the hub's answers."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    return cache


def add_to_hub_cache(cache: Path, repo_id: str, model_dir: Path, revision="main"):
    """Lay ``model_dir`` out in the hub cache as huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = f"{abs(hash(revision)):040x}"[:40]
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer):
    """A tiny GLM4 whose every layer is dense: no MoE block."""
    return tiny.build_tiny_glm4_moe(
        tmp_path_factory.mktemp("dense"), tokenizer=tokenizer, first_k_dense_replace=3
    )


@pytest.fixture
def text_file(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    return text


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


# -- item 3: bad input stops before any work, exit 2, one line ---------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such"),
        (["--recipe", "no_such_recipe"], "No shipped recipe named 'no_such_recipe'"),
        (["--recipe", "missing.yaml"], "does not exist"),
        (["--mode", "sometimes"], "Unknown calibration mode"),
        (["--mode", "affinity:2"], "strength must be in"),
        (["--block-mode", "Glm4MoeMoE"], "expected CLASS=MODE"),
        (["--dataset", "/nonexistent.txt"], "does not exist"),
        (["--dataset", "./missing_dir"], "--dataset ./missing_dir: that file"),
        (["--num-samples", "0"], "--num-samples 0: must be 1 or more"),
        (["--num-samples", "-5"], "--num-samples -5: must be 1 or more"),
        (["--seq-len", "0"], "--seq-len 0: must be 1 or more, e.g. --seq-len 128"),
        (["--min-tokens", "-1"], "--min-tokens -1: must be 0 or more"),
        (["--num-samples", "many"], "invalid int value: 'many'"),
        (["--revision", "v1"], "--revision v1 applies to a hub --model"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv, message, tmp_path, capsys, no_heavy_work
):
    output = tmp_path / "out"
    assert main(["quantize", "--output", str(output), *argv]) == 2
    assert message in error_line(capsys)
    assert not output.exists()


@pytest.mark.parametrize("spec", ["min_tokens:-1", "top_k:0", "affinity:-0.5"])
def test_negative_thresholds_in_modes_are_refused(
    spec, tmp_path, capsys, no_heavy_work
):
    assert main(["quantize", "--output", str(tmp_path / "o"), "--mode", spec]) == 2
    assert f"--mode {spec}:" in error_line(capsys)


def test_distributed_without_torchrun_names_the_missing_variables(
    tmp_path, capsys, monkeypatch, no_heavy_work
):
    from llmcompressor_moe_plugins.distributed import TORCHRUN_VARIABLES

    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    output = tmp_path / "out"
    assert main(["quantize", "--distributed", "--output", str(output)]) == 2
    line = error_line(capsys)
    assert "RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set" in line
    assert "torchrun --nproc_per_node=N" in line
    assert not output.exists()
    assert not torch.distributed.is_initialized()


def test_recipe_without_quantization_modifier(tmp_path, capsys, no_heavy_work):
    recipe = tmp_path / "smooth_only.yaml"
    recipe.write_text(
        "default_stage:\n  default_modifiers:\n    MoECalibrationModifier: {}\n"
    )
    output = tmp_path / "out"
    assert main(["quantize", "--recipe", str(recipe), "--output", str(output)]) == 2
    assert "has no quantization modifier" in error_line(capsys)


@pytest.mark.parametrize("bare", ["MoECalibrationModifier", "GPTQModifier"])
def test_bare_modifier_entry_says_write_braces(bare, tmp_path, capsys, no_heavy_work):
    entries = {
        "MoECalibrationModifier": "{}",
        "GPTQModifier": "{targets: [Linear], scheme: W4A16}",
    }
    entries[bare] = ""
    recipe = tmp_path / "bare.yaml"
    recipe.write_text(
        "default_stage:\n  default_modifiers:\n"
        + "".join(f"    {name}: {value}\n" for name, value in entries.items())
    )
    output = tmp_path / "out"
    assert main(["quantize", "--recipe", str(recipe), "--output", str(output)]) == 2
    line = error_line(capsys)
    assert f"modifier `{bare}` has no arguments" in line
    assert f"write `{bare}: {{}}`" in line
    assert "NoneType" not in line


def test_recipe_that_is_not_yaml(tmp_path, capsys, no_heavy_work):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("default_stage:\n  default_modifiers: [\n")
    assert main(["quantize", "--recipe", str(recipe), "--output", str(tmp_path)]) == 2
    assert "is not valid YAML at line" in error_line(capsys)


def test_block_mode_class_not_in_model_names_its_classes(
    glm4_dir, tmp_path, capsys, no_heavy_work
):
    argv = ["quantize", "--output", str(tmp_path / "out")]
    assert main([*argv, "--model", str(glm4_dir), "--block-mode", "MoeLayer=all"]) == 2
    line = error_line(capsys)
    assert "--block-mode MoeLayer=all: the model has no block of class MoeLayer" in line
    assert "its MoE block classes: Glm4MoeMoE" in line
    # the embedded default is checked from its config, before it is built
    assert main([*argv, "--block-mode", "Qwen3MoeSparseMoeBlock=all"]) == 2
    assert "its MoE block classes: Glm4MoeMoE" in error_line(capsys)


def test_dense_model_is_refused_without_allow_dense(
    dense_dir, tmp_path, capsys, no_heavy_work
):
    output = tmp_path / "out"
    assert main(["quantize", "--model", str(dense_dir), "--output", str(output)]) == 2
    line = error_line(capsys)
    assert f"--model {dense_dir} has no MoE block" in line
    assert "pass --allow-dense" in line
    assert not output.exists()


def test_moe_block_classes_without_plan_calibration(glm4_dir, monkeypatch):
    """The check works from ``context.plan_calibration`` and, where that does
    not exist, from modules with experts and a gate or router."""
    from llmcompressor_moe_plugins.calibration import context

    config = cli_models.model_config(ModelSource(str(glm4_dir)))
    model = cli_models.meta_model(config, "glm4")
    planned = cli_models.moe_block_classes(model)
    monkeypatch.delattr(context, "plan_calibration", raising=False)
    assert cli_models.moe_block_classes(model) == planned == ["Glm4MoeMoE"] * 2


# -- item 2: the output directory is checked first ---------------------------------


def test_output_that_is_a_file(glm4_dir, tmp_path, capsys, no_heavy_work):
    target = tmp_path / "model.bin"
    target.write_text("not a directory")
    argv = ["quantize", "--model", str(glm4_dir), "--output", str(target)]
    assert main(argv) == 2
    assert f"--output {target} is a file" in error_line(capsys)
    assert target.read_text() == "not a directory"


def test_output_that_cannot_be_created(glm4_dir, capsys, no_heavy_work):
    argv = ["quantize", "--model", str(glm4_dir), "--output", "/proc/foo"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "--output /proc/foo: cannot create a directory in /proc" in line
    assert "pass a writable location" in line


def test_non_empty_output_needs_overwrite(glm4_dir, tmp_path, capsys, no_heavy_work):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    argv = ["quantize", "--model", str(glm4_dir), "--output", str(target)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"--output {target} is not empty (1 entries)" in line
    assert "pass --overwrite" in line
    assert [p.name for p in target.iterdir()] == ["old.safetensors"]


def test_overwrite_never_deletes_the_model_it_reads(
    glm4_dir, tmp_path, capsys, no_heavy_work
):
    model = tmp_path / "model"
    shutil.copytree(glm4_dir, model)
    argv = ["quantize", "--model", str(model), "--output", str(tmp_path), "--overwrite"]
    assert main(argv) == 2
    assert "holds the model directory" in error_line(capsys)
    assert (model / "config.json").is_file()


def run_without_calibration(monkeypatch, save=None):
    """Load the model but skip oneshot; ``save`` replaces the checkpoint save."""
    monkeypatch.setattr(cli_quantize, "calibrate", lambda *args, **kwargs: None)
    if save is not None:
        monkeypatch.setattr(cli_saving, "save_checkpoint", save)


def save_plain(model, tokenizer, report, directory, source=None, **_):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def old_checkpoint(path: Path) -> dict[str, bytes]:
    path.mkdir()
    files = {"config.json": b"{}", "stale.safetensors": b"old weights"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def no_temp_dirs_beside(path: Path) -> bool:
    return not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def test_interrupt_during_save_keeps_the_old_checkpoint(
    textbook_dir, text_file, tmp_path, monkeypatch, capsys
):
    def interrupted(model, tokenizer, report, directory, source=None, **_):
        model.config.save_pretrained(directory)  # a first file, then Ctrl-C
        assert (directory / "config.json").is_file()
        assert directory.parent == tmp_path and ".tmp-" in directory.name
        raise KeyboardInterrupt

    target = tmp_path / "out"
    before = old_checkpoint(target)
    run_without_calibration(monkeypatch, save=interrupted)
    argv = ["quantize", "--model", str(textbook_dir), "--recipe",
            "moe_layer_w4a16_gptq", "--dataset", str(text_file), "--num-samples",
            "1", "--seq-len", "8", "--output", str(target), "--overwrite"]  # fmt: skip
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err.splitlines()[-1]
    assert contents(target) == before
    assert no_temp_dirs_beside(target)

    # and with no old checkpoint, nothing at all is left
    fresh = tmp_path / "fresh"
    argv[argv.index(str(target))] = str(fresh)
    assert main(argv) == 130
    assert not fresh.exists() and no_temp_dirs_beside(fresh)


def test_failed_save_keeps_the_old_checkpoint(
    textbook_dir, text_file, tmp_path, monkeypatch
):
    def disk_full(model, tokenizer, report, directory, source=None, **_):
        (directory / "model-00001-of-00002.safetensors").write_text("partial")
        raise OSError(28, "No space left on device")

    target = tmp_path / "out"
    before = old_checkpoint(target)
    run_without_calibration(monkeypatch, save=disk_full)
    argv = ["quantize", "--model", str(textbook_dir), "--recipe",
            "moe_layer_w4a16_gptq", "--dataset", str(text_file), "--num-samples",
            "1", "--seq-len", "8", "--output", str(target), "--overwrite"]  # fmt: skip
    with pytest.raises(OSError, match="No space left"):
        main(argv)
    assert contents(target) == before
    assert no_temp_dirs_beside(target)


# -- item 1: hub IDs ---------------------------------------------------------------


def test_hub_id_offline_and_not_cached(tmp_path, capsys, offline_hub, no_heavy_work):
    output = tmp_path / "out"
    argv = ["quantize", "--model", "zai-org/GLM-4.5-Air", "--output", str(output)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "--model zai-org/GLM-4.5-Air: the Hugging Face Hub cannot be reached" in line
    assert "HF_HUB_OFFLINE" in line
    assert "pass a local model directory" in line and "--model DIR" in line
    assert not output.exists()


def test_hub_id_without_network(tmp_path, capsys, online_hub, no_heavy_work):
    output = tmp_path / "out"
    argv = ["quantize", "--model", "zai-org/GLM-4.5-Air", "--output", str(output)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "the Hugging Face Hub cannot be reached (" in line
    assert "Name or service not known" in line
    assert "pass a local model directory" in line


def test_hub_id_that_does_not_exist(tmp_path, capsys, online_hub, monkeypatch):
    def not_found(self, repo_id, **kwargs):
        request = httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError(
            "404", response=httpx.Response(404, request=request)
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    argv = ["quantize", "--model", "no-org/no-model", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "--model no-org/no-model: no model of that name on the Hugging Face Hub" in (
        line
    )


def test_hub_id_is_resolved_from_the_cache_with_its_revision(
    glm4_dir, tmp_path, capsys, offline_hub, no_heavy_work
):
    add_to_hub_cache(offline_hub, "fake-org/tiny-glm4", glm4_dir, revision="v1")
    output = tmp_path / "out"
    argv = ["quantize", "--model", "fake-org/tiny-glm4", "--output", str(output)]
    # the config came from the cache: the block check names the model's classes
    assert main([*argv, "--revision", "v1", "--block-mode", "Nope=all"]) == 2
    assert "its MoE block classes: Glm4MoeMoE" in error_line(capsys)
    assert main([*argv, "--revision", "v2"]) == 2
    line = error_line(capsys)
    assert "fake-org/tiny-glm4 at revision v2 is not in the local cache" in line


def test_hub_id_loads_like_transformers_loads_it(
    textbook_dir, text_file, tmp_path, offline_hub, monkeypatch, capsys
):
    """A hub ID (from the hub cache, at a revision) is loaded and written; an
    --overwrite replaces the old directory as a whole (the stale file goes)."""
    add_to_hub_cache(offline_hub, "fake-org/textbook-moe", textbook_dir, "v1")
    run_without_calibration(monkeypatch, save=save_plain)
    target = tmp_path / "out"
    old_checkpoint(target)
    argv = ["quantize", "--model", "fake-org/textbook-moe", "--revision", "v1",
            "--recipe", "moe_layer_w4a16_gptq", "--dataset", str(text_file),
            "--num-samples", "1", "--seq-len", "8", "--output", str(target),
            "--overwrite"]  # fmt: skip
    assert main(argv) == 0
    assert "stale.safetensors" not in contents(target)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        contents(target)
    )
    assert no_temp_dirs_beside(target)
    loaded = AutoModelForCausalLM.from_pretrained(target)
    original = AutoModelForCausalLM.from_pretrained(textbook_dir)
    for (name, a), (_, b) in zip(
        loaded.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    err = capsys.readouterr().err
    assert "fake-org/textbook-moe@v1 (hub cache)" in err


# -- item 1/3: datasets ------------------------------------------------------------


def test_hub_dataset_offline(tmp_path, capsys, offline_hub, no_heavy_work):
    argv = ["quantize", "--output", str(tmp_path / "o"), "--dataset", "open_platypus"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert (
        "--dataset open_platypus (garage-bAInd/Open-Platypus): the Hugging Face "
        in (line)
    )
    assert "cannot be reached" in line
    assert "pass local .txt/.jsonl files or a local dataset directory" in line


def test_hub_dataset_without_network(tmp_path, capsys, online_hub, no_heavy_work):
    argv = ["quantize", "--output", str(tmp_path / "o"), "--dataset", "org/corpus"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "--dataset org/corpus: the Hugging Face Hub cannot be reached" in line
    assert "Name or service not known" in line
    assert "pass local .txt/.jsonl files" in line


def test_local_dataset_directory(tmp_path, tokenizer):
    from datasets import Dataset

    directory = tmp_path / "corpus"
    Dataset.from_dict({"content": ["x = 1\n" * 200, "y = 2\n" * 200]}).save_to_disk(
        directory
    )
    args = cli.build_parser().parse_args(
        [
            "quantize",
            "--dataset",
            str(directory),
            "--text-column",
            "content",
            "--num-samples",
            "2",
            "--seq-len",
            "16",
        ]  # fmt: skip
    )
    source = cli_datasets.dataset_source(args)
    dataset = cli_datasets.calibration_dataset(source, tokenizer, args)
    assert dataset.num_rows == 2 and len(dataset[0]["input_ids"]) == 16

    args.text_column = "text"
    with pytest.raises(cli.CliError, match="has no column 'text'.*content"):
        cli_datasets.calibration_dataset(
            cli_datasets.dataset_source(args), tokenizer, args
        )


def test_too_little_text_is_refused_before_loading_weights(
    textbook_dir, text_file, tmp_path, capsys, no_heavy_work
):
    argv = ["quantize", "--model", str(textbook_dir), "--recipe",
            "moe_layer_w4a16_gptq", "--dataset", str(text_file),
            "--num-samples", "1000", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert "Pass more text or fewer samples" in error_line(capsys)


# -- item 4: quiet by default -------------------------------------------------------


def emit_like_a_run():
    from loguru import logger

    upstream = logger.patch(lambda r: r.update(name="llmcompressor.pipelines.x"))
    ours = logger.patch(lambda r: r.update(name="llmcompressor_moe_plugins.cli"))
    ours.info("Calibrating (our stage line)")
    for _ in range(3):
        upstream.warning("An upstream warning, repeated")
    upstream.info("Compression lifecycle reset")
    upstream.log("METRIC", "error 0.01")
    ours.debug("a detail of ours")


@pytest.mark.parametrize("verbose", [False, True])
def test_console_output_quiet_by_default_everything_with_v(verbose, capsys):
    from llmcompressor_moe_plugins.cli.logs import cli_logging

    with pytest.warns(UserWarning) as python_warnings:
        with cli_logging(verbose=verbose):
            emit_like_a_run()
            for _ in range(2):
                warnings.warn("A Python warning, repeated", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.count("Calibrating (our stage line)") == 1
    assert err.count("An upstream warning, repeated") == (3 if verbose else 1)
    assert len(python_warnings) == (2 if verbose else 1)
    for detail in ("Compression lifecycle reset", "error 0.01", "a detail of ours"):
        assert (detail in err) == verbose
    assert ("3 repeated or not applicable warning(s) not shown" in err) != verbose


# -- full runs (slow) --------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_end_to_end_quietly(tmp_path):
    """The README's main command, as a user runs it: the checkpoint and its
    coverage are written; one line per stage; upstream's repeated warnings once;
    no per-Linear METRIC lines."""
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "llmcompressor_moe_plugins", "quantize",
         "--output", str(output), "--num-samples", "4", "--seq-len", "64"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert printed.count("No accelerator available") <= 1
    assert "METRIC" not in printed and "Quantizing 1 module(s)" not in printed
    for stage in ("building a tiny GLM4-MoE", "Loading the tiny GLM4-MoE",
                  "Calibrating with", "Saving the quantized model"):  # fmt: skip
        assert printed.count(stage) == 1, stage
    assert "written to" in result.stdout

    report = CoverageReport.from_dict(
        json.loads((output / "coverage.json").read_text())
    )
    assert report.blocks
    for block in report.blocks:  # the default mode: routed + the floor
        assert block.mode == DEFAULT_MODE
        assert sum(block.routed) == 4 * 64 * 2
        assert all(c >= r for c, r in zip(block.calibrated, block.routed, strict=True))
        assert min(block.calibrated) >= DEFAULT_FLOOR
    assert (output / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "recipe.yaml").is_file()
    assert no_temp_dirs_beside(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_allow_dense_goes_on_and_verbose_shows_everything(
    dense_dir, text_file, tmp_path, capfd
):
    output = tmp_path / "dense"
    argv = ["quantize", "--model", str(dense_dir), "--dataset", str(text_file),
            "--num-samples", "2", "--seq-len", "32", "--output", str(output),
            "--allow-dense"]  # fmt: skip
    assert main([*argv, "-v"]) == 0
    out, err = capfd.readouterr()
    assert "No MoE block found in" in err and "the plugin does nothing" in err
    assert "METRIC" in err  # upstream's per-Linear lines, at -v only
    # shown at -v (how often upstream repeats it depends on what this process
    # ran before: its first warning is printed at import)
    assert "No accelerator available" in err
    assert "dense: no coverage report" in out
    assert (output / "config.json").is_file()
    assert not (output / "coverage.json").exists()


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
    # the failed run stopped in the first layer with starved experts, before
    # calibrating the next: it reports that layer only
    assert {name.rpartition(".experts.")[0] for name in starved.undercalibrated()} == {
        starved.blocks[-1].name
    }
    assert set(starved.undercalibrated()) <= set(report["rtn_fallback"])
    # RTN gave the starved experts real scales: the checkpoint reloads and runs
    model = AutoModelForCausalLM.from_pretrained(fallback)
    expert = report["rtn_fallback"][0].removeprefix("model.") + ".gate_proj"
    scale = model.model.get_submodule(expert).weight_scale
    assert torch.isfinite(scale).all() and (scale > 1e-6).all()


def emit_like_glm_45_air(experts: int, layers: int = 46):
    """Every per-layer and per-expert line source of a GLM-4.5-Air-sized run:
    llmcompressor's two METRIC lines per quantized Linear, our shared-Hessian
    line per expert chunk, upstream's repeated warnings, the not-applicable
    ones (MTP, linearization, torch.fx) and a torch logging warning per layer."""
    import logging

    from loguru import logger

    upstream = logger.patch(lambda r: r.update(name="llmcompressor.modifiers.x"))
    tensors = logger.patch(lambda r: r.update(name="compressed_tensors.utils.mtp"))
    stats = logger.patch(
        lambda r: r.update(name="llmcompressor_moe_plugins.statistics.x")
    )
    ours = logger.patch(lambda r: r.update(name="llmcompressor_moe_plugins.cli"))
    ours.info("Calibrating (our stage line)")
    for layer in range(layers):
        upstream.warning("Detected an MoE model which has not been linearized.")
        logging.getLogger("torch.fx._symbolic_trace").warning(
            "is_fx_tracing will return true for both fx.symbolic_trace and export"
        )
        for expert in range(experts):
            for linear in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{expert}.{linear}"
                upstream.log("METRIC", f"GPTQ {name}: error 0.01")
                upstream.log("METRIC", "time 0.10s")
            stats.debug(f"Quantized 2 module(s) against one shared Hessian: {name}")
    tensors.warning("Could not find MTP weights with prefix mtp")
    ours.info("Saving (our stage line)")


@pytest.mark.parametrize("verbose", [False, True])
def test_line_count_does_not_grow_with_experts(verbose, capsys):
    """46 layers of line sources: quiet, the console gets the same few lines
    for 2 experts as for 128 (no per-expert, per-Linear or not-applicable
    lines); -v gets every one of them."""
    from llmcompressor_moe_plugins.cli.logs import cli_logging

    counts = {}
    for experts in (2, 128):
        with cli_logging(verbose=verbose):
            emit_like_glm_45_air(experts)
        err = capsys.readouterr().err
        counts[experts] = len(err.splitlines())
        assert ("MTP" in err) == verbose  # no MTP warning on a model without MTP
    if verbose:
        assert counts[128] > 46 * 128 * 7
    else:
        assert counts[2] == counts[128] == 3  # two stage lines, one closing line


@pytest.fixture
def plain_gptq_recipe(tmp_path):
    """The shipped GPTQ recipe with plain GPTQModifier, as a user's own."""
    shipped = recipes.get("glm4_moe_w4a16_gptq")
    assert "SharedHessianGPTQModifier:" in shipped
    plain = tmp_path / "plain_gptq.yaml"
    plain.write_text(shipped.replace("SharedHessianGPTQModifier:", "GPTQModifier:"))
    return plain


@pytest.mark.parametrize(
    "flags",
    [["--mode", "weighted:2,prior:0.05"], ["--block-mode", "Glm4MoeMoE=weighted:1"]],
)
def test_chosen_weighted_mode_with_plain_gptq_stops_as_in_python(
    flags, plain_gptq_recipe, tmp_path, capsys, no_heavy_work
):
    """What Python does with this recipe (tests/test_weighted.py: a ValueError
    before calibrating), the CLI does before loading anything: never a swap."""
    output = tmp_path / "out"
    argv = ["quantize", "--recipe", str(plain_gptq_recipe), "--output", str(output)]
    assert main([*argv, *flags]) == 2
    line = error_line(capsys)
    assert "only SharedHessianGPTQModifier accumulates" in line
    assert "Rename it to SharedHessianGPTQModifier" in line
    assert not output.exists()


def test_default_mode_with_plain_gptq_keeps_the_recipe(plain_gptq_recipe):
    """The default calibrates unweighted under plain GPTQModifier, as in
    Python: the CLI runs the recipe's modifiers as written."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    from llmcompressor_moe_plugins.cli.recipe import load_recipe_modifiers

    args = cli.build_parser().parse_args(["quantize"])
    modifiers = load_recipe_modifiers(str(plain_gptq_recipe), args)
    assert [type(m) for m in modifiers if isinstance(m, GPTQModifier)] == [GPTQModifier]


@pytest.mark.parametrize(
    ("label", "applied"),
    [
        ("SharedHessianGPTQModifier", "weighted:2"),
        (
            "GPTQModifier",
            "weighted:2 (unweighted under GPTQModifier: use "
            "SharedHessianGPTQModifier for the weights)",
        ),
        (
            "AWQModifier, QuantizationModifier",
            "weighted:2 (unweighted under AWQModifier, QuantizationModifier)",
        ),
    ],
)
def test_report_says_what_was_applied(label, applied, tmp_path):
    """The log's settings line and coverage.json say the same words."""
    from llmcompressor_moe_plugins.reporting.coverage import (
        BlockCoverage,
        CalibrationPass,
    )

    block = BlockCoverage("m.l.1.mlp", "B", "C", "weighted:2", [5, 3], [21, 16], 16)
    report = CoverageReport([CalibrationPass(label, [block])], min_tokens=16)
    assert f"mode {applied}; floor 16" in report.format_table()
    written = json.loads(report.save_json(tmp_path / "coverage.json").read_text())
    assert written["passes"][0]["applied"] == applied
    assert CoverageReport.from_dict(written).blocks == [block]  # still reads


def test_plugins_table_keeps_its_columns_with_long_module_paths(plugin_path, capsys):
    from tests.helpers import install_fake_distribution

    long_module = "fake_plugin_long." + "very_long_package_name." * 3 + "module"
    install_fake_distribution(
        plugin_path,
        "fake-plugin-long",
        {"VeryLongMoeBlockClassName": f"{long_module}:CalibrationVeryLong"},
        {},
    )
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    column = header.index("distribution")
    for line in lines[1:]:
        if line.strip() and not line.lstrip().startswith("(shadowed"):
            assert line[column - 1] == " " and line[column] != " ", line
