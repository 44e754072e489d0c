"""The defaults of ``MoECalibrationModifier``, in one place that imports nothing.

The modifier resolves its settings from these; the CLI's help text, the README's
tables and the run's report all show these values (``tests/test_defaults.py``
compares them), and the CLI reads them without importing torch.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_MODE",
    "DEFAULT_FLOOR",
    "DEFAULT_CHUNK_SIZE",
    "MIN_TOKENS_WITHOUT_FLOOR",
    "FLOOR_RULE",
    "MIN_TOKENS_RULE",
]

# Chosen from benchmarks/quality.py (README "Which mode"; benchmarks/RESULTS.md,
# "Session 5"): the lowest mean perplexity increase over two trained models and
# every budget measured, never worse than the better of routed and all beyond one
# seed spread, at routed's cost (0.98x on Qwen3-30B-A3B shapes).
DEFAULT_MODE = "weighted:2"
# Tokens every expert is calibrated on at least under the default mode (or all
# the calibration set has): sampling alone gives experts that a skewed router
# never picks almost no tokens. 16 had the lowest mean perplexity increase of the
# floors measured (4, 8, 16, 64; benchmarks/RESULTS.md, "The floor").
DEFAULT_FLOOR = 16
# tokens per extra (statistics-only) expert call: sized per block
DEFAULT_CHUNK_SIZE = "auto"
# the starved-expert check without a floor: an expert with no token stops the run
MIN_TOKENS_WITHOUT_FLOOR = 1

FLOOR_RULE = (
    f"{DEFAULT_FLOOR} with the default mode and weighted modes, 0 when another "
    "mode is set"
)
MIN_TOKENS_RULE = f"the floor, or {MIN_TOKENS_WITHOUT_FLOOR} without one"
