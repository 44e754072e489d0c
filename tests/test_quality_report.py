"""The quality report pairs each run with the model it quantized and counts a run
re-made to finish a cell once (benchmarks/quality.py, issue 14's evidence)."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

QUALITY = Path(__file__).parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed, ppl, mode="routed", **extra):
    return {"algorithm": "gptq", "budget": "2x64", "seed": seed, "mode": mode,
            "model": "code", "ppl": ppl, "top1_agreement": 0.9, "oneshot_s": 1.0,
            "tokens_min": 16, **extra}  # fmt: skip


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_repeated_run_counts_once_and_a_retraining_is_its_own_model(
    quality, tmp_path, capsys
):
    first = write(tmp_path / "a.jsonl", [
        {"baseline": True, "model": "code", "ppl": 10.0},
        run(0, 10.5),  # no base_ppl: the file's baseline line
        run(1, 10.6),
    ])  # fmt: skip
    second = write(tmp_path / "b.jsonl", [
        {"baseline": True, "model": "code", "ppl": 10.0},
        run(1, 10.6, base_ppl=10.0),  # the same run, reproduced
        run(2, 10.7, base_ppl=10.0),
        {"baseline": True, "model": "code", "ppl": 11.0},
        run(0, 11.5, base_ppl=11.0),  # a different training
    ])  # fmt: skip

    baselines, runs = quality.load_results([first, second])

    assert baselines == {"code#1": 10.0, "code#2": 11.0}
    seeds = sorted((r["model"], r["seed"]) for r in runs)
    assert seeds == [("code#1", 0), ("code#1", 1), ("code#1", 2), ("code#2", 0)]
    assert "1 runs appear more than once; every repeat reproduced" in (
        capsys.readouterr().out
    )


def test_a_repeat_that_did_not_reproduce_is_named(quality, tmp_path, capsys):
    first = write(tmp_path / "a.jsonl", [
        {"baseline": True, "model": "code", "ppl": 10.0}, run(0, 10.5),
    ])  # fmt: skip
    second = write(tmp_path / "b.jsonl", [
        {"baseline": True, "model": "code", "ppl": 10.0}, run(0, 10.9),
    ])  # fmt: skip

    baselines, runs = quality.load_results([first, second])

    assert baselines == {"code": 10.0}
    assert [r["ppl"] for r in runs] == [10.5]  # the first kept
    assert "1 did not reproduce" in capsys.readouterr().out


def test_runs_that_record_their_model_need_no_baseline_line(quality, tmp_path):
    """A second sweep file for a model folder that already has its baseline."""
    first = write(tmp_path / "a.jsonl", [
        {"baseline": True, "model": "code", "ppl": 10.0}, run(0, 10.5),
    ])  # fmt: skip
    second = write(tmp_path / "b.jsonl", [run(1, 10.6, base_ppl=10.0)])

    baselines, runs = quality.load_results([first, second])

    assert baselines == {"code": 10.0}
    assert sorted(r["seed"] for r in runs) == [0, 1]


def test_report_takes_times_from_a_timing_sweep(quality, tmp_path, capsys):
    """--timing replaces the contended sweep's times, matched by budget label
    (the timing file may spell a budget as a bare token count)."""
    results = write(tmp_path / "a.jsonl", [
        {"baseline": True, "model": "code", "ppl": 10.0},
        run(0, 10.5, budget="2x64"),
        run(0, 10.4, mode="all", budget="2x64"),
    ])  # fmt: skip
    timing = write(tmp_path / "t.jsonl", [
        run(0, 10.5, budget=128, oneshot_s=2.0),
        run(0, 10.4, mode="all", budget=128, oneshot_s=3.0),
    ])  # fmt: skip

    quality.report(SimpleNamespace(results=[results], timing=timing))

    table = capsys.readouterr().out
    assert "1.50x" in table and "nan" not in table


def test_the_harsher_scheme_is_the_shipped_recipe_with_3_bit_weights(quality, tmp_path):
    """``--algorithms gptq_w3``: issue 22's harsher scheme, W3A16 group 128, the
    shipped GPTQ recipe otherwise (the modifier that weighted modes need)."""
    import yaml

    from llmcompressor_moe_plugins import SharedHessianGPTQModifier

    w3 = yaml.safe_load(
        Path(quality.recipe_file("gptq_w3", "default", tmp_path)).read_text()
    )
    w4 = yaml.safe_load(
        Path(quality.recipe_file("gptq", "default", tmp_path)).read_text()
    )
    w3_gptq = w3["default_stage"]["default_modifiers"]["SharedHessianGPTQModifier"]
    w4_gptq = w4["default_stage"]["default_modifiers"]["SharedHessianGPTQModifier"]
    assert "scheme" not in w3_gptq and w4_gptq.pop("scheme") == "W4A16"
    modifier = SharedHessianGPTQModifier(**w3_gptq)
    [scheme] = modifier.resolve_quantization_config().config_groups.values()
    weights = scheme.weights
    assert (weights.num_bits, weights.strategy, weights.group_size) == (3, "group", 128)
    del w3_gptq["config_groups"]
    assert w3_gptq == w4_gptq  # everything else as shipped
