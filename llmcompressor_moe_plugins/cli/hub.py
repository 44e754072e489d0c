"""Where ``--model`` and ``--dataset`` live: a local path or the Hugging Face Hub.

Hub references are checked before any heavy work, through the hub cache the way
transformers and datasets use it: ``HF_HUB_OFFLINE=1`` (or an unreachable hub)
falls back to the cache, and a reference that is neither cached nor reachable
fails with one line that says how to pass a local copy instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from loguru import logger

__all__ = [
    "SourceError",
    "ModelSource",
    "resolve_model",
    "hub_dataset_repo",
    "check_hub_dataset",
    "is_offline",
    "looks_like_path",
]


class SourceError(ValueError):
    """A model or dataset that cannot be used; one line naming the fix."""


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
    ]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # pragma: no cover - huggingface_hub >= 1.0 uses httpx
        pass
    try:
        import requests

        errors.append(requests.exceptions.RequestException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, now or at import."""
    from_env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get(
        "TRANSFORMERS_OFFLINE"
    )
    return constants.is_offline_mode() or (
        from_env is not None
        and from_env.strip().upper() in constants.ENV_VARS_TRUE_VALUES
    )


def _why_unreachable(err: BaseException | None) -> str:
    if err is None or isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return "offline mode: HF_HUB_OFFLINE is set"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class ModelSource:
    """A model as ``from_pretrained`` takes it.

    :param reference: a local directory, or a hub ID such as ``owner/name``
    :param revision: branch, tag or commit of a hub model
    :param local_files_only: load from the hub cache only (offline, or the hub
        could not be reached but the model is cached)
    :param on_hub: ``reference`` is a hub ID, not a local directory
    :param trust_remote_code: run the model's own code (``--trust-remote-code``)
    """

    reference: str
    revision: str | None = None
    local_files_only: bool = False
    on_hub: bool = False
    trust_remote_code: bool = False

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the ``from_pretrained`` of the Auto classes
        (config, model and tokenizer alike)."""
        kwargs: dict[str, Any] = {}
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if self.on_hub:
            kwargs.update(
                revision=self.revision, local_files_only=self.local_files_only
            )
        return kwargs

    def local_directory(self) -> Path:
        """Where the model's files are on this machine (for a hub model, its
        cached snapshot: from_pretrained has fetched every shard by then)."""
        if not self.on_hub:
            return Path(self.reference)
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                self.reference, revision=self.revision, local_files_only=True
            )
        )

    def describe(self) -> str:
        if not self.on_hub:
            return self.reference
        where = "hub cache" if self.local_files_only else "hub"
        return f"{self.reference}@{self.revision or 'main'} ({where})"


def looks_like_path(reference: str) -> bool:
    """A path, not an ``owner/name`` hub ID."""
    return (
        reference.startswith(("/", ".", "~"))
        or reference.count("/") > 1
        or "\\" in reference
        or Path(reference).suffix in (".txt", ".jsonl", ".json", ".csv", ".parquet")
    )


def resolve_model(reference: str, revision: str | None = None) -> ModelSource:
    """Check that ``reference`` is a loadable model before anything is loaded.

    A local directory must hold ``config.json``. A hub ID is looked up on the hub
    (or, offline, in its cache) and its ``config.json`` fetched into the cache.
    """
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(
                f"--model {reference} is a file; pass a model directory (saved with "
                "save_pretrained) or a Hugging Face Hub ID such as zai-org/GLM-4.5-Air"
            )
        if not (path / "config.json").is_file():
            raise SourceError(
                f"--model {reference}: no config.json in that directory; pass a model "
                "directory saved with save_pretrained, or a Hugging Face Hub ID such "
                "as zai-org/GLM-4.5-Air"
            )
        if revision is not None:
            raise SourceError(
                f"--revision {revision} applies to hub IDs; --model {reference} is a "
                "local directory: drop --revision"
            )
        return ModelSource(str(path))
    if looks_like_path(reference):
        raise SourceError(
            f"--model {reference}: no such directory; pass an existing model "
            "directory or a Hugging Face Hub ID such as zai-org/GLM-4.5-Air"
        )
    _validate_repo_id(reference, "--model", "a model directory")
    local_only = is_offline()
    why = _why_unreachable(None)
    hint = (
        f"pass a local model directory instead (download it where the hub is "
        f"reachable: `hf download {reference} --local-dir DIR`, then --model DIR)"
    )
    if not local_only:
        try:
            huggingface_hub.HfApi().model_info(reference, revision=revision)
        except NETWORK_ERRORS as err:
            why = _why_unreachable(err)
            if not _cached(reference, revision, "model"):
                raise SourceError(
                    f"--model {reference}: the Hugging Face Hub cannot be reached "
                    f"({why}) and the model is not in the local cache; {hint}"
                ) from None
            logger.warning(
                f"The Hugging Face Hub cannot be reached; using the cached copy of "
                f"{reference}"
            )
            local_only = True
        except HfHubHTTPError as err:
            raise _hub_http_error("--model", reference, revision, err) from None
    try:
        huggingface_hub.hf_hub_download(
            reference, "config.json", revision=revision, local_files_only=local_only
        )
    except LocalEntryNotFoundError:
        raise SourceError(
            f"--model {reference}: the Hugging Face Hub cannot be reached ({why}) "
            f"and {_revision_text(reference, revision)} is not in the local cache; "
            f"{hint}"
        ) from None
    except EntryNotFoundError:
        raise SourceError(
            f"--model {reference}: the hub repository has no config.json, so it is "
            "not a transformers model; pass a transformers model's hub ID or directory"
        ) from None
    except NETWORK_ERRORS as err:
        raise SourceError(
            f"--model {reference}: the Hugging Face Hub cannot be reached "
            f"({_why_unreachable(err)}); {hint}"
        ) from None
    except HfHubHTTPError as err:
        raise _hub_http_error("--model", reference, revision, err) from None
    return ModelSource(reference, revision, local_only, on_hub=True)


def _revision_text(reference: str, revision: str | None) -> str:
    return reference if revision is None else f"{reference} at revision {revision}"


def _validate_repo_id(reference: str, flag: str, local_kind: str) -> None:
    try:
        huggingface_hub.utils.validate_repo_id(reference)
    except HFValidationError:
        raise SourceError(
            f"{flag} {reference}: neither {local_kind} that exists nor a valid "
            "Hugging Face Hub ID (owner/name); check the path or the ID"
        ) from None


def _hub_http_error(
    flag: str, reference: str, revision: str | None, err: HfHubHTTPError
) -> SourceError:
    kind = "dataset" if flag == "--dataset" else "model"
    local = (
        "dataset directory or .txt/.jsonl files"
        if kind == "dataset"
        else "model directory"
    )
    if isinstance(err, GatedRepoError):
        return SourceError(
            f"{flag} {reference} is gated on the Hugging Face Hub; accept its terms on "
            f"huggingface.co/{'datasets/' if kind == 'dataset' else ''}{reference} and "
            "log in (`hf auth login`), or pass a local copy"
        )
    if isinstance(err, RepositoryNotFoundError):
        return SourceError(
            f"{flag} {reference}: no {kind} of that name on the Hugging Face Hub (or "
            "it is private: log in with `hf auth login`); check the ID, or pass a "
            f"local {local}"
        )
    if isinstance(err, RevisionNotFoundError):
        return SourceError(
            f"--revision {revision}: {reference} has no such branch, tag or commit "
            "on the Hugging Face Hub; pass an existing one"
        )
    status = getattr(getattr(err, "response", None), "status_code", "?")
    return SourceError(
        f"{flag} {reference}: the Hugging Face Hub answered HTTP {status}; try again "
        "later, or pass a local copy"
    )


def _cached(repo_id: str, revision: str | None, repo_type: str) -> bool:
    try:
        huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, local_files_only=True
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return repo_type == "dataset" and _in_datasets_cache(repo_id)
    return True


def _in_datasets_cache(repo_id: str) -> bool:
    """datasets' own processed cache (``owner___name``), usable offline."""
    try:
        import datasets.config
    except ImportError:  # pragma: no cover
        return False
    root = Path(datasets.config.HF_DATASETS_CACHE)
    return (root / repo_id.replace("/", "___")).is_dir()


def hub_dataset_repo(name: str) -> str | None:
    """The hub dataset behind one of llmcompressor's registered dataset names
    (``open_platypus`` -> ``garage-bAInd/Open-Platypus``); None for other names."""
    from llmcompressor.args import DatasetArguments
    from llmcompressor.transformers.data import TextGenerationDataset

    try:
        dataset = TextGenerationDataset.load_from_registry(
            name,
            dataset_args=DatasetArguments(dataset=name),
            split=None,
            processor=None,
        )
    except Exception:  # not registered (the registry raises KeyError or ValueError)
        return None
    repo = dataset.dataset_args.dataset
    return repo if isinstance(repo, str) else name


def check_hub_dataset(name: str, repo_id: str) -> bool:
    """Check that hub dataset ``repo_id`` (given as ``name``) can be loaded; True
    when it must come from the cache (offline, or the hub cannot be reached)."""
    _validate_repo_id(repo_id, "--dataset", "a local file or directory")
    hint = (
        "pass local .txt/.jsonl files or a local dataset directory (saved with "
        "Dataset.save_to_disk) instead"
    )
    shown = name if name == repo_id else f"{name} ({repo_id})"
    if is_offline():
        if _cached(repo_id, None, "dataset"):
            return True
        raise SourceError(
            f"--dataset {shown}: the Hugging Face Hub cannot be reached "
            f"({_why_unreachable(None)}) and the dataset is not in the local cache; "
            f"{hint}"
        )
    try:
        huggingface_hub.HfApi().dataset_info(repo_id)
    except NETWORK_ERRORS as err:
        if _cached(repo_id, None, "dataset"):
            logger.warning(
                f"The Hugging Face Hub cannot be reached; using the cached copy of "
                f"dataset {repo_id}"
            )
            return True
        raise SourceError(
            f"--dataset {shown}: the Hugging Face Hub cannot be reached "
            f"({_why_unreachable(err)}) and the dataset is not in the local cache; "
            f"{hint}"
        ) from None
    except HfHubHTTPError as err:
        raise _hub_http_error("--dataset", name, None, err) from None
    return False
