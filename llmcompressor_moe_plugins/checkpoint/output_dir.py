"""A checkpoint directory that is complete or absent.

Everything is written into a temporary directory beside the target (same parent,
so the final move is a rename on one filesystem) and moved into place only when
the body finished. On any exception, ``KeyboardInterrupt`` included, the temporary
directory is removed and the target keeps its old content (or stays absent).
Replacing a non-empty target takes ``overwrite=True`` and replaces it as a whole:
old and new files are never mixed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputDirError",
    "check_output_dir",
    "atomic_output_dir",
    "staged_output_dir",
    "leftover_temp_dirs",
]

_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"


class OutputDirError(ValueError):
    """The target cannot become the checkpoint; the message names the fix."""


def check_output_dir(target: str | Path, overwrite: bool = False) -> Path:
    """The absolute target path, if a checkpoint can be written there.

    Refuses a path that is a file, a non-empty directory unless ``overwrite``, a
    directory that holds the current working directory, and a location where no
    directory can be created (e.g. under ``/proc``). Creates nothing.
    """
    given = str(target)
    path = Path(target).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputDirError(
            f"--output {given} is a file, not a directory; pass a directory path"
        )
    if path.parent == path:
        raise OutputDirError(f"--output {given} is a filesystem root; pass a subdir")
    if path.is_dir():
        if Path.cwd().resolve().is_relative_to(path):
            raise OutputDirError(
                f"--output {given} holds the current directory and cannot be "
                "replaced; pass a new directory path"
            )
        entries = sum(1 for _ in path.iterdir())
        if entries and not overwrite:
            raise OutputDirError(
                f"--output {given} is not empty ({entries} entries); pass "
                "--overwrite to replace it as a whole, or a new directory path"
            )
    _probe_writable(path.parent, given)
    return path


def _probe_writable(parent: Path, given: str) -> None:
    """Create and remove a directory in ``parent``, or in its nearest existing
    ancestor when ``parent`` does not exist yet (it is created at save time)."""
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(
            f"--output {given}: {existing} is a file, so no directory can be "
            "created below it; pass another path"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".llmcompressor-moe-probe-", dir=existing)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputDirError(
            f"--output {given}: cannot create a directory in {existing} "
            f"({reason}); pass a writable location"
        ) from None
    os.rmdir(probe)


def leftover_temp_dirs(target: str | Path) -> list[Path]:
    """Temporary directories beside ``target`` that a killed run left behind."""
    path = Path(target).expanduser().resolve()
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}{_TMP_INFIX}", f".{path.name}{_OLD_INFIX}")
    return sorted(
        entry
        for entry in path.parent.iterdir()
        if entry.name.startswith(prefixes) and entry.is_dir()
    )


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; when the body
    returns, it becomes ``target``. On any exception the temporary directory is
    removed and ``target`` is left as it was."""
    path = check_output_dir(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{path.name}{_TMP_INFIX}", dir=path.parent)
    )
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 is for temp dirs
        yield staging
        with _interrupts_deferred():
            _move_into_place(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_output_dir(target: str | Path) -> Iterator[Path]:
    """For oneshot's own save: yield an empty directory beside ``target``; when
    the body returns, its entries replace the same-named ones in ``target``
    (created if absent) and the other entries of ``target`` stay, as upstream's
    in-place save leaves them. On any exception the staging directory is removed
    and ``target`` is left as it was."""
    path = Path(target).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{path.name}{_TMP_INFIX}", dir=path.parent)
    )
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        with _interrupts_deferred():
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            if not path.exists():
                os.rename(staging, path)
                return
            for entry in staging.iterdir():
                destination = path / entry.name
                if destination.is_dir() and not destination.is_symlink():
                    shutil.rmtree(destination)
                os.replace(entry, destination)
            staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.rename(staging, path)
        return
    if not overwrite:  # something was written there while we calibrated
        raise OutputDirError(
            f"--output {path} was filled by something else during the run; "
            "pass --overwrite or a new directory path"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}{_OLD_INFIX}", dir=path.parent))
    os.rename(path, aside / path.name)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(aside / path.name, path)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C during the renames (main thread only) and raise it after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda *frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if not received:
        return
    if callable(previous):
        previous(*received[0])
    elif previous == signal.SIG_DFL:
        raise KeyboardInterrupt
