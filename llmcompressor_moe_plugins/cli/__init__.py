"""``llmcompressor-moe``: quantize an MoE model, list plugins and recipes.

Thin: parses arguments and calls the library (``oneshot`` with our modifier).
``quantize`` checks everything it can before any heavy work, in this order:
arguments and recipe, output directory, dataset, model (config only, built on the
meta device to find its MoE blocks), tokenizer; then it loads the weights,
calibrates, and saves into a temporary directory that replaces ``--output`` only
when the save succeeded. Bad input ends with exit code 2 and one line on stderr.

Under ``torchrun`` (``--distributed``, or any launch of more than one process) it
runs llmcompressor's data-parallel oneshot: every process takes the same checks,
calibrates on its slice of ``--num-samples`` and takes part in saving; rank 0
writes the checkpoint and the coverage files and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from .. import recipes
from ..checkpoint.output_dir import (
    OutputDirError,
    atomic_output_dir,
    check_output_dir,
    leftover_temp_dirs,
)
from .hub import (
    ModelSource,
    SourceError,
    check_hub_dataset,
    hub_dataset_repo,
    looks_like_path,
    resolve_model,
)
from .logs import cli_logging, set_process

PROG = "llmcompressor-moe"
DEFAULT_RECIPE = "glm4_moe_w4a16_gptq"
DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 128
TEXT_SUFFIXES = (".txt", ".jsonl")


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (through ``main``)."""

    def error(self, message: str):
        raise CliError(f"{message}; see `{self.prog} --help`")


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
    quantize.add_argument(
        "--model",
        help="model directory (saved with save_pretrained) or Hugging Face Hub ID, "
        "e.g. zai-org/GLM-4.5-Air (default: built-in tiny GLM4-MoE)",
    )
    quantize.add_argument(
        "--revision", help="branch, tag or commit of a hub --model (default: main)"
    )
    quantize.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"shipped recipe name or YAML path (default: {DEFAULT_RECIPE})",
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
        help="calibration mode: routed, all, top_k:N, min_tokens:K, affinity[:S], "
        "weighted:P[,prior:L] (GPTQ runs as SharedHessianGPTQModifier then)",
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
    quantize.add_argument(
        "--floor",
        type=int,
        help="calibrate every expert on at least this many tokens (default: 64 "
        "under the default mode, 0 with --mode)",
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
    plugins.add_argument(
        "--model", help="model directory or hub ID (only its config is read)"
    )
    plugins.add_argument("--revision", help="hub revision (with a hub ID)")
    commands.add_parser("recipes", help="list shipped recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with cli_logging(verbose=getattr(args, "verbose", False)):
            if args.command == "plugins":
                if args.model:
                    return plan_command(args)
                return list_plugins_command()
            if args.command == "recipes":
                return list_recipes_command()
            return quantize_command(args)
    except (CliError, SourceError, OutputDirError) as err:
        print(f"{PROG}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    """Upstream messages (pydantic, datasets) span lines; errors here do not."""
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "errors.pydantic.dev" not in line
    ]
    return " ".join(lines).strip("'\"")


def list_recipes_command() -> int:
    for name in recipes.names():
        print(f"{name:<24} {recipes.describe(name)}")
    return 0


def list_plugins_command() -> int:
    from ..calibration.registry import list_plugins

    entries = list_plugins(load=True)
    print(f"{'block class':<20} {'calibration module':<58} {'distribution':<26} status")
    for entry in entries:
        status = "ok" if entry.loaded else f"ERROR: {entry.error}"
        print(f"{entry.name:<20} {entry.target:<58} {entry.distribution:<26} {status}")
        for shadowed in entry.shadowed:
            print(f"{'':<20} (shadowed: {shadowed})")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    """Which path each MoE block of a model takes, from its config alone."""
    from ..calibration.context import find_unregistered_moe_blocks, plan_calibration

    source = resolve_model(args.model, args.revision)
    model = _meta_model(_model_config(source), args.model)
    by_class: dict[tuple[str, str, str], list[str]] = {}
    for plan in plan_calibration(model):
        key = (plan.block_class, plan.path, plan.detail)
        by_class.setdefault(key, []).append(plan.name)
    print(
        f"{'block class':<32} {'path':<11} {'blocks':>6}  calibrated by / first block"
    )
    for (block_class, path, detail), names in by_class.items():
        how = f"module {detail}" if path == "registered" else f"dispatcher ({detail})"
        print(f"{block_class:<32} {path:<11} {len(names):>6}  {how}; {names[0]}")
    for block_class in find_unregistered_moe_blocks(model):
        print(
            f"{block_class:<32} {'none':<11} {'':>6}  its experts take no routing "
            "call the dispatcher can stand in for: register a calibration module "
            "(README, 'Adding an architecture')"
        )
    if not by_class:
        print(f"No MoE block in {args.model}: the plugin would do nothing.")
    return 0


# -- arguments and recipe ---------------------------------------------------------


def _check_arguments(args: argparse.Namespace) -> None:
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


def _block_modes(pairs: list[str]) -> dict[str, str]:
    from ..calibration.modes import parse_mode

    modes = {}
    for pair in pairs:
        class_name, sep, spec = pair.partition("=")
        if not sep or not class_name or not spec:
            raise CliError(
                f"--block-mode {pair!r}: expected CLASS=MODE, e.g. Glm4MoeMoE=top_k:8"
            )
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
    "floor",
    "seed",
    "scheme_fit",
)


def _bare_modifier_entries(node: Any, parent: str = "") -> Iterator[str]:
    """Modifier names written with no value (``GPTQModifier:``), which YAML reads
    as null and llmcompressor fails on with an AttributeError."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = str(key)
            is_modifier = name.endswith("Modifier") or parent.endswith("modifiers")
            if value is None and is_modifier:
                yield name
            else:
                yield from _bare_modifier_entries(value, name)
    elif isinstance(node, list):
        for item in node:
            yield from _bare_modifier_entries(item, parent)


def _check_recipe_yaml(path: str) -> None:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise CliError(
            f"recipe {path} is not valid YAML{where} ({problem}); fix the recipe"
        ) from None
    for name in _bare_modifier_entries(data):
        raise CliError(
            f"recipe {path}: modifier `{name}` has no arguments written as a bare "
            f"`{name}:` (YAML null); write `{name}: {{}}`"
        )


def _load_recipe_modifiers(recipe: str, args: argparse.Namespace) -> list:
    """The recipe's modifiers with ours first, configured from the flags."""
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.recipe import Recipe

    from ..modifier import MoECalibrationModifier

    try:
        path = recipes.resolve(recipe)
    except (FileNotFoundError, KeyError) as err:
        raise CliError(str(err).strip("'\"")) from None
    _check_recipe_yaml(path)
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
        from ..calibration.modes import parse_mode

        try:
            parse_mode(args.mode)
        except ValueError as err:
            raise CliError(f"--mode {args.mode}: {err}") from None
        settings["mode"] = args.mode
    if args.block_mode:
        settings["block_modes"] = _block_modes(args.block_mode)
    if args.min_tokens is not None:
        settings["min_tokens"] = args.min_tokens
    if args.rtn_fallback:
        settings["rtn_fallback"] = True
    for name in ("floor", "seed", "scheme_fit"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    try:
        if ours:
            kept = {name: getattr(ours[0], name) for name in _OUR_FIELDS}
            if "block_modes" in settings:
                settings["block_modes"] = {
                    **kept["block_modes"],
                    **settings["block_modes"],
                }
            configured = MoECalibrationModifier(**{**kept, **settings})
            modifiers = [configured] + [m for m in modifiers if m is not ours[0]]
        else:
            modifiers = [MoECalibrationModifier(**settings)] + modifiers
    except ValueError as err:
        raise CliError(f"calibration mode: {err}") from None
    if _uses_weighted_mode(modifiers[0]):
        from ..statistics.shared_hessian_gptq import with_shared_hessian_gptq

        # the shipped recipes name GPTQModifier; weighted Hessians need ours
        modifiers = with_shared_hessian_gptq(modifiers)
    return modifiers


def _uses_weighted_mode(ours) -> bool:
    from ..calibration.modes import any_weighted
    from ..modifier import DEFAULT_MODE

    mode = ours.mode
    if mode is None and ours.calibrate_all_experts is None:
        mode = DEFAULT_MODE  # the CLI never turns oneshot's all-experts flag off
    return any_weighted([mode, *ours.block_modes.values()])


# -- dataset ----------------------------------------------------------------------


@dataclass
class DatasetSource:
    """What ``--dataset`` names, checked before the model is loaded.

    :param kind: ``texts`` (read already), ``dataset`` (a local ``datasets``
        dataset, loaded already), ``registered`` (a llmcompressor dataset name,
        loaded by oneshot) or ``hub`` (a hub dataset ID, streamed at calibration)
    """

    kind: Literal["texts", "dataset", "registered", "hub"]
    name: str
    texts: Iterable[str] | None = None
    dataset: Any = None
    cached_only: bool = False


def _dataset_source(args: argparse.Namespace) -> DatasetSource:
    sources = args.dataset
    if not sources:
        from ..tiny import stdlib_texts

        return DatasetSource("texts", "stdlib", texts=stdlib_texts(skip_files=100))
    if all(Path(s).suffix in TEXT_SUFFIXES for s in sources):
        texts = list(_read_text_files(sources, args.text_column))
        return DatasetSource("texts", " ".join(sources), texts=texts)
    if len(sources) > 1:
        raise CliError(
            "--dataset takes one dataset (directory, name or hub ID), or any number "
            f"of {'/'.join(TEXT_SUFFIXES)} files; got {' '.join(sources)}"
        )
    name = sources[0]
    path = Path(name).expanduser()
    if path.is_dir():
        return DatasetSource("dataset", name, dataset=_load_local_dataset(path, name))
    if path.exists():
        raise CliError(
            f"--dataset {name}: expected {' or '.join(TEXT_SUFFIXES)} files or a "
            "dataset directory; convert it to .jsonl (one JSON object per line)"
        )
    if looks_like_path(name):
        raise CliError(f"--dataset {name}: that file or directory does not exist")
    registered = hub_dataset_repo(name)
    cached_only = check_hub_dataset(name, registered or name)
    if registered is not None:
        return DatasetSource("registered", name, cached_only=cached_only)
    return DatasetSource("hub", name, cached_only=cached_only)


def _load_local_dataset(path: Path, name: str):
    """A directory saved with ``save_to_disk``, or one of data files that
    ``datasets.load_dataset`` reads (json, csv, parquet, txt)."""
    import datasets

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(str(path))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise CliError(
            f"--dataset {name}: not a dataset directory ({_one_line(str(err))}); "
            "pass one saved with Dataset.save_to_disk, or .txt/.jsonl files"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise CliError(
                f"--dataset {name} has splits {', '.join(dataset)} but no 'train' "
                "split; save the split to calibrate on with Dataset.save_to_disk"
            )
        dataset = dataset["train"]
    return dataset


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


def _column_texts(rows: Iterable[dict], column: str, name: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise CliError(
                f"--dataset {name} has no column {column!r} (columns: "
                f"{', '.join(row)}); pass --text-column"
            )
        yield row[column]


def _calibration_dataset(source: DatasetSource, tokenizer, args: argparse.Namespace):
    """What oneshot gets as ``dataset``: ``num_samples`` windows of ``seq_len``
    tokens, or a llmcompressor dataset name."""
    from ..tiny import tokenize_for_calibration

    if source.kind == "registered":
        return source.name
    if source.kind == "dataset":
        columns = source.dataset.column_names
        if "input_ids" in columns:
            return source.dataset  # already tokenized
        texts = _column_texts(source.dataset, args.text_column, source.name)
    elif source.kind == "hub":
        texts = _hub_texts(source, args.text_column)
    else:
        texts = source.texts
    try:
        return tokenize_for_calibration(
            tokenizer, texts, args.num_samples, args.seq_len
        )
    except ValueError as err:
        raise CliError(f"--dataset {source.name}: {err}") from None


def _hub_texts(source: DatasetSource, column: str) -> Iterator[str]:
    """Streamed from the hub (only what calibration needs), or from the cache."""
    import datasets

    try:
        rows = datasets.load_dataset(
            source.name, split="train", streaming=not source.cached_only
        )
    except (OSError, ValueError, ConnectionError) as err:
        raise CliError(
            f"--dataset {source.name}: could not be loaded ({_one_line(str(err))}); "
            "pass local .txt/.jsonl files or a local dataset directory"
        ) from None
    yield from _column_texts(rows, column, source.name)


# -- model ------------------------------------------------------------------------


def _model_config(source: ModelSource):
    import transformers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.reference, **source.pretrained_kwargs()
        )
    except (OSError, ValueError, KeyError) as err:
        raise CliError(
            f"--model {source.reference}: transformers {transformers.__version__} "
            f"cannot read its config.json ({_one_line(str(err))[:200]}); pass a "
            "model this transformers version supports"
        ) from None


def _meta_model(config, label: str):
    """The model's modules on the meta device: structure without weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise CliError(
            f"--model {label}: not a causal language model transformers can build "
            f"({_one_line(str(err))[:200]}); pass a *ForCausalLM model"
        ) from None


def _moe_block_classes(model) -> list[str]:
    """The class name of every MoE block the plugin calibrates, in model order.

    Asks ``context.plan_calibration`` (registered and generic paths); without it,
    modules with ``experts`` and a ``gate`` or ``router``.
    """
    try:
        from ..calibration.context import plan_calibration
    except ImportError:
        return [
            type(module).__name__
            for module in model.modules()
            if hasattr(module, "experts")
            and (hasattr(module, "gate") or hasattr(module, "router"))
        ]
    return [plan.block_class for plan in plan_calibration(model)]


def _check_moe_blocks(blocks: list[str], args: argparse.Namespace, label: str) -> None:
    classes = list(dict.fromkeys(blocks))
    if not blocks and not args.allow_dense:
        raise CliError(
            f"--model {label} has no MoE block this plugin can calibrate (no module "
            "with experts and a router), so it would do nothing; pass --allow-dense "
            "to quantize it anyway"
        )
    for pair in args.block_mode:
        class_name = pair.partition("=")[0]
        if class_name not in classes:
            has = (
                f"its MoE block classes: {', '.join(classes)}"
                if classes
                else "it has no MoE blocks"
            )
            raise CliError(
                f"--block-mode {pair}: the model has no block of class {class_name}; "
                f"{has}"
            )


def _load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.reference, **source.pretrained_kwargs()
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise CliError(
            f"--model {source.reference}: no tokenizer could be loaded "
            f"({_one_line(str(err))[:200]}); save one beside the model "
            "(tokenizer.save_pretrained)"
        ) from None


# -- quantize ---------------------------------------------------------------------


def _save_checkpoint(model, tokenizer, report, directory: Path, source) -> None:
    """What oneshot's ``post_process`` writes (compressed weights, config,
    recipe.yaml, tokenizer), plus the source's MTP layers, which transformers
    drops on load (unquantized, as vLLM's GLM MTP loader takes them), and the
    coverage report."""
    from ..checkpoint.mtp import copy_mtp_tensors
    from ..checkpoint.verify import finish_checkpoint

    model.save_pretrained(directory, save_compressed=True)
    tokenizer.save_pretrained(directory)
    copied = copy_mtp_tensors(source.local_directory(), directory)
    if copied:
        logger.info(f"Copied {len(copied)} MTP tensor(s) from the source checkpoint")
    if report is not None:
        report.save_json(directory / "coverage.json")
        report.save_heatmap(directory / "coverage.png")
    finish_checkpoint(directory, model)


def _save_failed_coverage(report, output: Path, rank: int = 0) -> str:
    """Where the coverage of a failed run went: into --output only if that is
    new or empty (a checkpoint there is kept as it was); rank 0 writes it."""
    if report is None:
        return ""
    if rank != 0:  # the error itself is the same on every process
        return ""
    if output.is_dir() and any(output.iterdir()):
        return f" (the existing {output} was left as it was)"
    with atomic_output_dir(output) as staging:
        report.save_json(staging / "coverage.json")
    return f" (coverage report: {output / 'coverage.json'})"


@contextlib.contextmanager
def _distributed_errors_as_cli_errors() -> Iterator[None]:
    """A bad launch, too few samples for the processes, or a check that failed on
    another process: one line and exit code 2, on every process."""
    from ..distributed import DistributedSetupError, RankFailedError

    try:
        yield
    except (DistributedSetupError, RankFailedError) as err:
        raise CliError(str(err)) from None


def _start_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """``(rank, world_size)``: joins torchrun's process group with --distributed
    (an error without torchrun's environment) or when torchrun started more than
    one process (N processes must not calibrate N full copies); else ``(0, 1)``."""
    from .. import distributed

    if not args.distributed and distributed.torchrun_environment() is None:
        return 0, 1
    with _distributed_errors_as_cli_errors():
        rank, world_size = distributed.maybe_init_distributed(args.distributed)
    set_process(rank, world_size)
    if world_size > 1:
        logger.info(
            f"torchrun: {world_size} processes calibrate data-parallel, on "
            f"{args.num_samples} samples in all"
        )
    return rank, world_size


def quantize_command(args: argparse.Namespace) -> int:
    # checks first, cheapest first: nothing heavy runs before they all pass
    _check_arguments(args)
    rank, world_size = _start_distributed(args)
    try:
        return _quantize(args, rank, world_size)
    finally:
        if args.distributed or world_size > 1:
            import torch.distributed as dist

            # after this process's last collective (not itself one)
            if dist.is_initialized():
                dist.destroy_process_group()


def _quantize(args: argparse.Namespace, rank: int, world_size: int) -> int:
    from .. import distributed
    from ..modifier import MoECalibrationModifier
    from ..reporting.coverage import UndercalibratedExpertsError

    # the same checks on every process; one that fails on some process only
    # (a network error) stops all of them, none waits for the others
    with (
        _distributed_errors_as_cli_errors(),
        distributed.fail_together("checking the arguments"),
    ):
        modifiers = _load_recipe_modifiers(args.recipe, args)
        output = check_output_dir(args.output, args.overwrite)
        dataset_source = _dataset_source(args)
        if world_size > 1:  # every process gets samples, before anything loads
            distributed.rank_partition("train", args.num_samples)

    with tempfile.TemporaryDirectory(prefix="llmcompressor-moe-") as scratch:
        with (
            _distributed_errors_as_cli_errors(),
            distributed.fail_together("checking the model"),
        ):
            source, blocks = _model_source(args, output, Path(scratch), build=rank == 0)
        if world_size > 1 and args.model is None:
            # rank 0 built the tiny model; every process reads rank 0's files
            source = ModelSource(distributed.from_rank0(source and source.reference))
        with (
            _distributed_errors_as_cli_errors(),
            distributed.fail_together("preparing the calibration data"),
        ):
            tokenizer = _load_tokenizer(source)
            dataset = _calibration_dataset(dataset_source, tokenizer, args)
        num_samples = args.num_samples
        if world_size > 1 and not isinstance(dataset, str):
            # this process's slice (a dataset name: oneshot loads the same data
            # on every process and slices it itself)
            total = min(args.num_samples, len(dataset))
            dataset = dataset.select(distributed.rank_slice(total))
            with _distributed_errors_as_cli_errors():
                distributed.require_data_on_every_rank(len(dataset))
            num_samples = len(dataset)
        if not blocks:  # and --allow-dense, else _model_source refused it
            logger.warning(
                f"No MoE block found in {args.model}: the plugin does nothing; "
                "quantizing it as a dense model (--allow-dense)"
            )
            modifiers = [
                m for m in modifiers if not isinstance(m, MoECalibrationModifier)
            ]
        ours = next(
            (m for m in modifiers if isinstance(m, MoECalibrationModifier)), None
        )

        model = _load_model(
            source, blocks, args.model or "the tiny GLM4-MoE", world_size
        )
        try:
            _calibrate(
                model, tokenizer, dataset, modifiers, args, num_samples=num_samples
            )
        except UndercalibratedExpertsError as err:
            # raised on every process at the same layer, from summed counts
            where = _save_failed_coverage(ours.coverage_report, output, rank)
            raise CliError(f"{err}{where}") from None
        report = ours.coverage_report if ours is not None else None

        if rank == 0:
            for leftover in leftover_temp_dirs(output):
                logger.warning(
                    f"{leftover} was left by an interrupted run; delete it unless "
                    "another run is writing there"
                )
            logger.info(f"Saving the quantized model to {output}")
        with contextlib.ExitStack() as stack:
            # every process takes part in compressing the shared weights
            # (collectives); rank 0 writes
            with (
                _distributed_errors_as_cli_errors(),
                distributed.fail_together("creating the output directory"),
            ):
                staging = (
                    stack.enter_context(atomic_output_dir(output, args.overwrite))
                    if rank == 0
                    else None
                )
            if staging is not None:
                _save_checkpoint(model, tokenizer, report, staging, source)
            else:  # the directory is not written on ranks other than 0
                model.save_pretrained(Path(scratch) / "unused", save_compressed=True)

    if rank != 0:
        return 0
    if report is None:
        print(f"Quantized model (dense: no coverage report) written to {output}")
        return 0
    if not report.blocks:
        logger.warning("The plugin calibrated no MoE block; coverage.json is empty")
    print(report.format_table())
    print(f"Quantized model, coverage.json and coverage.png written to {output}")
    return 0


def _model_source(
    args: argparse.Namespace, output: Path, scratch: Path, build: bool = True
) -> tuple[ModelSource | None, list[str]]:
    """The model to load and its MoE block classes, checked from its config
    alone (modules built on the meta device); the embedded tiny model is built
    in ``scratch`` once the checks pass (unless ``build`` is False: then the
    source is None)."""
    if args.model is None:
        from ..tiny import build_tiny_glm4_moe, tiny_glm4_moe_config, train_tokenizer

        blocks = _moe_block_classes(_meta_model(tiny_glm4_moe_config(), "tiny"))
        _check_moe_blocks(blocks, args, "tiny")
        if not build:
            return None, blocks
        logger.info("No --model: building a tiny GLM4-MoE and its tokenizer")
        tiny = build_tiny_glm4_moe(
            scratch / "tiny-glm4-moe", tokenizer=train_tokenizer()
        )
        return ModelSource(str(tiny)), blocks

    source = resolve_model(args.model, args.revision)
    if not source.on_hub and Path(source.reference).resolve().is_relative_to(output):
        raise CliError(
            f"--output {args.output} holds the model directory {args.model}; "
            "pass another --output"
        )
    blocks = _moe_block_classes(_meta_model(_model_config(source), args.model))
    _check_moe_blocks(blocks, args, args.model)
    return source, blocks


def _load_model(
    source: ModelSource, blocks: list[str], label: str, world_size: int = 1
):
    from transformers import AutoModelForCausalLM

    if source.on_hub:
        label = source.describe()
    classes = ", ".join(dict.fromkeys(blocks)) or "none"
    logger.info(f"Loading {label} ({len(blocks)} MoE block(s) of class {classes})")
    if world_size == 1:
        return AutoModelForCausalLM.from_pretrained(
            source.reference, **source.pretrained_kwargs()
        )
    from compressed_tensors.offload import load_offloaded_model

    # rank 0 reads the checkpoint into shared CPU memory, the others map it: one
    # copy of the weights in RAM however many processes
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(
            source.reference, device_map="auto_offload", **source.pretrained_kwargs()
        )


def _calibrate(
    model, tokenizer, dataset, modifiers, args, num_samples: int | None = None
) -> None:
    """``num_samples``: this process's (its slice under torchrun); default
    ``--num-samples``."""
    from llmcompressor import oneshot

    from ..upstream import keep_logging_configuration
    from ..upstream.compat import cpu_only_calibration

    num_samples = args.num_samples if num_samples is None else num_samples
    share = "" if num_samples == args.num_samples else f" ({num_samples} here)"
    logger.info(
        f"Calibrating with {args.recipe} on {args.num_samples} samples{share} x "
        f"{args.seq_len} tokens"
    )
    with cpu_only_calibration(), keep_logging_configuration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=modifiers,
            num_calibration_samples=num_samples,
            max_seq_length=args.seq_len,
        )
