"""``llmcompressor-moe``: quantize an MoE model, list plugins and recipes.

Thin: parses arguments and calls the library (``oneshot`` with our modifier).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from loguru import logger

from . import recipes

DEFAULT_RECIPE = "glm4_moe_w4a16_gptq"
DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 128


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcompressor-moe",
        description="Quantize Mixture-of-Experts models with llmcompressor, "
        "calibrating every expert.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser(
        "quantize",
        help="run oneshot with MoE calibration modules; without --model, on a "
        "tiny GLM4-MoE built on the spot",
    )
    quantize.add_argument("--model", help="model directory (default: built-in tiny)")
    quantize.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"shipped recipe name or YAML path (default: {DEFAULT_RECIPE})",
    )
    quantize.add_argument("--output", default="moe-quantized", help="output directory")
    quantize.add_argument(
        "--dataset",
        nargs="+",
        help="HF datasets name or local path, or local .txt/.jsonl files "
        "(default: the Python standard library's source)",
    )
    quantize.add_argument("--text-column", default="text", help="for .jsonl files")
    quantize.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    quantize.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    mode = quantize.add_mutually_exclusive_group()
    mode.add_argument(
        "--routed-only",
        action="store_true",
        help="calibrate experts on routed tokens only (mode 'routed')",
    )
    mode.add_argument(
        "--mode",
        help="calibration mode: routed, all, top_k:N, min_tokens:K, affinity[:S]",
    )
    quantize.add_argument(
        "--block-mode",
        action="append",
        default=[],
        metavar="CLASS=MODE",
        help="mode for one MoE block class, e.g. Glm4MoeMoE=top_k:8 (repeatable)",
    )
    quantize.add_argument(
        "--min-tokens",
        type=int,
        help="fail if an expert is calibrated on fewer tokens (default 1)",
    )
    quantize.add_argument(
        "--rtn-fallback",
        action="store_true",
        help="quantize under-calibrated experts round-to-nearest instead of failing",
    )

    commands.add_parser("plugins", help="list discovered calibration modules")
    commands.add_parser("recipes", help="list shipped recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plugins":
            return list_plugins_command()
        if args.command == "recipes":
            return list_recipes_command()
        return quantize_command(args)
    except CliError as err:
        print(f"llmcompressor-moe: error: {err}", file=sys.stderr)
        return 2


def list_recipes_command() -> int:
    for name in recipes.names():
        print(f"{name:<24} {recipes.describe(name)}")
    return 0


def list_plugins_command() -> int:
    from .registry import list_plugins

    entries = list_plugins(load=True)
    print(f"{'block class':<20} {'calibration module':<58} {'distribution':<26} status")
    for entry in entries:
        status = "ok" if entry.loaded else f"ERROR: {entry.error}"
        print(f"{entry.name:<20} {entry.target:<58} {entry.distribution:<26} {status}")
        for shadowed in entry.shadowed:
            print(f"{'':<20} (shadowed: {shadowed})")
    return 0


def _block_modes(pairs: list[str]) -> dict[str, str]:
    from .modes import parse_mode

    modes = {}
    for pair in pairs:
        class_name, sep, spec = pair.partition("=")
        if not sep or not class_name or not spec:
            raise CliError(f"--block-mode {pair!r}: expected CLASS=MODE")
        try:
            parse_mode(spec)
        except ValueError as err:
            raise CliError(f"--block-mode {pair!r}: {err}") from None
        modes[class_name] = spec
    return modes


_OUR_FIELDS = (
    "calibrate_all_experts",
    "mode",
    "block_modes",
    "chunk_size",
    "min_tokens",
    "rtn_fallback",
)


def _load_recipe_modifiers(recipe: str, args: argparse.Namespace) -> list:
    """The recipe's modifiers with ours first, configured from the flags."""
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.recipe import Recipe

    from .modifier import MoECalibrationModifier

    try:
        path = recipes.resolve(recipe)
    except (FileNotFoundError, KeyError) as err:
        raise CliError(str(err).strip("'\"")) from None
    try:
        modifiers = list(Recipe.create_instance(path).modifiers)
    except Exception as err:
        raise CliError(f"recipe {path} is invalid: {err}") from None
    if not any(isinstance(m, QuantizationMixin) for m in modifiers):
        raise CliError(
            f"recipe {path} has no quantization modifier (GPTQModifier, "
            "QuantizationModifier, ...); add one, or pick a shipped recipe "
            "(llmcompressor-moe recipes)"
        )
    ours = [m for m in modifiers if isinstance(m, MoECalibrationModifier)]
    settings = {}
    if args.routed_only:
        settings["mode"] = "routed"
    elif args.mode:
        from .modes import parse_mode

        try:
            parse_mode(args.mode)
        except ValueError as err:
            raise CliError(f"--mode: {err}") from None
        settings["mode"] = args.mode
    if args.block_mode:
        settings["block_modes"] = _block_modes(args.block_mode)
    if args.min_tokens is not None:
        settings["min_tokens"] = args.min_tokens
    if args.rtn_fallback:
        settings["rtn_fallback"] = True
    try:
        if ours:
            kept = {name: getattr(ours[0], name) for name in _OUR_FIELDS}
            configured = MoECalibrationModifier(**{**kept, **settings})
            modifiers = [configured] + [m for m in modifiers if m is not ours[0]]
        else:
            modifiers = [MoECalibrationModifier(**settings)] + modifiers
    except ValueError as err:
        raise CliError(f"calibration mode: {err}") from None
    return modifiers


def _calibration_dataset(args: argparse.Namespace, tokenizer):
    from .tiny import stdlib_texts, tokenize_for_calibration

    sources = args.dataset
    if not sources:
        texts = stdlib_texts(skip_files=100)
    elif all(Path(s).suffix in (".txt", ".jsonl") for s in sources):
        texts = list(_read_text_files(sources, args.text_column))
    elif len(sources) == 1:
        return sources[0]  # a datasets name or path: oneshot loads it
    else:
        raise CliError(
            "--dataset takes one datasets name/path, or any number of .txt/.jsonl files"
        )
    try:
        return tokenize_for_calibration(
            tokenizer, texts, args.num_samples, args.seq_len
        )
    except ValueError as err:
        raise CliError(str(err)) from None


def _read_text_files(paths: list[str], text_column: str):
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise CliError(f"dataset file {path} does not exist")
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[text_column]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CliError(
                    f"{path}:{number}: expected a JSON object with a "
                    f"{text_column!r} field (set --text-column)"
                ) from None


def quantize_command(args: argparse.Namespace) -> int:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .compat import cpu_only_calibration
    from .coverage import UndercalibratedExpertsError

    modifiers = _load_recipe_modifiers(args.recipe, args)
    output = Path(args.output)

    with tempfile.TemporaryDirectory(prefix="llmcompressor-moe-") as scratch:
        if args.model is None:
            from .tiny import build_tiny_glm4_moe, train_tokenizer

            logger.info("No --model: building a tiny GLM4-MoE and its tokenizer")
            model_path = build_tiny_glm4_moe(
                Path(scratch) / "tiny-glm4-moe", tokenizer=train_tokenizer()
            )
        else:
            model_path = Path(args.model)
            if not (model_path / "config.json").is_file():
                raise CliError(
                    f"--model {model_path}: no config.json there; pass a model "
                    "directory saved with save_pretrained"
                )
        model = AutoModelForCausalLM.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        dataset = _calibration_dataset(args, tokenizer)

        ours = modifiers[0]
        try:
            with cpu_only_calibration():
                oneshot(
                    model=model,
                    processor=tokenizer,
                    dataset=dataset,
                    recipe=modifiers,
                    output_dir=str(output),
                    num_calibration_samples=args.num_samples,
                    max_seq_length=args.seq_len,
                )
        except UndercalibratedExpertsError as err:
            # nothing was saved; the report shows which experts starved
            output.mkdir(parents=True, exist_ok=True)
            ours.coverage_report.save_json(output / "coverage.json")
            raise CliError(str(err)) from None

    report = ours.coverage_report
    report.save_json(output / "coverage.json")
    report.save_heatmap(output / "coverage.png")
    print(report.format_table())
    print(f"Quantized model, coverage.json and coverage.png written to {output}")
    return 0
