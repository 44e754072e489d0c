"""The command line's arguments and the checks that need nothing but them.

Imports nothing heavy (no torch, transformers or llmcompressor): a usage error
is answered at once, in one line, with exit code 2.
"""

from __future__ import annotations

import argparse

from ..defaults import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FLOOR,
    DEFAULT_MODE,
    FLOOR_RULE,
    MIN_TOKENS_RULE,
)

__all__ = [
    "PROG",
    "DEFAULT_RECIPE",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "CliError",
    "build_parser",
    "check_arguments",
    "one_line",
]

PROG = "llmcompressor-moe"
DEFAULT_RECIPE = "glm4_moe_w4a16_gptq"
DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 128


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (through ``main``)."""

    def error(self, message: str):
        raise CliError(f"{message}; see `{self.prog} --help`")


def one_line(text: str) -> str:
    """Upstream messages (pydantic, datasets) span lines; errors here do not.
    Never shortened: the fix is often at the end."""
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "errors.pydantic.dev" not in line
    ]
    return " ".join(lines).strip("'\"")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model directory (saved with save_pretrained) or Hugging Face Hub ID, "
        "e.g. zai-org/GLM-4.5-Air (default: built-in tiny GLM4-MoE)",
    )
    parser.add_argument(
        "--revision", help="branch, tag or commit of a hub --model (default: main)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own Python code (config, model and tokenizer) from "
        "its directory or hub repo, for architectures transformers does not ship",
    )


def _add_calibration_arguments(quantize: argparse.ArgumentParser) -> None:
    mode = quantize.add_mutually_exclusive_group()
    mode.add_argument(
        "--routed-only",
        action="store_true",
        help="calibrate experts on routed tokens only (mode 'routed')",
    )
    mode.add_argument(
        "--mode",
        help="calibration mode: routed, all, top_k:N, min_tokens:K, affinity[:S], "
        f"weighted:P[,prior:L] (default: {DEFAULT_MODE} with a floor of "
        f"{DEFAULT_FLOOR}; a weighted mode you choose needs "
        "SharedHessianGPTQModifier in the recipe, as the shipped GPTQ recipes have)",
    )
    quantize.add_argument(
        "--block-mode",
        action="append",
        default=[],
        metavar="CLASS=MODE",
        help="mode for one MoE block class, e.g. Glm4MoeMoE=top_k:8 (repeatable)",
    )
    quantize.add_argument(
        "--floor",
        type=int,
        help="calibrate every expert on at least this many tokens (default: "
        f"{FLOOR_RULE})",
    )
    quantize.add_argument(
        "--min-tokens",
        type=int,
        help="stop if an expert is calibrated on fewer tokens (default: "
        f"{MIN_TOKENS_RULE})",
    )
    quantize.add_argument(
        "--rtn-fallback",
        action="store_true",
        help="quantize under-calibrated experts round-to-nearest instead of failing",
    )
    quantize.add_argument(
        "--seed", type=int, help="seeds sampling and the calibration order (0)"
    )
    quantize.add_argument(
        "--scheme-fit",
        choices=("ignore", "regroup", "raise"),
        help="a Linear whose width the recipe's group size does not divide: keep "
        "it unquantized (ignore, default), give it a smaller group (regroup), or "
        "stop (raise)",
    )
    quantize.add_argument(
        "--statistics-budget-gib",
        type=float,
        help="most GiB of one MoE layer's per-expert GPTQ statistics held at once "
        "in a weighted mode, per process; above it the experts are calibrated in "
        "groups (default: a quarter of the GPU's free memory at the layer; under "
        "--distributed the smallest over the processes)",
    )
    quantize.set_defaults(chunk_size=DEFAULT_CHUNK_SIZE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Quantize Mixture-of-Experts models with llmcompressor, "
        "calibrating every expert.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser(
        "quantize",
        help="run oneshot with MoE calibration modules; without --model, on a "
        "tiny GLM4-MoE built on the spot",
    )
    _add_model_arguments(quantize)
    quantize.add_argument(
        "--recipe",
        help="shipped recipe name or YAML path (default: the model family's GPTQ "
        f"W4A16 recipe, else {DEFAULT_RECIPE})",
    )
    quantize.add_argument(
        "--output",
        default="moe-quantized",
        help="output directory; must be new or empty unless --overwrite",
    )
    quantize.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output as a whole (once the new checkpoint "
        "is saved)",
    )
    quantize.add_argument(
        "--dataset",
        nargs="+",
        help="local .txt/.jsonl files, a local dataset directory, a llmcompressor "
        "dataset name (open_platypus, ...) or a Hugging Face Hub dataset ID "
        "(default: the Python standard library's source)",
    )
    quantize.add_argument(
        "--text-column", default="text", help="for .jsonl files and datasets"
    )
    quantize.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"calibration samples (default {DEFAULT_NUM_SAMPLES})",
    )
    quantize.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"tokens per sample (default {DEFAULT_SEQ_LEN})",
    )
    _add_calibration_arguments(quantize)
    quantize.add_argument(
        "--allow-dense",
        action="store_true",
        help="quantize a model without MoE blocks anyway (the plugin does nothing)",
    )
    quantize.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel calibration under torchrun (one process per GPU): "
        "torchrun --nproc_per_node=N -m llmcompressor_moe_plugins quantize "
        "--distributed ...; --num-samples counts over all processes",
    )
    quantize.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every log line (default: one line per stage, each warning once)",
    )

    plugins = commands.add_parser(
        "plugins",
        help="list discovered calibration modules; with --model, which path each "
        "of the model's MoE blocks takes",
    )
    _add_model_arguments(plugins)
    plugins.add_argument(
        "-v", "--verbose", action="store_true", help="show every log line"
    )
    commands.add_parser("recipes", help="list shipped recipes")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Values argparse cannot check by type."""
    if args.revision is not None and args.model is None:
        raise CliError(
            f"--revision {args.revision} applies to a hub --model; pass --model too"
        )
    for flag, value, default in (
        ("--num-samples", args.num_samples, DEFAULT_NUM_SAMPLES),
        ("--seq-len", args.seq_len, DEFAULT_SEQ_LEN),
    ):
        if value < 1:
            raise CliError(f"{flag} {value}: must be 1 or more, e.g. {flag} {default}")
    if args.min_tokens is not None and args.min_tokens < 0:
        raise CliError(
            f"--min-tokens {args.min_tokens}: must be 0 or more (the fewest tokens "
            "an expert may be calibrated on; 0 turns the check off)"
        )
    if args.floor is not None and args.floor < 0:
        raise CliError(
            f"--floor {args.floor}: must be 0 or more (tokens every expert is "
            "calibrated on at least; 0 turns the floor off)"
        )
    for pair in args.block_mode:
        class_name, sep, spec = pair.partition("=")
        if not sep or not class_name or not spec:
            raise CliError(
                f"--block-mode {pair!r}: expected CLASS=MODE, e.g. Glm4MoeMoE=top_k:8"
            )
