"""Models that carry their own code: ``--trust-remote-code`` reaches config,
model and tokenizer loading, an entry-point plugin calibrates their MoE blocks
from the CLI, and the errors on the way say everything (never cut off)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from llmcompressor_moe_plugins.cli import main
from llmcompressor_moe_plugins.models import textbook_moe

from .helpers import install_fake_distribution

ERROR = "llmcompressor-moe: error: "


def _own_code() -> str:
    """The textbook model under new names, as a file transformers does not know."""
    source = Path(textbook_moe.__file__).read_text()
    source = source.split("\nAutoConfig.register(")[0]  # not registered: remote
    source = source.replace("MoeLayer(", "RemoteMoeLayer(")
    return source.replace("Textbook", "RemoteCode").replace(
        "textbook_moe", "remote_code_moe"
    )


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("remote-code-model")
    code = directory / "modeling_remote_code.py"
    code.write_text(_own_code())
    spec = importlib.util.spec_from_file_location("_remote_code_build", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.RemoteCodeMoeConfig(vocab_size=len(tokenizer), num_local_experts=8)
    module.RemoteCodeMoeForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {
        "AutoConfig": "modeling_remote_code.RemoteCodeMoeConfig",
        "AutoModelForCausalLM": "modeling_remote_code.RemoteCodeMoeForCausalLM",
    }
    path.write_text(json.dumps(data))
    return directory


@pytest.fixture
def remote_plugin(plugin_path):
    install_fake_distribution(
        plugin_path,
        "fake-plugin-remote",
        {"RemoteMoeLayer": "fake_plugin_remote:CalibrationRemoteMoeLayer"},
        {
            "fake_plugin_remote": """
            from llmcompressor_moe_plugins.calibration.architectures.moe_layer import (
                CalibrationMoeLayer,
            )


            class CalibrationRemoteMoeLayer(CalibrationMoeLayer):
                pass
            """
        },
    )
    yield
    sys.modules.pop("fake_plugin_remote", None)


def _error(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR), err
    return err[0]


def test_own_code_without_the_flag_names_the_flag(remote_dir, tmp_path, capsys):
    argv = ["quantize", "--model", str(remote_dir), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    line = _error(capsys)
    assert "cannot read its config.json" in line
    assert "trust_remote_code=True" in line  # transformers' reason, in full
    assert line.endswith(
        "; pass --trust-remote-code if you trust the code in its directory"
    )


def test_unknown_architecture_error_is_not_cut_off(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    argv = ["quantize", "--model", str(model), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    line = _error(capsys)
    assert "no_such_arch" in line
    assert "your version of )" not in line
    reason = line.split("cannot read its config.json (", 1)[1]
    # transformers' whole reason, up to its last words, then our fix
    assert reason.endswith(
        "`pip install git+https://github.com/huggingface/transformers.git`); "
        "pass a model this transformers version supports"
    )
    assert line.endswith("; pass a model this transformers version supports")


def test_own_code_without_a_plugin_is_refused(remote_dir, tmp_path, capsys):
    argv = ["quantize", "--model", str(remote_dir), "--trust-remote-code"]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    line = _error(capsys)
    assert "has no MoE block this plugin can calibrate" in line
    assert "register one (README, 'Adding an architecture')" in line


def test_plugins_plan_shows_the_entry_point_module(remote_dir, remote_plugin, capsys):
    assert main(["plugins", "--model", str(remote_dir), "--trust-remote-code"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^RemoteMoeLayer +registered +2 ", out, re.MULTILINE), out


def test_entry_point_plugin_quantizes_a_remote_code_model(
    remote_dir, remote_plugin, tmp_path, capsys
):
    output = tmp_path / "out"
    argv = ["quantize", "--model", str(remote_dir), "--trust-remote-code"]
    argv += ["--mode", "all", "--num-samples", "4", "--seq-len", "32"]
    assert main([*argv, "--output", str(output)]) == 0, capsys.readouterr().err
    coverage = json.loads((output / "coverage.json").read_text())
    blocks = coverage["passes"][-1]["blocks"]
    assert {b["block_class"] for b in blocks} == {"RemoteMoeLayer"}
    assert {b["calibration_module"] for b in blocks} == {"CalibrationRemoteMoeLayer"}
    assert all(min(b["calibrated"]) == 4 * 32 for b in blocks)  # mode all
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        packed = [k for k in weights.keys() if k.endswith("weight_packed")]
    for block in blocks:
        for expert in range(8):
            assert any(f"{block['name']}.experts.{expert}." in k for k in packed)
