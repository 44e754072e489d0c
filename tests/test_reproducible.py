"""Same inputs and seed, byte-identical checkpoints.

The unseeded source was the calibration sampler's shuffling: llmcompressor's
``RandomSampler`` has no generator and draws its seed from torch's global CPU
generator, which torch seeds from the OS in every process (``seeding.py``).
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from llmcompressor_moe_plugins.calibration.seeding import (
    restore_global_rng,
    seed_calibration_order,
    seed_calibration_sampler,
)

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES, SEQ_LEN = 8, 64


def shuffled_loader(generator=None) -> DataLoader:
    data = list(range(32))
    return DataLoader(data, sampler=RandomSampler(data, generator=generator))


def order(loader: DataLoader) -> list[int]:
    return [int(batch) for batch in loader]


# -- fast -------------------------------------------------------------------------


def test_seeded_sampler_gives_the_same_order_whatever_the_global_state():
    first, second = shuffled_loader(), shuffled_loader()
    assert seed_calibration_sampler(first, 7)
    assert seed_calibration_sampler(second, 7)
    torch.manual_seed(1)
    a = order(first)
    torch.manual_seed(2)
    b = order(second)
    assert a == b and a != sorted(a)


def test_sampler_with_a_generator_or_no_random_sampler_is_left_alone():
    own = torch.Generator().manual_seed(3)
    loader = shuffled_loader(own)
    assert not seed_calibration_sampler(loader, 7)
    assert loader.sampler.generator is own
    assert not seed_calibration_sampler(DataLoader(list(range(4))), 7)  # sequential
    assert not seed_calibration_sampler(None, 7)


def test_modifiers_get_a_copy_of_the_calibration_loader():
    """Why seeding the sampler in ``state.data.calib`` is not enough: llmcompressor
    0.14's session keeps a deep copy, and the pipeline iterates the original."""
    from llmcompressor.core import State

    loader = shuffled_loader()
    state = State()
    state.update(calib_data=loader)
    assert state.data.calib is not loader
    assert state.data.calib.sampler is not loader.sampler


def test_seeding_the_order_reaches_a_copied_loader_and_is_undone():
    before = torch.get_rng_state()
    original = shuffled_loader()
    previous = seed_calibration_order(5, dataloader=None)
    first = order(original)
    restore_global_rng(previous)
    assert torch.equal(torch.get_rng_state(), before)

    torch.manual_seed(123)  # another process: another global state
    previous = seed_calibration_order(5, dataloader=None)
    second = order(shuffled_loader())
    restore_global_rng(previous)
    assert first == second

    copy = shuffled_loader()
    restore_global_rng(seed_calibration_order(5, dataloader=copy))
    assert copy.sampler.generator is not None
    restore_global_rng(None)  # nothing saved: nothing to do


# -- slow: whole runs in separate processes ---------------------------------------

WIRED = (
    "seed_calibration_order"
    in (REPO / "llmcompressor_moe_plugins" / "modifier.py").read_text()
)
needs_wiring = pytest.mark.skipif(
    not WIRED,
    reason="MoECalibrationModifier does not call seeding.seed_calibration_order "
    "yet (on_initialize), so the calibration order is unseeded",
)

PYTHON_RUN = f"""
import sys, datasets, llmcompressor_moe_plugins
from llmcompressor import oneshot
from llmcompressor_moe_plugins import recipes
model, data, out = sys.argv[1:4]
oneshot(
    model=model,
    dataset=datasets.load_from_disk(data),
    recipe=recipes.path("glm4_moe_w4a16_gptq"),
    output_dir=out,
    num_calibration_samples={NUM_SAMPLES},
    max_seq_length={SEQ_LEN},
)
"""


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-8000:]


@pytest.fixture(scope="module")
def saved_calibration_data(calibration_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("reproducible") / "calibration"
    calibration_data.save_to_disk(str(path))
    return path


@pytest.mark.slow
@needs_wiring
def test_two_python_api_runs_write_identical_checkpoints(
    glm4_dir, saved_calibration_data, tmp_path
):
    outputs = [tmp_path / "run1", tmp_path / "run2"]
    for output in outputs:  # one process each: fresh global random state
        run(
            [
                sys.executable,
                "-c",
                PYTHON_RUN,
                str(glm4_dir),
                str(saved_calibration_data),
                str(output),
            ],
            cwd=tmp_path,
        )
    first, second = (file_hashes(output) for output in outputs)
    assert "model.safetensors" in first
    assert first == second


@pytest.mark.slow
@needs_wiring
def test_two_cli_runs_write_identical_checkpoints(glm4_dir, tmp_path):
    outputs = [tmp_path / "run1", tmp_path / "run2"]
    for output in outputs:
        run(
            [
                sys.executable,
                "-m",
                "llmcompressor_moe_plugins",
                "quantize",
                "--model",
                str(glm4_dir),
                "--output",
                str(output),
                "--num-samples",
                str(NUM_SAMPLES),
                "--seq-len",
                str(SEQ_LEN),
            ],
            cwd=tmp_path,
        )
    first, second = (file_hashes(output) for output in outputs)
    assert "model.safetensors" in first
    assert first == second
