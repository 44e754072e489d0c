"""Data-parallel calibration (torchrun) on CPU: our collectives with gloo, and
llmcompressor's distributed oneshot on a tiny GLM4-MoE against a one-process run.

Ranks are separate processes with torchrun's variables; each is killed after a
deadline so that a hang fails the test instead of the CI job. Collectives inside
the ranks time out after 30 s (gloo).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmcompressor_moe_plugins import distributed
from llmcompressor_moe_plugins.distributed import DistributedSetupError

from .distributed_checks import CHECKS
from .helpers import group_budget, linearized_expert

HERE = Path(__file__).parent
# from start to exit per rank group: imports take most of it on a loaded 2-core box
CHECKS_DEADLINE_S = 120
ONESHOT_DEADLINE_S = 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(argv: list[str], world_size: int, logs: Path, deadline: float):
    """Start ``world_size`` processes as torchrun would; kill them all at the
    deadline. Returns exit codes; logs are in ``logs/rankR.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        log = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(argv, env=env, stdout=log, stderr=log), log))
    end = time.monotonic() + deadline
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1.0, end - time.monotonic())))
    except subprocess.TimeoutExpired:
        tails = "\n".join(
            f"--- rank {r}:\n" + (logs / f"rank{r}.log").read_text()[-3000:]
            for r in range(world_size)
        )
        pytest.fail(f"ranks still running after {deadline} s (hang?)\n{tails}")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return codes


def rank_results(directory: Path, world_size: int, logs: Path | None = None):
    """Each rank's ``rank{R}.json``; a missing one fails with the rank's log."""
    results = []
    for rank in range(world_size):
        path = directory / f"rank{rank}.json"
        if not path.is_file():
            log = (logs or directory / "logs") / f"rank{rank}.log"
            tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
            pytest.fail(f"rank {rank} wrote no result in {directory}:\n{tail}")
        results.append(json.loads(path.read_text()))
    return results


# -- one process: no-ops, and the launch error --------------------------------------


def test_single_process_helpers_are_no_ops():
    counts = torch.tensor([3, 0, 1])
    assert distributed.world() == (0, 1)
    assert distributed.all_reduce_counts(counts) is counts
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.local_share(64) == 64
    assert distributed.require_data_on_every_rank(5) == 5
    with pytest.raises(DistributedSetupError, match="rank.s. 0 got no calibration"):
        distributed.require_data_on_every_rank(0)
    with pytest.raises(ValueError, match="own error"):
        with distributed.fail_together("a check"):
            raise ValueError("own error")
    hessians = {"b": torch.ones(2, 2), "a": torch.ones(2, 2)}
    counts_by_key = {"b": torch.tensor(1.0), "a": torch.tensor(1.0)}
    order = {"a": "a", "b": "b"}
    keys = distributed.align_statistics(hessians, counts_by_key, order, None)
    assert keys == ["b", "a"]  # untouched: nothing to agree with
    assert list(distributed.rank_slice(5)) == [0, 1, 2, 3, 4]
    assert distributed.rank_partition("train", 5) == "train[0:5]"


def test_distributed_without_torchrun_is_a_clear_error(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedSetupError) as err:
        distributed.init_distributed()
    message = str(err.value)
    assert "torchrun --nproc_per_node=N" in message
    assert "RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set" in (
        message
    )
    # no --distributed and no torchrun: one process, nothing initialized
    assert distributed.maybe_init_distributed(False) == (0, 1)
    with pytest.raises(DistributedSetupError):
        distributed.maybe_init_distributed(True)
    assert not torch.distributed.is_initialized()


# -- two processes, gloo: the collectives -------------------------------------------


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Run every check of distributed_checks.py on 2 ranks, once."""
    out = tmp_path_factory.mktemp("dist-checks")
    codes = run_ranks(
        [sys.executable, str(HERE / "distributed_checks.py"), str(out)],
        2,
        out / "logs",
        CHECKS_DEADLINE_S,
    )
    logs = "\n".join(
        (out / "logs" / f"rank{r}.log").read_text()[-2000:] for r in (0, 1)
    )
    assert codes == [0, 0], logs
    return rank_results(out, 2)


CHECK_NAMES = [check.__name__ for check in CHECKS]


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_two_rank_check(checks, name):
    for rank, result in enumerate(checks):
        assert result[name] == "ok", f"rank {rank}:\n{result[name]}"


def test_upstream_reduction_sums_different_experts_without_alignment(checks):
    """The bug ensure_same_hessian_order fixes, shown with upstream's own code:
    equal counts of same-width Hessians in different key orders reduce without
    error, into the wrong experts."""
    wrong = checks[0]["unaligned_wrong"] + checks[1]["unaligned_wrong"]
    # bin packing gives rank 1 both experts; it sums rank 0's expert 2 into its
    # expert 1 and rank 0's expert 0 into its expert 2
    assert sorted(wrong) == ["mlp.experts.1", "mlp.experts.2"]


def test_alignment_gives_both_ranks_the_same_keys(checks):
    assert checks[0]["aligned_order"] == checks[1]["aligned_order"]
    assert checks[0]["aligned_shapes"] == checks[1]["aligned_shapes"]
    owned = checks[0]["aligned_owned"] + checks[1]["aligned_owned"]
    assert sorted(owned) == sorted(checks[0]["aligned_order"])  # each once
    assert checks[0]["owners"] == checks[1]["owners"]


# -- two processes, gloo: llmcompressor's distributed oneshot -----------------------

NUM_SAMPLES = 8
# 7 Linears in the dense layer; per MoE layer 4 attention, 16 experts' gate/up
# (one Hessian each) and down_proj, the shared expert's 3 (plain GPTQ)
HESSIAN_REDUCTIONS_WEIGHTED = 7 + 2 * (4 + 16 + 16 + 3)


@pytest.fixture(scope="module")
def oneshot_inputs(glm4_dir, calibration_data, tmp_path_factory):
    data = tmp_path_factory.mktemp("dist-data") / "calibration.jsonl"
    with data.open("w") as handle:
        for row in calibration_data.select(range(NUM_SAMPLES)):
            handle.write(json.dumps(row) + "\n")
    return glm4_dir, data


def worker_argv(inputs, out: Path, timeout_s: int, *options: str) -> list[str]:
    """distributed_worker.py's command line: its model and data, where it writes,
    and its collectives' timeout."""
    model, data = inputs
    argv = [sys.executable, str(HERE / "distributed_worker.py")]
    argv += ["--model", str(model), "--data", str(data), "--out", str(out)]
    return [*argv, "--timeout", str(timeout_s), *options]


def run_oneshot(inputs, out: Path, world_size: int, *options: str) -> list[dict]:
    argv = worker_argv(inputs, out, 60, *options)
    logs = out / "logs"
    if world_size == 1:  # the reference: a plain single process, no torch.distributed
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "rank0.log").open("w") as handle:
            code = subprocess.run(
                argv, stdout=handle, stderr=handle, timeout=ONESHOT_DEADLINE_S
            ).returncode
        codes = [code]
    else:
        codes = run_ranks(argv, world_size, logs, ONESHOT_DEADLINE_S)
    results = rank_results(out, world_size, logs)
    for rank, (code, result) in enumerate(zip(codes, results, strict=True)):
        assert code == 0 and result["status"] == "ok", (
            f"rank {rank}: {result.get('traceback', result)}"
        )
    return results


def weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt")


def int4_flips(reference: dict, other: dict) -> float:
    """Share of quantized int4 values that differ (group size 128)."""
    flips = total = 0
    for key, weight in reference.items():
        if not key.endswith(".weight"):
            continue
        prefix = key[: -len("weight")]
        grid = weight.float().reshape(weight.shape[0], -1, 128)
        scale = reference[prefix + "weight_scale"].float()[..., None]
        other_grid = other[key].float().reshape(grid.shape)
        other_scale = other[prefix + "weight_scale"].float()[..., None]
        flips += int(
            (torch.round(grid / scale) != torch.round(other_grid / other_scale)).sum()
        )
        total += grid.numel()
    return flips / total


def up_to_layer(state: dict, last: int) -> dict:
    """The tensors of decoder layers 0 to ``last``."""
    return {
        key: value
        for key, value in state.items()
        if key.startswith("model.layers.") and int(key.split(".")[2]) <= last
    }


def bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_ranks_hold_the_same_model(out: Path, world_size: int):
    first = weights(out, 0)
    for rank in range(1, world_size):
        other = weights(out, rank)
        assert first.keys() == other.keys()
        for key in first:
            # bytes, not values: the scales of experts nobody calibrated are
            # uninitialized memory (NaN != NaN), but the same shared memory
            same = torch.equal(bytes_of(first[key]), bytes_of(other[key]))
            assert same, f"rank {rank} differs: {key}"


def last_pass(coverage: dict) -> list[dict]:
    """The blocks of the pass that quantized (schema 2), or of schema 1."""
    return (
        coverage["passes"][-1]["blocks"]
        if "passes" in coverage
        else (coverage["blocks"])
    )


@pytest.mark.slow
@pytest.mark.parametrize("modifier", ["gptq", "shared"])
def test_two_ranks_all_experts_match_one_process(oneshot_inputs, tmp_path, modifier):
    """Mode 'all': every rank calibrates every expert on its half of the data; the
    model equals the one-process run's up to GPTQ noise (Hessians summed in another
    order), and shared Hessians are reduced once per block, not once per Linear."""
    options = ["--num-samples", str(NUM_SAMPLES), "--mode", "all"]
    options += ["--modifier", modifier]
    [reference] = run_oneshot(oneshot_inputs, tmp_path / "one", 1, *options)
    ranks = run_oneshot(oneshot_inputs, tmp_path / "two", 2, *options)

    assert [r["local_samples"] for r in ranks] == [4, 4]
    assert_ranks_hold_the_same_model(tmp_path / "two", 2)
    # the dense layer and the first MoE layer, whose inputs follow the dense
    # layer's quantization smoothly. The next layer's inputs follow the first MoE
    # layer's routing of quantized activations, where GPTQ noise (Hessians summed
    # in another order; rounding that differs between CPUs) can flip near-ties,
    # which no tolerance bounds: 9% of its values differed on one AMD EPYC.
    flips = int4_flips(
        up_to_layer(weights(tmp_path / "one"), 1),
        up_to_layer(weights(tmp_path / "two"), 1),
    )
    # measured: 0.02% (plain GPTQ and shared, AMD EPYC); without the barrier after
    # compression (install_aligned_gptq) 9%, from ranks propagating half-written
    # layers
    assert flips < 0.002, flips
    # 7 Linears in the dense layer, 4 + 16 x 3 + 3 per MoE layer; shared
    # Hessians replace 34 input projections per MoE layer with one reduction
    reductions = ranks[0]["hessian_reductions"]
    assert reductions == (7 + 2 * 55 if modifier == "gptq" else 7 + 2 * 22)
    # coverage: 'all' calibrates every expert on every token, on either side;
    # routed counts of later layers follow the quantized earlier layers, whose
    # GPTQ noise can flip a near-tie (exact equality: the routed test below)
    assert ranks[0]["coverage"] == ranks[1]["coverage"]
    ours = last_pass(ranks[0]["coverage"])
    theirs = last_pass(reference["coverage"])
    for block, expected in zip(ours, theirs, strict=True):
        assert block["calibrated"] == expected["calibrated"]
        assert sum(block["routed"]) == sum(expected["routed"])
        pairs = zip(block["routed"], expected["routed"], strict=True)
        moved = sum(abs(a - b) for a, b in pairs)
        assert moved <= 0.02 * sum(expected["routed"]), (block, expected)


@pytest.mark.slow
def test_two_ranks_routed_match_one_process(oneshot_inputs, tmp_path):
    """Mode 'routed': ranks call different experts in different orders. Upstream
    alone then deadlocks or sums different experts' Hessians (rank 0 waited in
    gptq/base.py:389 while rank 1 went on). With the plugin (aligned Hessians,
    coverage counts summed over ranks by the modifier), the report (starved
    experts and RTN fallback included) equals the one-process run's exactly and
    so do the weights, up to GPTQ noise. Each layer sees unquantized activations
    (propagate_error=False), so routing, and with it each expert's tokens, is the
    same in both runs."""
    options = ["--num-samples", str(NUM_SAMPLES), "--mode", "routed"]
    options += ["--rtn-fallback", "--no-propagate"]
    [reference] = run_oneshot(oneshot_inputs, tmp_path / "one", 1, *options)
    ranks = run_oneshot(oneshot_inputs, tmp_path / "two", 2, *options)

    assert_ranks_hold_the_same_model(tmp_path / "two", 2)
    for result in ranks:
        # the modifier's own report is global (summing it again changes nothing)
        assert result["coverage"] == reference["coverage"]
        assert result["coverage_global"] == result["coverage"]
    # this data starves some experts on every rank (RTN for both runs) and the
    # ranks calibrated different experts: the case that needs the alignment
    assert reference["coverage_global"]["rtn_fallback"]
    assert ranks[0]["coverage_rank"] != ranks[1]["coverage_rank"]
    flips = int4_flips(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert flips < 0.002, flips


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weighted:2", "weighted:2,shrink:0"])
def test_two_ranks_weighted_sums_match_one_process_and_meet_the_floor(
    oneshot_inputs, tmp_path, mode
):
    """weighted:2 under torchrun. Routing is the same in every run here
    (propagate_error=False).

    - Without the floor: each expert's routing-weighted Hessians (gate/up shared,
      down_proj) are summed over the ranks once per expert and equal the
      one-process run's, so the weights do, up to GPTQ noise.
    - The default floor (16): each rank tops up its share from its own near-miss
      tokens, so the run's global counts meet the floor with the same routed
      counts. Those top-ups differ from one process's (and so do the weights of
      the experts they reach); the sums themselves are the case above.
    - With shrinkage (the default; ``shrink:0`` without) each rank mixes its parts
      with the global weight totals and counts, so the sums are the one-process
      mix.
    """
    options = ["--num-samples", str(NUM_SAMPLES), "--mode", mode]
    options += ["--modifier", "shared", "--no-propagate"]
    no_floor = [*options, "--floor", "0", "--rtn-fallback"]
    [reference] = run_oneshot(oneshot_inputs, tmp_path / "one", 1, *no_floor)
    ranks = run_oneshot(oneshot_inputs, tmp_path / "two", 2, *no_floor)

    assert_ranks_hold_the_same_model(tmp_path / "two", 2)
    assert ranks[0]["coverage_global"] == reference["coverage_global"]
    assert ranks[0]["coverage_rank"] != ranks[1]["coverage_rank"]
    flips = int4_flips(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert flips < 0.002, flips
    # weighted Hessians cannot be shared across experts; the experts no token
    # reached (round-to-nearest, reported) have none to reduce
    starved = reference["coverage_global"]["rtn_fallback"]
    assert starved
    expected = HESSIAN_REDUCTIONS_WEIGHTED - 2 * len(starved)
    assert ranks[0]["hessian_reductions"] == expected

    floored = run_oneshot(oneshot_inputs, tmp_path / "floor", 2, *options)
    assert_ranks_hold_the_same_model(tmp_path / "floor", 2)
    assert floored[0]["coverage_global"] == floored[1]["coverage_global"]
    assert not floored[0]["coverage_global"]["rtn_fallback"]
    blocks = last_pass(floored[0]["coverage_global"])
    expected_blocks = last_pass(reference["coverage_global"])
    for block, expected_block in zip(blocks, expected_blocks, strict=True):
        assert block["routed"] == expected_block["routed"]
        assert min(block["calibrated"]) >= 16
    assert floored[0]["hessian_reductions"] == HESSIAN_REDUCTIONS_WEIGHTED


def plans(out: Path, rank: int) -> list[str]:
    """The statistics plans a rank logged."""
    log = (out / "logs" / f"rank{rank}.log").read_text()
    return re.findall(r"per-expert statistics: [^\n]*", log)


@pytest.mark.slow
def test_two_ranks_hold_one_group_of_a_split_layer_at_a_time(oneshot_inputs, tmp_path):
    """The statistics budget under torchrun: every rank sums its share of every
    expert's statistics, so each rank keeps to the plan as one process does. The
    shipped default (weighted:2, floor, shrinkage) with a budget of 4 experts a
    group: every rank plans the same 4 groups and holds one group at a time (the
    one-pass run holds all 16 experts), and the model equals the one-pass 2-rank
    run's (the same sums in the same order on each rank, then the same
    reductions)."""
    model_dir = oneshot_inputs[0]
    options = ["--num-samples", str(NUM_SAMPLES), "--mode", "weighted:2"]
    options += ["--modifier", "shared"]
    one_pass = run_oneshot(oneshot_inputs, tmp_path / "one-pass", 2, *options)
    budget, reserved, expert_bytes = group_budget(linearized_expert(model_dir), 5)
    budget_gib = ["--statistics-budget-gib", repr(budget / 2**30)]  # exact
    split = run_oneshot(oneshot_inputs, tmp_path / "split", 2, *options, *budget_gib)

    # per compression (two before the MoE layers, which hold no expert), the
    # expert Hessians held: gate/up and down_proj of every expert of the layer
    for rank, result in enumerate(one_pass):
        [plan] = plans(tmp_path / "one-pass", rank)
        assert plan.endswith(": one pass"), plan
        assert result["held"] == [0, 0] + [2 * 16] * 2, result["held"]
    # per MoE layer what has statistics first (attention, shared expert: no
    # expert), then each group of 4
    for rank, result in enumerate(split):
        [plan] = plans(tmp_path / "split", rank)
        assert ": 4 groups" in plan, plan
        assert result["held"] == [0, 0] + ([0] + [2 * 4] * 4) * 2, result["held"]
        # each group's solves within what it leaves of the budget (None: GPTQ's
        # own batches, for what has statistics before the groups)
        room = budget - reserved - 4 * expert_bytes
        expected = [None, None] + ([None] + [room] * 4) * 2
        assert result["limits"] == {"stacked": expected, "upstream": expected}
    assert_ranks_hold_the_same_model(tmp_path / "split", 2)
    assert split[0]["coverage_global"] == one_pass[0]["coverage_global"]
    assert split[0]["hessian_reductions"] == one_pass[0]["hessian_reductions"]
    ours, theirs = weights(tmp_path / "split"), weights(tmp_path / "one-pass")
    assert ours.keys() == theirs.keys()
    for key in ours:  # on one device, bit for bit (as in one process)
        assert torch.equal(bytes_of(ours[key]), bytes_of(theirs[key])), key


@pytest.mark.slow
def test_a_budget_no_plan_meets_stops_every_rank(oneshot_inputs, tmp_path):
    """A budget smaller than one expert's statistics: every rank stops with the
    same one-line error naming the layer and the flag, none waits for another."""
    out = tmp_path / "tiny-budget"
    options = ["--num-samples", str(NUM_SAMPLES), "--mode", "weighted:2"]
    options += ["--modifier", "shared", "--statistics-budget-gib", "1e-5"]
    argv = worker_argv(oneshot_inputs, out, 30, *options)
    codes = run_ranks(argv, 2, out / "logs", ONESHOT_DEADLINE_S)
    assert codes == [1, 1]
    for result in rank_results(out, 2):
        assert result["error_type"] == "ValueError", result
        message = result["error"]
        assert "\n" not in message
        assert message.startswith("MoE layer model.layers.1.mlp: one expert's")
        assert "--statistics-budget-gib" in message


@pytest.mark.slow
def test_two_ranks_sampled_mode_is_reproducible(oneshot_inputs, tmp_path):
    """'affinity' draws per block and rank (seeded): two 2-rank runs on the same
    data give the same coverage and bit-identical weights."""
    options = ["--num-samples", str(NUM_SAMPLES), "--mode", "affinity:0.25"]
    first = run_oneshot(oneshot_inputs, tmp_path / "first", 2, *options)
    again = run_oneshot(oneshot_inputs, tmp_path / "again", 2, *options)
    assert first[0]["coverage_global"] == again[0]["coverage_global"]
    assert first[0]["coverage_rank"] != first[1]["coverage_rank"]
    ours, theirs = weights(tmp_path / "first"), weights(tmp_path / "again")
    assert all(torch.equal(bytes_of(ours[k]), bytes_of(theirs[k])) for k in ours)


@pytest.mark.slow
def test_empty_partition_fails_on_every_rank(oneshot_inputs, tmp_path):
    """1 sample on 2 ranks: rank 0's partition is empty. Both ranks stop with the
    same clear error before loading anything, neither waits for the other
    (upstream alone: datasets raises on rank 0 only, rank 1 waits)."""
    out = tmp_path / "empty"
    argv = worker_argv(oneshot_inputs, out, 30, "--num-samples", "1")
    codes = run_ranks(argv, 2, out / "logs", ONESHOT_DEADLINE_S)
    assert codes == [1, 1]
    for result in rank_results(out, 2):
        assert result["error_type"] == "DistributedSetupError"
        assert "leave rank(s) 0 with none" in result["error"]


# -- the CLI under torchrun ---------------------------------------------------------

CLI_SAMPLES = 4
ERROR = "llmcompressor-moe: error: "


def cli_argv(output: Path, *options: str) -> list[str]:
    """``llmcompressor-moe quantize`` on the built-in tiny GLM4-MoE, mode 'all'
    (every expert calibrated on every token: counts comparable across runs)."""
    return [
        "-m", "llmcompressor_moe_plugins", "quantize", "--output", str(output),
        "--num-samples", str(CLI_SAMPLES), "--seq-len", "64", "--mode", "all",
        *options,
    ]  # fmt: skip


def run_torchrun(argv: list[str], nproc: int, cwd: Path, deadline: float):
    """``python -m torch.distributed.run --standalone`` (a free port of its own);
    the whole process group is killed at the deadline."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", *argv]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {deadline} s (hang?)\n{stderr}")
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_cli_distributed_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m llmcompressor_moe_plugins quantize
    --distributed``: one checkpoint with its coverage files, written by rank 0,
    the report printed once; the coverage is the one-process run's on the same
    data (every expert's calibrated tokens exactly; routed tokens of later
    layers follow the quantized earlier ones, within 2%: DISTRIBUTED_NOTES F9)."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, *cli_argv(one)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=ONESHOT_DEADLINE_S,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    code, stdout, stderr = run_torchrun(
        cli_argv(two, "--distributed"), 2, tmp_path, ONESHOT_DEADLINE_S
    )
    assert code == 0, stderr[-6000:]
    assert stdout.count("written to") == 1, stdout  # rank 0 prints
    # the CLI's console: every line names its process, rank 0 alone shows
    # the stage lines, upstream's per-rank INFO lines stay hidden
    assert "[rank 0] " in stderr and "2 processes calibrate data-parallel" in stderr
    assert stderr.count("Calibrating with glm4_moe_w4a16_gptq on 4 samples") == 1
    assert "[Rank 1]" not in stdout + stderr

    files = {p.name for p in two.iterdir()}
    assert {"config.json", "recipe.yaml", "coverage.json", "coverage.png"} <= files
    assert any(name.endswith(".safetensors") for name in files), files
    # one checkpoint, moved into place; nothing left beside it by either rank
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    ours = json.loads((two / "coverage.json").read_text())
    theirs = json.loads((one / "coverage.json").read_text())
    assert ours["min_tokens"] == theirs["min_tokens"]
    assert ours["rtn_fallback"] == theirs["rtn_fallback"] == []
    for block, expected in zip(last_pass(ours), last_pass(theirs), strict=True):
        assert (block["name"], block["mode"]) == (expected["name"], expected["mode"])
        assert block["floor"] == expected["floor"]
        assert block["calibrated"] == expected["calibrated"]
        assert sum(block["calibrated"]) == CLI_SAMPLES * 64 * 16
        assert sum(block["routed"]) == sum(expected["routed"])
        pairs = zip(block["routed"], expected["routed"], strict=True)
        moved = sum(abs(a - b) for a, b in pairs)
        assert moved <= 0.02 * sum(expected["routed"]), (block, expected)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_cli_too_few_samples_fail_on_every_process(tmp_path):
    """1 sample on 2 processes, launched as torchrun does but without
    --distributed (torchrun's environment with 2 processes turns it on): both
    stop with the same one-line error and exit code 2, before loading the
    model; neither waits for the other."""
    out = tmp_path / "out"
    argv = [sys.executable, *cli_argv(out)]
    argv[argv.index(str(CLI_SAMPLES))] = "1"
    codes = run_ranks(argv, 2, tmp_path / "logs", ONESHOT_DEADLINE_S)
    assert codes == [2, 2]
    errors = []
    for rank in range(2):
        log = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        errors.append([line for line in log.splitlines() if line.startswith(ERROR)])
        assert "Loading the tiny GLM4-MoE" not in log
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    message = errors[0][0]
    assert "1 calibration sample(s) split over 2 ranks leave rank(s) 0" in message
    assert not out.exists()
