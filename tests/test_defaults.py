"""One source for defaults: the modifier, the CLI's help and the README's
tables show the constants of ``llmcompressor_moe_plugins.defaults``."""

from __future__ import annotations

import re
from pathlib import Path

from llmcompressor_moe_plugins import defaults
from llmcompressor_moe_plugins.cli.args import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _help(flag: str) -> str:
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    action = next(a for a in quantize._actions if flag in a.option_strings)
    return " ".join(action.help.split())


def _readme_row(argument: str) -> str:
    """The README's YAML-arguments table row of ``argument``."""
    match = re.search(rf"^\| `{argument}` \|(.*)\|$", README, re.MULTILINE)
    assert match, argument
    return match.group(1)


def test_the_modifier_resolves_to_the_constants(monkeypatch):
    from llmcompressor_moe_plugins import modifier as module
    from llmcompressor_moe_plugins.modifier import MoECalibrationModifier

    # inside oneshot, whose moe_calibrate_all_experts defaults to True
    monkeypatch.setattr(module, "calibrate_all_experts_flag", lambda: True)

    modifier = MoECalibrationModifier()
    assert modifier.resolved_mode() == defaults.DEFAULT_MODE
    assert modifier.resolved_floor() == defaults.DEFAULT_FLOOR
    assert modifier.resolved_min_tokens() == defaults.DEFAULT_FLOOR
    assert modifier.chunk_size == defaults.DEFAULT_CHUNK_SIZE
    routed = MoECalibrationModifier(mode="routed")
    assert routed.resolved_floor() == 0
    assert routed.resolved_min_tokens() == defaults.MIN_TOKENS_WITHOUT_FLOOR


def test_help_text_shows_the_constants():
    floor, min_tokens, mode = _help("--floor"), _help("--min-tokens"), _help("--mode")
    assert f"default: {defaults.FLOOR_RULE}" in floor
    assert f"default: {defaults.MIN_TOKENS_RULE}" in min_tokens
    assert f"default: {defaults.DEFAULT_MODE} with a floor of " in mode
    assert f"floor of {defaults.DEFAULT_FLOOR}" in mode
    # no other number stands for a default (the help once said 64 and 1)
    assert re.findall(r"\d+", floor) == [str(defaults.DEFAULT_FLOOR), "0"]
    assert re.findall(r"\d+", min_tokens) == [str(defaults.MIN_TOKENS_WITHOUT_FLOOR)]


def test_readme_tables_show_the_constants():
    mode, floor = _readme_row("mode"), _readme_row("floor")
    min_tokens, chunk = _readme_row("min_tokens"), _readme_row("chunk_size")
    assert f"unset: `{defaults.DEFAULT_MODE}` with a floor of " in mode
    assert f"floor of {defaults.DEFAULT_FLOOR}," in mode
    assert f"unset: {defaults.DEFAULT_FLOOR} with the default mode" in floor
    assert f"(default: {defaults.MIN_TOKENS_RULE})" in min_tokens
    assert f"(default: `{defaults.DEFAULT_CHUNK_SIZE}`)" in chunk
    modes_row = next(
        line for line in README.splitlines() if line.startswith("| `weighted:P` /")
    )
    assert f"(default: `{defaults.DEFAULT_MODE}`; floor {defaults.DEFAULT_FLOOR}" in (
        modes_row
    )


def test_the_run_reports_the_constants():
    """The report's settings line, from a run's counts under the defaults."""
    from llmcompressor_moe_plugins.reporting.coverage import (
        BlockCoverage,
        CalibrationPass,
        CoverageReport,
    )

    block = BlockCoverage(
        "model.layers.1.mlp",
        "Glm4MoeMoE",
        "CalibrationGlm4MoeMoE",
        defaults.DEFAULT_MODE,
        [5, 0],
        [20, 16],
        floor=defaults.DEFAULT_FLOOR,
    )
    report = CoverageReport(
        [CalibrationPass("SharedHessianGPTQModifier", [block])],
        min_tokens=defaults.DEFAULT_FLOOR,
    )
    assert (
        f"mode {defaults.DEFAULT_MODE}; floor {defaults.DEFAULT_FLOOR}; "
        f"min_tokens {defaults.DEFAULT_FLOOR}"
    ) in report.format_table()
