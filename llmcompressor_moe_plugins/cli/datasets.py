"""``--dataset``: local files, a local dataset directory, a llmcompressor dataset
name or a hub dataset ID; checked before the model is loaded."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .args import CliError, one_line
from .hub import check_hub_dataset, hub_dataset_repo, looks_like_path

__all__ = [
    "DatasetSource",
    "check_dataset_paths",
    "dataset_source",
    "calibration_dataset",
]

TEXT_SUFFIXES = (".txt", ".jsonl")


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


def check_dataset_paths(args: argparse.Namespace) -> None:
    """The path errors ``--dataset`` can have, without importing anything heavy."""
    sources = args.dataset or []
    if sources and all(Path(s).suffix in TEXT_SUFFIXES for s in sources):
        for _ in _read_text_files(sources, args.text_column):
            pass
        return
    if len(sources) > 1:
        raise CliError(
            "--dataset takes one dataset (directory, name or hub ID), or any number "
            f"of {'/'.join(TEXT_SUFFIXES)} files; got {' '.join(sources)}"
        )
    for name in sources:
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise CliError(
                f"--dataset {name}: expected {' or '.join(TEXT_SUFFIXES)} files or a "
                "dataset directory; convert it to .jsonl (one JSON object per line)"
            )
        if not path.exists() and looks_like_path(name):
            raise CliError(f"--dataset {name}: that file or directory does not exist")


def dataset_source(args: argparse.Namespace) -> DatasetSource:
    check_dataset_paths(args)
    sources = args.dataset
    if not sources:
        from ..tiny import stdlib_texts

        return DatasetSource("texts", "stdlib", texts=stdlib_texts(skip_files=100))
    if all(Path(s).suffix in TEXT_SUFFIXES for s in sources):
        texts = list(_read_text_files(sources, args.text_column))
        return DatasetSource("texts", " ".join(sources), texts=texts)
    name = sources[0]
    path = Path(name).expanduser()
    if path.is_dir():
        return DatasetSource("dataset", name, dataset=_load_local_dataset(path, name))
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
            f"--dataset {name}: not a dataset directory ({one_line(str(err))}); "
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


def _read_text_files(paths: list[str], text_column: str) -> Iterator[str]:
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


def calibration_dataset(source: DatasetSource, tokenizer, args: argparse.Namespace):
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
        raise CliError(f"--dataset {source.name}: {one_line(str(err))}") from None


def _hub_texts(source: DatasetSource, column: str) -> Iterator[str]:
    """Streamed from the hub (only what calibration needs), or from the cache."""
    import datasets

    try:
        rows = datasets.load_dataset(
            source.name, split="train", streaming=not source.cached_only
        )
    except (OSError, ValueError, ConnectionError) as err:
        raise CliError(
            f"--dataset {source.name}: could not be loaded ({one_line(str(err))}); "
            "pass local .txt/.jsonl files or a local dataset directory"
        ) from None
    yield from _column_texts(rows, column, source.name)
