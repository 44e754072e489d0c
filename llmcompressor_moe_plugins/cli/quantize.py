"""``llmcompressor-moe quantize``: the heavy part, once the cheap checks passed.

Checks first, cheapest first (recipe's modifiers, output directory, dataset,
model config and MoE blocks, tokenizer); then it loads the weights, calibrates,
and saves into a temporary directory that replaces ``--output`` only when the
save succeeded. Under torchrun every process takes the same checks, calibrates
its slice and takes part in saving; rank 0 writes and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from ..checkpoint.output_dir import atomic_output_dir, leftover_temp_dirs
from . import datasets, models, saving
from .args import CliError
from .hub import ModelSource
from .logs import set_process
from .recipe import choose_recipe, load_recipe_modifiers, recipe_choice_line

__all__ = ["quantize_command", "calibrate"]


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


def quantize_command(args: argparse.Namespace, recipe_path: str, output: Path) -> int:
    """``recipe_path`` and ``output`` were checked already (``cli.preflight``)."""
    rank, world_size = _start_distributed(args)
    try:
        return _quantize(args, recipe_path, output, rank, world_size)
    finally:
        if args.distributed or world_size > 1:
            import torch.distributed as dist

            # after this process's last collective (not itself one)
            if dist.is_initialized():
                dist.destroy_process_group()


def _quantize(
    args: argparse.Namespace, recipe_path: str, output: Path, rank: int, world: int
) -> int:
    from .. import distributed
    from ..modifier import MoECalibrationModifier
    from ..reporting.coverage import UndercalibratedExpertsError

    # the same checks on every process; one that fails on some process only
    # (a network error) stops all of them, none waits for the others
    with (
        _distributed_errors_as_cli_errors(),
        distributed.fail_together("checking the arguments"),
    ):
        modifiers = load_recipe_modifiers(recipe_path, args)
        dataset_source = datasets.dataset_source(args)
        if world > 1:  # every process gets samples, before anything loads
            distributed.rank_partition("train", args.num_samples)

    with tempfile.TemporaryDirectory(prefix="llmcompressor-moe-") as scratch:
        with (
            _distributed_errors_as_cli_errors(),
            distributed.fail_together("checking the model"),
        ):
            source, blocks = models.model_source(
                args, output, Path(scratch), build=rank == 0
            )
        if world > 1 and args.model is None:
            # rank 0 built the tiny model; every process reads rank 0's files
            source = ModelSource(distributed.from_rank0(source and source.reference))
        with (
            _distributed_errors_as_cli_errors(),
            distributed.fail_together("preparing the calibration data"),
        ):
            tokenizer = models.load_tokenizer(source)
            dataset = datasets.calibration_dataset(dataset_source, tokenizer, args)
        num_samples = args.num_samples
        if world > 1 and not isinstance(dataset, str):
            # this process's slice (a dataset name: oneshot loads the same data
            # on every process and slices it itself)
            total = min(args.num_samples, len(dataset))
            dataset = dataset.select(distributed.rank_slice(total))
            with _distributed_errors_as_cli_errors():
                distributed.require_data_on_every_rank(len(dataset))
            num_samples = len(dataset)
        if not blocks:  # and --allow-dense, else model_source refused it
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

        model = models.load_model(
            source, blocks, args.model or "the tiny GLM4-MoE", world
        )
        try:
            calibrate(
                model, tokenizer, dataset, modifiers, args, num_samples=num_samples
            )
        except UndercalibratedExpertsError as err:
            # raised on every process at the same layer, from summed counts
            where = saving.save_failed_coverage(ours.coverage_report, output, rank)
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
                saving.save_checkpoint(
                    model,
                    tokenizer,
                    report,
                    staging,
                    source,
                    trust_remote_code=args.trust_remote_code,
                )
            else:  # the directory is not written on ranks other than 0
                model.save_pretrained(Path(scratch) / "unused", save_compressed=True)

    if rank != 0:
        return 0
    if report is None:
        print(f"Quantized model (dense: no coverage report) written to {output}")
        return 0
    if not report.blocks:
        logger.warning("The plugin calibrated no MoE block; coverage.json is empty")
    print(report.format_table() if args.verbose else quiet_report(report))
    print(f"Quantized model, coverage.json and coverage.png written to {output}")
    return 0


def quiet_report(report) -> str:
    """Three lines however many experts: the counts' range, the settings that
    were applied, and the least-calibrated expert (every expert: coverage.json,
    or the table with -v)."""
    if not report.blocks:
        return report.format_table()
    summary = report.format_table(limit=0).splitlines()[3:]
    worst = report.rows()[0]
    return "\n".join(
        [
            f"Expert coverage, {report.describe_pass()}: {summary[0]}",
            *summary[1:],
            f"Least calibrated: {worst['block']} expert {worst['expert']} "
            f"({worst['calibrated']} tokens, {worst['routed']} routed); every "
            "expert: coverage.json, coverage.png (-v: the table)",
        ]
    )


def calibrate(
    model, tokenizer, dataset, modifiers, args, num_samples: int | None = None
) -> None:
    """``num_samples``: this process's (its slice under torchrun); default
    ``--num-samples``."""
    from llmcompressor import oneshot

    from ..upstream import keep_logging_configuration
    from ..upstream.compat import cpu_only_calibration

    num_samples = args.num_samples if num_samples is None else num_samples
    share = "" if num_samples == args.num_samples else f" ({num_samples} here)"
    choice = recipe_choice_line(args)
    if choice:
        logger.info(choice)
    logger.info(
        f"Calibrating with {choose_recipe(args)} on {args.num_samples} samples"
        f"{share} x {args.seq_len} tokens"
    )
    with cpu_only_calibration(), keep_logging_configuration():
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=modifiers,
            num_calibration_samples=num_samples,
            max_seq_length=args.seq_len,
            trust_remote_code_model=getattr(args, "trust_remote_code", False),
        )
