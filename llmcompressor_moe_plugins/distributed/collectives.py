"""Collectives on small tensors: counts summed over ranks, and checks that raise
the same error on every rank (never on one only: the others would wait in their
next collective). Every function is a no-op in one process."""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from compressed_tensors.offload.dist_utils import is_distributed

from .launch import DistributedSetupError, world

if TYPE_CHECKING:
    from ..reporting.coverage import CoverageReport

__all__ = [
    "RankFailedError",
    "all_reduce_counts",
    "all_reduce_blocks",
    "all_reduce_coverage",
    "local_share",
    "any_rank",
    "smallest_on_any_rank",
    "failed_ranks",
    "fail_together",
    "check_same_on_all_ranks",
    "require_data_on_every_rank",
    "wait_for_all_ranks",
]


class RankFailedError(RuntimeError):
    """A check failed on another rank; raised here so that no rank waits forever."""

    def __init__(self, what: str, ranks: list[int], message: str | None = None):
        self.ranks = ranks
        super().__init__(
            message
            or f"{what} failed on rank(s) {', '.join(map(str, ranks))}; this rank "
            "stops too (see the failing rank's log for the error)."
        )


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` must be for the default group's backend: CPU for gloo,
    the current accelerator for NCCL/XCCL; a per-device backend string
    (``"cpu:gloo,cuda:nccl"``) keeps a tensor whose device type it serves."""
    backend = str(dist.get_backend()).lower()
    if f"{tensor.device.type}:" in backend:
        return tensor.device
    if backend == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_reduce_counts(
    counts: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Sum (or ``op``) of ``counts`` over all ranks, as a new tensor on ``counts``'
    device and dtype (bool is reduced as int64); single process: ``counts``.
    Works for gloo (CPU) and NCCL (CUDA) whatever device ``counts`` is on."""
    if not is_distributed():
        return counts
    buffer = counts.detach().to(
        device=_comm_device(counts),
        dtype=torch.int64 if counts.dtype == torch.bool else counts.dtype,
        copy=True,
    )
    dist.all_reduce(buffer, op=op)
    return buffer.to(device=counts.device, dtype=counts.dtype)


def all_reduce_blocks(blocks: Sequence[Any]) -> Sequence[Any]:
    """Sum the ``routed`` and ``calibrated`` lists of per-block coverage records
    (``BlockCoverage``) over ranks, in place, in one collective; each record is
    marked ``world_size = N`` and is not summed again. Every rank must pass the
    same blocks with the same expert counts (checked: same error everywhere).

    Call it wherever a decision is taken from counts (the per-layer starved check,
    closing a pass, the RTN fallback), so every rank decides the same."""
    size = world()[1]
    todo = [b for b in blocks if getattr(b, "world_size", 1) != size]
    if size == 1 or not todo:
        return blocks
    layout = "|".join(f"{b.name}:{b.mode}:{len(b.routed)}" for b in todo)
    check_same_on_all_ranks("the MoE blocks whose coverage is summed", layout)
    flat = [c for b in todo for c in (*b.routed, *b.calibrated)]
    summed = all_reduce_counts(torch.tensor(flat, dtype=torch.int64)).tolist()
    offset = 0
    for block in todo:
        n = len(block.routed)
        block.routed = summed[offset : offset + n]
        block.calibrated = summed[offset + n : offset + 2 * n]
        block.world_size = size
        offset += 2 * n
    return blocks


def all_reduce_coverage(report: CoverageReport) -> CoverageReport:
    """``report`` with the counts of every block of every calibration pass summed
    over ranks (in place, one collective; :func:`all_reduce_blocks`). Blocks
    already summed (the modifier sums when it closes a pass) are left alone, so
    a script may call this on ``last_coverage_report()`` either way."""
    passes = getattr(report, "passes", None)
    if passes is None:  # schema 1: one list of blocks
        all_reduce_blocks(report.blocks)
    else:
        all_reduce_blocks([b for calibration in passes for b in calibration.blocks])
    return report


def local_share(total: int) -> int:
    """This rank's share of a global floor, ``ceil(total / world_size)``: if every
    rank reaches it, the global sum reaches ``total`` (per-rank floors such as
    ``min_tokens:K`` top-ups run inside forwards, where a collective cannot go:
    ranks run different numbers of batches)."""
    return math.ceil(total / world()[1])


def failed_ranks(flag: bool) -> list[int]:
    """The ranks on which ``flag`` is true (every rank gets the same list)."""
    rank, size = world()
    if size == 1:
        return [0] if flag else []
    onehot = torch.zeros(size, dtype=torch.int64)
    onehot[rank] = int(bool(flag))
    return torch.nonzero(all_reduce_counts(onehot)).flatten().tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int64)
    return bool(all_reduce_counts(value, op=dist.ReduceOp.MAX).item())


def smallest_on_any_rank(value: int | None) -> int | None:
    """The smallest ``value`` over ranks (None: no limit, larger than any number),
    so that a plan sized from each rank's free memory is the same on every rank."""
    if not is_distributed():
        return value
    unlimited = torch.iinfo(torch.int64).max
    local = torch.tensor([unlimited if value is None else value], dtype=torch.int64)
    smallest = int(all_reduce_counts(local, op=dist.ReduceOp.MIN).item())
    return None if smallest == unlimited else smallest


@contextlib.contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Run a check on every rank; if it raises on any rank, every rank raises:
    the failing rank(s) their own exception, the others :class:`RankFailedError`
    naming them. The body must not itself use collectives (a rank that raised
    halfway would leave the others waiting in them)."""
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # KeyboardInterrupt etc. go straight through
        error = err
    try:
        ranks = failed_ranks(error is not None)
    except Exception:
        if error is not None:  # e.g. a peer died: our own error says more
            raise error from None
        raise
    if error is not None:
        raise error
    if ranks:
        raise RankFailedError(what, ranks)


def check_same_on_all_ranks(what: str, value: str) -> None:
    """Raise on every rank if ``value`` differs between ranks (compared by CRC32)."""
    if not is_distributed():
        return
    digest = zlib.crc32(value.encode())
    both = torch.tensor([digest, -digest], dtype=torch.int64)
    high, neg_low = all_reduce_counts(both, op=dist.ReduceOp.MAX).tolist()
    if high != -neg_low:
        raise RankFailedError(
            what,
            [],
            f"{what} differ between ranks; every rank stops here. The ranks must "
            "load the same model with the same recipe.",
        )


def require_data_on_every_rank(num_local_samples: int) -> int:
    """Total sample count over ranks; raises the same error on every rank if some
    rank has no calibration samples (upstream asserts ``len(dataset) > 0`` on that
    rank alone, llmcompressor/datasets/utils.py:230, and the others would wait)."""
    counts = torch.zeros(world()[1], dtype=torch.int64)
    counts[world()[0]] = num_local_samples
    counts = all_reduce_counts(counts)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        total = int(counts.sum())
        raise DistributedSetupError(
            f"rank(s) {', '.join(map(str, empty))} got no calibration samples "
            f"({total} sample(s) over {len(counts)} ranks). Use at least one "
            "sample per rank (more samples, or fewer processes: torchrun "
            f"--nproc_per_node={max(1, min(total, len(counts)))})."
        )
    return int(counts.sum())


def wait_for_all_ranks() -> None:
    """``dist.barrier()`` when distributed. Needed after each layer's compression
    on CPU: owners write CPU-executed modules' results straight into shared
    memory and upstream skips their broadcast (llmcompressor/utils/dist.py:70,
    ``skip_cpu``), so nothing else stops another rank from propagating through
    a half-written layer (measured: 9% of int4 values differ from a one-process
    run without it, 0.01% with it)."""
    if is_distributed():
        dist.barrier()
