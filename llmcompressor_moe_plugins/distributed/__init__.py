"""Data-parallel calibration under ``torchrun``: the collectives this plugin adds to
llmcompressor's own distributed oneshot (it is the engine; this is no second one).

llmcompressor >= 0.10 runs ``oneshot`` data-parallel when ``torch.distributed`` is
initialized: every rank holds the whole (offloaded, shared-memory) model and calibrates
on its own slice of the data; GPTQ reduces each module's Hessian onto one owning rank,
which quantizes it and broadcasts the result. Three things in this plugin are per rank
and need the helpers here:

* **Decisions from coverage counts** (report, starved-expert check, RTN fallback):
  all-reduce the counts first (:func:`all_reduce_counts`, :func:`all_reduce_coverage`)
  so that every rank decides the same; raise the same error on every rank
  (:func:`fail_together`, :func:`any_rank`), never on one only: the others would wait
  in their next collective.
* **GPTQ's Hessian reduction is positional.** Upstream's distributed branch
  (``GPTQModifier.compress_modules``) bin-packs ``list(self._hessians)`` and issues one
  ``dist.reduce`` per entry in that order, on every rank. The order is the order of
  first calls, and our calibration modules never call an expert with zero tokens, so in
  routed / sampled modes ranks hold different experts in different orders: ranks then
  disagree about owners (deadlock) or sum two different experts' Hessians of the same
  shape (silently wrong weights). :func:`ensure_same_hessian_order` makes every rank
  hold the same modules in model order first, adding zero Hessians with zero samples
  where a rank saw none (a zero-sample rank adds nothing to the sum and the owner
  divides by the global count); :func:`install_aligned_gptq` applies it to every
  ``GPTQModifier`` without editing upstream, and waits for all ranks after each
  layer's compression (on CPU upstream does not: :func:`wait_for_all_ranks`).
* **Seeded sampling and floors**: :func:`rank_seed` offsets a seed by rank, so ranks
  do not draw the same numbers for different tokens (a run is reproducible for a
  given world size); :func:`local_share` splits a per-run floor between ranks.
* **Bad launches and data**: :func:`init_distributed` (clear error outside torchrun;
  gloo where ``init_dist`` cannot run, i.e. without an accelerator),
  :func:`rank_partition` (an empty slice fails on every rank, before loading).

Everything here is a no-op in a single process, so callers need no ``if``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import zlib
from collections.abc import (
    Callable,
    Hashable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from compressed_tensors.offload.dist_utils import is_distributed

if TYPE_CHECKING:
    from ..reporting.coverage import CoverageReport

__all__ = [
    "DistributedSetupError",
    "RankFailedError",
    "TORCHRUN_VARIABLES",
    "torchrun_environment",
    "init_distributed",
    "maybe_init_distributed",
    "world",
    "all_reduce_counts",
    "all_reduce_blocks",
    "all_reduce_coverage",
    "rank_seed",
    "RANK_SEED_STRIDE",
    "local_share",
    "any_rank",
    "failed_ranks",
    "fail_together",
    "check_same_on_all_ranks",
    "require_data_on_every_rank",
    "rank_partition",
    "rank_slice",
    "align_statistics",
    "ensure_same_hessian_order",
    "reduce_to_owners",
    "wait_for_all_ranks",
    "from_rank0",
    "install_aligned_gptq",
    "aligned_gptq",
    "compress_shared_hessians",
]

K = TypeVar("K", bound=Hashable)

# what torchrun exports to each worker (init_dist reads RANK, LOCAL_RANK, WORLD_SIZE;
# the env:// rendezvous needs MASTER_ADDR and MASTER_PORT)
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# rank r samples with seed + r * RANK_SEED_STRIDE: a prime far above any seed a user
# types, so rank streams never coincide with another run's rank-0 stream
RANK_SEED_STRIDE = 1_000_003


class DistributedSetupError(RuntimeError):
    """Distributed calibration was asked for but cannot start (bad launch)."""


class RankFailedError(RuntimeError):
    """A check failed on another rank; raised here so that no rank waits forever."""

    def __init__(self, what: str, ranks: list[int], message: str | None = None):
        self.ranks = ranks
        super().__init__(
            message
            or f"{what} failed on rank(s) {', '.join(map(str, ranks))}; this rank "
            "stops too (see the failing rank's log for the error)."
        )


# -- launch -----------------------------------------------------------------------


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


# -- collectives on small tensors --------------------------------------------------


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


def rank_seed(seed: int) -> int:
    """``seed`` for this rank: ``seed + rank * RANK_SEED_STRIDE``.

    Every rank calibrates on different tokens, so its sampling draws must differ
    too (with the same seed, rank r's i-th draw equals rank 0's i-th draw: the
    samples are correlated across ranks). Rank 0, and a single process, keep
    ``seed``. A run is reproducible for a given world size (ranks get the same data
    partition and the same seed each time); a run on another world size samples
    differently, as it calibrates on differently split data anyway.
    """
    return seed + world()[0] * RANK_SEED_STRIDE


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


# -- GPTQ statistics ---------------------------------------------------------------


def align_statistics(
    hessians: MutableMapping[K, torch.Tensor],
    num_samples: MutableMapping[K, torch.Tensor],
    order: Mapping[K, str],
    make_empty: Callable[[K], torch.Tensor],
) -> list[K]:
    """Make every rank's ``hessians``/``num_samples`` hold the same keys in the same
    order, in place; returns those keys.

    A key is kept if any rank holds it; where a rank does not, it gets
    ``make_empty(key)`` (zeros, the width its Hessian would have) and a sample count
    of 0, so it adds nothing to the reduced sum and the owning rank divides by the
    global count. Keys no rank holds stay absent everywhere, exactly as in a single
    process (GPTQ never compresses them; the coverage check reports them). Keys come
    in the order of ``order`` (model order: ``GPTQModifier._module_names``), whose
    names must be the same on every rank (checked).

    Four small collectives (one of ``len(order)`` integers); single process:
    nothing at all.
    """
    if not is_distributed():
        return list(hessians)
    index = {key: i for i, key in enumerate(order)}
    with fail_together("aligning GPTQ statistics across ranks"):
        unknown = [key for key in hessians if key not in index]
        if unknown or set(hessians) != set(num_samples):
            raise ValueError(
                f"{len(unknown)} Hessian(s) belong to no targeted module, or "
                "Hessians and sample counts hold different modules"
            )
    check_same_on_all_ranks("the modules GPTQ targets", "\n".join(order.values()))
    held = torch.zeros(len(index), dtype=torch.int64)
    for key in hessians:
        held[index[key]] = 1
    held = all_reduce_counts(held).tolist()
    keys = [key for key, count in zip(order, held, strict=True) if count]
    for key in keys:
        if key not in hessians:
            hessian = make_empty(key)
            hessians[key] = hessian
            num_samples[key] = torch.zeros((), device=hessian.device)
    # reinsert in model order (in place: callers may hold the dicts)
    entries = [(key, hessians.pop(key), num_samples.pop(key)) for key in keys]
    for key, hessian, count in entries:
        hessians[key] = hessian
        num_samples[key] = count
    check_same_on_all_ranks(
        "the Hessian shapes",
        "\n".join(f"{order[k]}:{tuple(hessians[k].shape)}" for k in keys),
    )
    return keys


def ensure_same_hessian_order(modifier: Any) -> list[torch.nn.Module]:
    """:func:`align_statistics` for a ``GPTQModifier``'s ``_hessians`` and
    ``_num_samples``, in the order of its ``_module_names`` (model order, fixed
    at initialize). Call before its ``compress_modules`` runs the distributed
    branch; idempotent."""
    from compressed_tensors.utils import get_execution_device
    from llmcompressor.modifiers.gptq.helpers import make_empty_hessian

    return align_statistics(
        modifier._hessians,
        modifier._num_samples,
        modifier._module_names,
        lambda module: make_empty_hessian(module, get_execution_device(module)),
    )


def reduce_to_owners(
    keys: list[K],
    hessians: MutableMapping[K, torch.Tensor],
    num_samples: MutableMapping[K, torch.Tensor],
) -> dict[K, int]:
    """Sum each key's Hessian and sample count onto one owning rank, as upstream's
    ``GPTQModifier._reduce_hessian_to_target_rank`` does (greedy bin packing by
    width, one ``dist.reduce`` each); other ranks drop the key. ``keys`` must be
    the same list on every rank (:func:`align_statistics`). Returns key -> owner."""
    if not is_distributed():
        return {key: 0 for key in keys}
    from compressed_tensors.distributed import greedy_bin_packing, wait_for_comms

    rank, size = world()
    ordered, _, owner = greedy_bin_packing(
        list(keys), size, item_weight_fn=lambda key: hessians[key].shape[0]
    )
    pending = []
    for key in ordered:
        for tensor in (hessians[key], num_samples[key]):
            pending.append(
                dist.reduce(tensor, dst=owner[key], op=dist.ReduceOp.SUM, async_op=True)
            )
    wait_for_comms(pending)
    for key in ordered:
        if owner[key] != rank:
            hessians.pop(key)
            num_samples.pop(key)
    return owner


def wait_for_all_ranks() -> None:
    """``dist.barrier()`` when distributed. Needed after each layer's compression
    on CPU: owners write CPU-executed modules' results straight into shared
    memory and upstream skips their broadcast (llmcompressor/utils/dist.py:70,
    ``skip_cpu``), so nothing else stops another rank from propagating through
    a half-written layer (measured: 9% of int4 values differ from a one-process
    run without it, 0.01% with it)."""
    if is_distributed():
        dist.barrier()


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank; one process: ``value``. For
    what rank 0 alone creates, e.g. the path of a model it built."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _aligned_compress_modules(original: Callable) -> Callable:
    @functools.wraps(original)
    def compress_modules(self):
        if not is_distributed():
            return original(self)
        ensure_same_hessian_order(self)
        result = original(self)
        wait_for_all_ranks()
        return result

    compress_modules.__moe_plugins_aligned__ = True  # type: ignore[attr-defined]
    return compress_modules


def install_aligned_gptq() -> bool:
    """Make ``GPTQModifier.compress_modules`` (subclasses' ``super()`` calls
    included), when distributed, first align the Hessians
    (:func:`ensure_same_hessian_order`) and afterwards wait for every rank
    (:func:`wait_for_all_ranks`). Single process: unchanged behaviour.
    Idempotent; returns whether this call installed it.

    Wrapping ``compress_modules`` itself rather than listening to the layer's
    ``sequential_epoch_end``: ``SharedHessianGPTQModifier`` adds statistics inside
    its ``compress_modules`` (batched ``down_proj`` inputs), after any event, and
    the barrier must follow the compression."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    current = GPTQModifier.compress_modules
    if getattr(current, "__moe_plugins_aligned__", False):
        return False
    GPTQModifier.compress_modules = _aligned_compress_modules(current)
    return True


@contextlib.contextmanager
def aligned_gptq() -> Iterator[None]:
    """:func:`install_aligned_gptq` for the body only (re-entrant; a permanent
    install made elsewhere is left in place)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    original = GPTQModifier.compress_modules
    installed = install_aligned_gptq()
    try:
        yield
    finally:
        if installed:
            GPTQModifier.compress_modules = original


def compress_shared_hessians(modifier: Any) -> None:
    """Distributed path of ``SharedHessianGPTQModifier.compress_modules``: reduce
    each MoE block's shared input Hessian once (not once per expert Linear), onto
    one owning rank, which quantizes all of the block's stackable members against
    it; the owners' results are then broadcast as upstream GPTQ broadcasts its own.

    Consumes ``modifier._shared_hessians``/``_shared_num_samples``. Members of
    blocks whose schemes cannot be stacked go to ``modifier._hessians`` (one clone
    each, as before) for GPTQ's normal distributed path.
    """
    from compressed_tensors.utils import get_execution_device
    from llmcompressor.modifiers.gptq.base import _GPTQ_Q_PARAMS
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION
    from llmcompressor.utils.dist import broadcast_qparams_and_cleanup

    members_of = modifier._shared_members

    def empty(block: torch.nn.Module) -> torch.Tensor:
        representative = members_of[block][0]
        width = representative.weight.shape[1]
        device = get_execution_device(representative)
        return torch.zeros((width, width), device=device, dtype=GPTQ_PRECISION)

    names = {
        block: f"{modifier._module_names[members[0]]} (shared Hessian)"
        for block, members in members_of.items()
    }
    blocks = align_statistics(
        modifier._shared_hessians, modifier._shared_num_samples, names, empty
    )
    stacked = [b for b in blocks if modifier._row_stackable(members_of[b])]
    for block in blocks:
        if block in stacked:
            continue
        hessian = modifier._shared_hessians.pop(block)
        count = modifier._shared_num_samples.pop(block)
        for member in members_of[block]:
            modifier._hessians[member] = hessian.clone()
            modifier._num_samples[member] = count.clone()

    owners = reduce_to_owners(
        stacked, modifier._shared_hessians, modifier._shared_num_samples
    )
    for block in list(modifier._shared_hessians):  # the blocks this rank owns
        hessian = modifier._shared_hessians.pop(block)
        count = modifier._shared_num_samples.pop(block)
        modifier._compress_shared(members_of[block], hessian / count)
    if is_distributed():
        members = [m for block in stacked for m in members_of[block]]
        owner_of = {m: owners[block] for block in stacked for m in members_of[block]}
        broadcast_qparams_and_cleanup(members, owner_of, _GPTQ_Q_PARAMS)
        wait_for_all_ranks()  # CPU-executed members are not broadcast
