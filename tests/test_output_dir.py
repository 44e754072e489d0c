"""A checkpoint directory is complete or absent (issue: the CLI as a user meets it)."""

import os
import stat

import pytest

from llmcompressor_moe_plugins.checkpoint.output_dir import (
    OutputDirError,
    atomic_output_dir,
    check_output_dir,
    leftover_temp_dirs,
)


def write(directory, files):
    for name, text in files.items():
        (directory / name).write_text(text)


def contents(directory):
    return {p.name: p.read_text() for p in directory.iterdir()}


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_new_target_appears_only_when_the_body_finished(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".out.tmp-")
        write(staging, {"config.json": "{}"})
        assert not target.exists()
    assert contents(target) == {"config.json": "{}"}
    assert siblings(target) == ["out"]
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's 0700


def test_empty_target_is_used(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with atomic_output_dir(target) as staging:
        write(staging, {"config.json": "{}"})
    assert contents(target) == {"config.json": "{}"}


def test_non_empty_target_needs_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    write(target, {"old.bin": "old"})
    with pytest.raises(OutputDirError, match="not empty .*--overwrite"):
        check_output_dir(target)
    with pytest.raises(OutputDirError), atomic_output_dir(target):
        pass
    assert contents(target) == {"old.bin": "old"}


def test_overwrite_replaces_as_a_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    write(target, {"config.json": "old", "stale.safetensors": "old"})
    with atomic_output_dir(target, overwrite=True) as staging:
        write(staging, {"config.json": "new"})
        assert contents(target)["config.json"] == "old"  # untouched until the end
    assert contents(target) == {"config.json": "new"}
    assert siblings(target) == ["out"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("old", [True, False])
def test_interrupt_or_error_leaves_old_content_or_nothing(tmp_path, error, old):
    target = tmp_path / "out"
    if old:
        target.mkdir()
        write(target, {"config.json": "old"})
    with pytest.raises(error), atomic_output_dir(target, overwrite=True) as staging:
        write(staging, {"config.json": "new", "model-00001.safetensors": "half"})
        raise error
    if old:
        assert contents(target) == {"config.json": "old"}
    else:
        assert not target.exists()
    assert siblings(target) == (["out"] if old else [])


def test_target_that_is_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(target)


def test_target_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file, so no directory"):
        check_output_dir(tmp_path / "file" / "out")


def test_target_where_nothing_can_be_created():
    with pytest.raises(OutputDirError, match="cannot create a directory in /proc"):
        check_output_dir("/proc/foo")


def test_target_holding_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(OutputDirError, match="holds the current directory"):
        check_output_dir(tmp_path, overwrite=True)


def test_check_creates_nothing(tmp_path):
    target = tmp_path / "a" / "out"
    assert check_output_dir(target) == target
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_found(tmp_path):
    target = tmp_path / "out"
    (tmp_path / ".out.tmp-abc123").mkdir()
    (tmp_path / ".other.tmp-abc123").mkdir()
    assert leftover_temp_dirs(target) == [tmp_path / ".out.tmp-abc123"]
