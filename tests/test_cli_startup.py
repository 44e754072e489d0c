"""A user's first seconds: usage and path errors come at once, before torch or
llmcompressor is imported, as one line with exit code 2; Ctrl-C at any moment
gives one line, exit code 130, and leaves --output as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "llmcompressor", "datasets")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_usage_error_within_two_seconds_one_line_exit_2():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "llmcompressor_moe_plugins", "quantize"]
        + ["--num-samples", "abc"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "llmcompressor-moe: error: argument --num-samples: invalid int value: "
        "'abc'; see `llmcompressor-moe quantize --help`"
    ]
    assert done.stdout == ""
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_argument_and_path_errors_import_nothing_heavy(tmp_path):
    """Every kind of cheap check, in one process: one line each, exit 2, and no
    heavy module imported by any of them."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"content": "no text field"}\n')
    out = str(tmp_path / "out")
    cases = [
        ["quantize", "--num-samples", "0"],
        ["quantize", "--floor", "-1"],
        ["quantize", "--block-mode", "Glm4MoeMoE"],
        ["quantize", "--revision", "v1"],
        ["quantize", "--recipe", str(tmp_path / "missing.yaml"), "--output", out],
        ["quantize", "--recipe", "no_such_recipe", "--output", out],
        ["quantize", "--output", str(a_file)],
        ["quantize", "--output", out, "--dataset", str(tmp_path / "missing.txt")],
        ["quantize", "--output", out, "--dataset", str(bad_jsonl)],
        ["quantize", "--output", out, "--model", str(tmp_path / "no-model")],
        ["quantize", "--output", out, "--model", str(a_file)],
        ["quantize", "--output", out, "--model", str(tmp_path)],  # no config.json
    ]
    script = (
        "import contextlib, io, json, sys\n"
        "from llmcompressor_moe_plugins.cli import main\n"
        f"cases = {cases!r}\n"
        "results = []\n"
        "for argv in cases:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(argv)\n"
        "    results.append([rc, err.getvalue()])\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'results': results, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["heavy"] == []
    for argv, (rc, err) in zip(cases, answer["results"], strict=True):
        lines = err.splitlines()
        assert rc == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("llmcompressor-moe: error:")
    assert not Path(out).exists()


def _start(args: list[str]) -> subprocess.Popen:
    """The CLI as a terminal starts it: with Ctrl-C's default disposition, also
    when the tests themselves run in the background of a shell (which starts
    them with SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    return subprocess.Popen(
        [sys.executable, "-m", "llmcompressor_moe_plugins", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_until_mapped(process: subprocess.Popen, library: str) -> None:
    """Until the process has loaded ``library`` (Linux: its memory map), so a
    signal lands while the heavy imports run, however slow the machine."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 120
    while library not in maps.read_text():
        assert process.poll() is None, "the CLI ended before loading " + library
        assert time.monotonic() < deadline, f"{library} never loaded"
        time.sleep(0.02)


def test_ctrl_c_while_importing_one_line_exit_130(tmp_path):
    output = tmp_path / "out"
    process = _start(["quantize", "--output", str(output)])
    # the cheap checks are done once torch loads (imports are lazy until then)
    _wait_until_mapped(process, "libtorch")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.splitlines() == ["llmcompressor-moe: interrupted"]
    assert not output.exists()


@pytest.mark.slow
def test_ctrl_c_while_calibrating_keeps_the_old_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "kept.txt").write_text("the previous checkpoint")
    process = _start(["quantize", "--output", str(output), "--overwrite"])
    lines = []
    for line in process.stderr:  # stage lines come one by one
        lines.append(line)
        if "Calibrating with" in line:
            time.sleep(2.0)
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 130
    err = "".join(lines) + rest
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "llmcompressor-moe: interrupted"
    assert sorted(p.name for p in output.iterdir()) == ["kept.txt"]
    assert (output / "kept.txt").read_text() == "the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left


def test_import_is_cheap_and_still_registers_for_yaml_recipes():
    """``import llmcompressor_moe_plugins`` imports nothing heavy, and a YAML
    recipe naming our modifiers (and the textbook model's model_type) still
    resolves afterwards, in a fresh process (nothing imported them before)."""
    script = (
        "import sys\n"
        "import llmcompressor_moe_plugins\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "from llmcompressor.recipe import Recipe\n"
        "from llmcompressor_moe_plugins import recipes\n"
        "path = recipes.path('glm4_moe_w4a16_gptq')\n"
        "names = [type(m).__name__ for m in Recipe.create_instance(path).modifiers]\n"
        "assert names == ['MoECalibrationModifier', 'SharedHessianGPTQModifier']\n"
        "from transformers import AutoConfig\n"
        "assert type(AutoConfig.for_model('textbook_moe')).__name__ == "
        "'TextbookMoeConfig'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
