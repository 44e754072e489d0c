"""Starting data-parallel calibration under ``torchrun``, and the checks that a
launch and its data split give every rank work: bad launches and empty slices fail
on every rank with one message, before anything is loaded."""

from __future__ import annotations

import datetime
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from compressed_tensors.offload.dist_utils import is_distributed

__all__ = [
    "DistributedSetupError",
    "TORCHRUN_VARIABLES",
    "torchrun_environment",
    "init_distributed",
    "maybe_init_distributed",
    "world",
    "rank_partition",
    "rank_slice",
    "from_rank0",
]

# what torchrun exports to each worker (init_dist reads RANK, LOCAL_RANK, WORLD_SIZE;
# the env:// rendezvous needs MASTER_ADDR and MASTER_PORT)
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(RuntimeError):
    """Distributed calibration was asked for but cannot start (bad launch)."""


def torchrun_environment() -> dict[str, str] | None:
    """torchrun's variables if this process was started by it (or an equivalent
    launcher exporting them all), else None."""
    values = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    if any(value is None for value in values.values()):
        return None
    return values  # type: ignore[return-value]


def init_distributed(timeout: datetime.timedelta | None = None) -> tuple[int, int]:
    """Join the process group torchrun prepared; returns ``(rank, world_size)``.

    With an accelerator this is compressed-tensors' ``init_dist()`` (NCCL/XCCL, one
    device per local rank), the call llmcompressor documents. Without one,
    ``init_dist()`` fails (``torch.accelerator.current_accelerator()`` is None on a
    CPU build: compressed_tensors/distributed/utils.py:72), so a gloo group is
    created instead, which is what ``init_dist()`` would pick for a CPU device.

    :param timeout: how long a collective may wait for the other ranks (gloo only;
        default torch's 30 min): tests set it short so that a hang fails fast
    :raises DistributedSetupError: not launched by torchrun, naming what is missing
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    env = torchrun_environment()
    if env is None:
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        raise DistributedSetupError(
            "Distributed calibration needs torchrun's environment, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. "
            "Launch with `torchrun --nproc_per_node=N <script or -m module> ...` "
            "(one process per GPU), or run in one process (without --distributed)."
        )
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed")
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        from compressed_tensors.offload.dist_utils import init_dist

        os.environ.setdefault("TORCHELASTIC_RUN_ID", "llmcompressor-moe")
        init_dist()
    else:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            **kwargs,
        )
        dist.barrier()
    return world()


def maybe_init_distributed(requested: bool) -> tuple[int, int]:
    """For a CLI's ``--distributed``: initialize if requested (error if torchrun's
    environment is missing) or if torchrun started more than one process (a run
    launched with torchrun must not silently calibrate N full copies)."""
    env = torchrun_environment()
    if requested or (env is not None and int(env["WORLD_SIZE"]) > 1):
        return init_distributed()
    return world()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _partition_bounds(num_samples: int, rank: int, size: int) -> range:
    # as upstream's get_rank_partition (datasets/utils.py _get_partition_start_end)
    start = math.floor(num_samples * (rank / size))
    end = math.floor(num_samples * ((rank + 1) / size))
    return range(start, end)


def rank_partition(split: str, num_samples: int) -> str:
    """Upstream's ``get_rank_partition(split, num_samples)`` (``"train[a:b]"``
    for ``load_dataset``), but a split that would leave some rank without samples
    raises the same error on every rank, before anything is loaded:
    ``load_dataset(split="train[0:0]")`` raises on the empty rank alone (datasets:
    'Instruction "train[0:0]" corresponds to no data!') and upstream's sampler
    asserts there (llmcompressor/datasets/utils.py:230), while the others wait.
    Needs no collective: every rank computes every rank's slice."""
    from llmcompressor.datasets.utils import get_rank_partition

    size = world()[1]
    empty = [r for r in range(size) if not _partition_bounds(num_samples, r, size)]
    if empty:
        raise DistributedSetupError(
            f"{num_samples} calibration sample(s) split over {size} ranks leave "
            f"rank(s) {', '.join(map(str, empty))} with none. Use at least one "
            f"sample per rank (num_calibration_samples >= {size}), or fewer "
            f"processes (torchrun --nproc_per_node={max(1, num_samples)})."
        )
    return get_rank_partition(split, num_samples)


def rank_slice(num_samples: int) -> range:
    """This rank's sample indices out of ``num_samples``, as upstream's
    ``get_rank_partition`` splits a dataset; for in-memory datasets:
    ``dataset.select(rank_slice(len(dataset)))``."""
    return _partition_bounds(num_samples, *world())


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank; one process: ``value``. For
    what rank 0 alone creates, e.g. the path of a model it built."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
