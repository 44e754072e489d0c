"""Writing the checkpoint: what oneshot's ``post_process`` writes, plus the
source's MTP layers and the coverage files; and a failed run's coverage."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from ..checkpoint.output_dir import atomic_output_dir

__all__ = ["save_checkpoint", "save_failed_coverage"]


def save_checkpoint(
    model, tokenizer, report, directory: Path, source, trust_remote_code=False
) -> None:
    """Compressed weights, config, recipe.yaml, tokenizer; the source's MTP
    layers, which transformers drops on load (unquantized, as vLLM's GLM MTP
    loader takes them); and the coverage report. Then the checkpoint's check
    (:func:`~..checkpoint.verify.finish_checkpoint`): it loads as saved, or the
    run fails and ``directory`` (a staging directory) never becomes the output."""
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
    finish_checkpoint(directory, model, trust_remote_code=trust_remote_code)


def save_failed_coverage(report, output: Path, rank: int = 0) -> str:
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
