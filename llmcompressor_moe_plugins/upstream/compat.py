"""Workarounds for upstream behaviour on machines without an accelerator, and
torch's in-place change counter of a tensor."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from compressed_tensors.utils import patch_attr

__all__ = ["cpu_only_calibration", "tensor_version"]


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


@contextlib.contextmanager
def cpu_only_calibration() -> Iterator[None]:
    """Let pipelines that cache intermediates (AWQ's) run on a CPU-only machine.

    llmcompressor 0.14 pins cached CPU tensors (``IntermediatesCache
    ._pin_intermediate``), which raises "Cannot access accelerator device when none
    is available" without a GPU. Pinning only speeds host-to-GPU copies, so with no
    accelerator it is skipped; with one, nothing is patched.
    """
    if _has_accelerator():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    with patch_attr(IntermediatesCache, "_pin_intermediate", classmethod(_skip_pin)):
        yield


def _skip_pin(cls, intermediate) -> None:
    return None


def tensor_version(tensor: torch.Tensor) -> int:
    """How many in-place changes ``tensor``'s storage has had (``Tensor._version``,
    autograd's own check that a saved tensor is unchanged; no public name). GPTQ's
    and AWQ's weight updates are in place, so a copy of weights keyed on it is
    never stale."""
    return tensor._version
