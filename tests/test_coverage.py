"""Coverage report: per-pass counts, JSON (schema 2, reads 1), table, heatmap."""

import json
import random

import pytest
from PIL import Image

from llmcompressor_moe_plugins.reporting.coverage import (
    BlockCoverage,
    CalibrationPass,
    CoverageReport,
    UndercalibratedExpertsError,
)


def block(name, routed, calibrated, floor=0, mode="affinity:0.1"):
    return BlockCoverage(
        name=name,
        block_class="Glm4MoeMoE",
        calibration_module="CalibrationGlm4MoeMoE",
        mode=mode,
        routed=list(routed),
        calibrated=list(calibrated),
        floor=floor,
    )


def two_pass_report():
    smoothquant = CalibrationPass(
        "SmoothQuantModifier",
        [
            block("model.layers.1.mlp", [5, 0, 3], [6, 1, 4]),
            block("model.layers.2.mlp", [4, 4, 0], [4, 4, 2]),
        ],
    )
    gptq = CalibrationPass(
        "GPTQModifier",
        [
            block("model.layers.1.mlp", [6, 0, 2], [7, 0, 2]),
            block("model.layers.2.mlp", [3, 5, 0], [3, 5, 1]),
        ],
    )
    return CoverageReport(passes=[smoothquant, gptq], min_tokens=2)


def synthetic(layers, experts, seed=0):
    rng = random.Random(seed)
    blocks = []
    for layer in range(1, layers + 1):
        routed = [rng.choice([0, 1, 3, 40, 900, 7000]) for _ in range(experts)]
        calibrated = [r + rng.randint(0, 500) for r in routed]
        blocks.append(block(f"model.layers.{layer}.mlp", routed, calibrated))
    blocks[-1].routed[5] = blocks[-1].calibrated[5] = 0
    report = CoverageReport(passes=[CalibrationPass("GPTQModifier", blocks)])
    report.rtn_fallback = [f"{blocks[-1].name}.experts.5"]
    return report


def test_blocks_are_the_last_pass_and_counts_are_per_pass():
    report = two_pass_report()
    assert report.blocks is report.passes[-1].blocks
    assert report.blocks[0].calibrated == [7, 0, 2]  # not summed with pass 1
    assert CoverageReport(passes=[]).blocks == []


def test_rows_worst_first_per_pass():
    report = two_pass_report()
    rows = report.rows()
    keys = [(r["calibrated"], r["routed"]) for r in rows]
    assert keys == sorted(keys)
    assert (rows[0]["block"], rows[0]["expert"]) == ("model.layers.1.mlp", 1)
    assert rows[0]["block_class"] == "Glm4MoeMoE"
    first = report.rows(pass_index=0)
    assert (first[0]["block"], first[0]["expert"], first[0]["calibrated"]) == (
        "model.layers.1.mlp",
        1,
        1,
    )


def test_undercalibrated_per_pass():
    report = two_pass_report()
    assert report.undercalibrated() == [
        "model.layers.1.mlp.experts.1",
        "model.layers.2.mlp.experts.2",
    ]
    assert report.undercalibrated(pass_index=0) == ["model.layers.1.mlp.experts.1"]
    assert report.undercalibrated(min_tokens=1) == ["model.layers.1.mlp.experts.1"]
    with pytest.raises(IndexError, match="2 calibration pass"):
        report.undercalibrated(pass_index=5)


def test_json_roundtrip_schema_2(tmp_path):
    report = two_pass_report()
    report.rtn_fallback = ["model.layers.1.mlp.experts.1"]
    report.passes[1].blocks[0].floor = 4
    path = report.save_json(tmp_path / "coverage.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2
    assert [p["label"] for p in data["passes"]] == [
        "SmoothQuantModifier",
        "GPTQModifier",
    ]
    assert CoverageReport.from_dict(data) == report


def test_reads_schema_1():
    v1 = {
        "schema_version": 1,
        "min_tokens": 3,
        "rtn_fallback": ["model.layers.1.mlp.experts.0"],
        "blocks": [
            {
                "name": "model.layers.1.mlp",
                "block_class": "CalibrationGlm4MoeMoE",
                "mode": "all",
                "routed": [2, 0],
                "calibrated": [4, 4],
            }
        ],
    }
    report = CoverageReport.from_dict(v1)
    assert len(report.passes) == 1
    assert "summed" in report.passes[0].label
    (only,) = report.blocks
    assert only.block_class == "Glm4MoeMoE"
    assert only.calibration_module == "CalibrationGlm4MoeMoE"
    assert (only.routed, only.calibrated, only.floor) == ([2, 0], [4, 4], 0)
    assert report.min_tokens == 3
    assert report.rtn_fallback == ["model.layers.1.mlp.experts.0"]
    with pytest.raises(ValueError, match="schema 3"):
        CoverageReport.from_dict({"schema_version": 3, "passes": []})


def test_table_names_the_pass_the_block_class_and_the_other_passes():
    report = two_pass_report()
    report.rtn_fallback = ["model.layers.1.mlp.experts.1"]
    table = report.format_table()
    lines = table.splitlines()
    assert "calibration pass 2 of 2 (GPTQModifier)" in lines[0]
    assert "block class" in lines[1]
    assert "Glm4MoeMoE" in lines[2] and "Calibration" not in lines[2]
    assert lines[2].endswith("<- RTN fallback")
    assert "below min_tokens 2" in lines[3]
    # the other pass: one line with its own min/max
    (other,) = [line for line in lines if "pass 1 of 2" in line]
    assert "SmoothQuantModifier" in other and "calibrated min 1, max 6" in other
    first = report.format_table(pass_index=0).splitlines()[0]
    assert "calibration pass 1 of 2 (SmoothQuantModifier)" in first


def test_table_limit_and_empty():
    table = synthetic(4, 16).format_table(limit=5)
    assert "... 59 more experts" in table
    assert "no MoE blocks" in CoverageReport(passes=[]).format_table()


def test_table_flags_experts_below_their_floor():
    report = CoverageReport(
        passes=[
            CalibrationPass(
                "GPTQModifier",
                [block("model.layers.1.mlp", [0, 9], [5, 9], floor=8, mode="x")],
            )
        ]
    )
    assert "<- below floor 8" in report.format_table().splitlines()[2]


@pytest.mark.parametrize(
    ("layers", "experts"), [(2, 16), (46, 128)], ids=["2x16", "46x128"]
)
def test_heatmap_size_is_sane(tmp_path, layers, experts):
    path = synthetic(layers, experts).save_heatmap(tmp_path / "coverage.png")
    width, height = Image.open(path).size
    assert 600 <= width <= 2000 and 300 <= height <= 2000, (width, height)


def test_heatmap_of_a_dense_model_is_a_message(tmp_path):
    for report in (
        CoverageReport(passes=[]),
        CoverageReport(passes=[CalibrationPass("GPTQModifier", [])]),
    ):
        path = report.save_heatmap(tmp_path / "coverage.png")
        width, height = Image.open(path).size
        assert width <= 800 and height <= 200


def test_error_message_takes_a_hint():
    experts = [f"model.layers.1.mlp.experts.{i}" for i in range(12)]
    default = str(UndercalibratedExpertsError(experts, 4))
    assert "12 expert(s) got fewer than 4" in default
    assert "and 2 more" in default and "rtn_fallback" in default
    hinted = UndercalibratedExpertsError(experts, 4, hint="use mode 'floor:4'")
    assert str(hinted).endswith("Fix: use mode 'floor:4'.")
    assert "rtn_fallback" not in str(hinted)
    assert hinted.experts == experts
    prefixed = UndercalibratedExpertsError(experts, 4, hint="Fix: set floor: 8.")
    assert str(prefixed).endswith("Fix: set floor: 8.")


def test_swapped_glm4_blocks_report_the_block_class():
    import torch
    from transformers import Glm4MoeForCausalLM

    from llmcompressor_moe_plugins import moe_calibration_context
    from llmcompressor_moe_plugins.tiny import tiny_glm4_moe_config

    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(tiny_glm4_moe_config())
    with moe_calibration_context(model, mode="routed", floor=4) as swapped:
        with torch.no_grad():
            model(torch.randint(0, 512, (2, 16)))
        report = swapped.coverage()
    assert [b.name for b in report.blocks] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]
    for only in report.blocks:
        assert only.block_class == "Glm4MoeMoE"
        assert only.calibration_module == "CalibrationGlm4MoeMoE"
        assert only.floor == 4 and min(only.calibrated) >= 4
        assert sum(only.routed) == 2 * 16 * 2  # tokens x top-2
