"""Data-parallel calibration under ``torchrun``: the collectives this plugin adds to
llmcompressor's own distributed oneshot (it is the engine; this is no second one).

llmcompressor >= 0.10 runs ``oneshot`` data-parallel when ``torch.distributed`` is
initialized: every rank holds the whole (offloaded, shared-memory) model and calibrates
on its own slice of the data; GPTQ reduces each module's Hessian onto one owning rank,
which quantizes it and broadcasts the result. Three things in this plugin are per rank
and need the helpers here:

* **Decisions from coverage counts** (report, starved-expert check, RTN fallback)
  and one-time per-block decisions (``calibration/decisions.py``): all-reduce first
  (:func:`all_reduce_counts`, :func:`all_reduce_coverage`) so that every rank
  decides the same; raise the same error on every rank (:func:`fail_together`,
  :func:`any_rank`), never on one only: the others would wait in their next
  collective (``collectives.py``).
* **GPTQ's Hessian reduction is positional** (``gptq_reduction.py``). Upstream's
  distributed branch (``GPTQModifier.compress_modules``) bin-packs its Hessians in
  the order of first calls, and our calibration modules never call an expert with
  zero tokens, so in routed / sampled modes ranks hold different experts in
  different orders: ranks then disagree about owners (deadlock) or sum two different
  experts' Hessians of the same shape (silently wrong weights).
  :func:`align_statistics` makes every rank hold the same modules in model order
  first, adding zero Hessians with zero samples where a rank saw none (a zero-sample
  rank adds nothing to the sum and the owner divides by the global count);
  ``upstream.gptq`` applies it to every ``GPTQModifier`` while a run of ours is
  active.
* **Seeded sampling and floors**: each block's generator is seeded with the rank
  (``calibration.dispatch.block_seed``: ``rank * BLOCK_SEED_RANK_STRIDE`` added), so
  ranks do not draw the same numbers for different tokens (a run is reproducible for
  a given world size); :func:`local_share` splits a per-run floor between ranks.
* **Bad launches and data** (``launch.py``): :func:`init_distributed` (clear error
  outside torchrun; gloo where ``init_dist`` cannot run, i.e. without an
  accelerator), :func:`rank_partition` (an empty slice fails on every rank, before
  loading).

Everything here is a no-op in a single process, so callers need no ``if``.
"""

from .collectives import (
    RankFailedError,
    all_reduce_blocks,
    all_reduce_counts,
    all_reduce_coverage,
    any_rank,
    check_same_on_all_ranks,
    fail_together,
    failed_ranks,
    local_share,
    require_data_on_every_rank,
    smallest_on_any_rank,
    wait_for_all_ranks,
)
from .gptq_reduction import align_statistics, reduce_to_owners
from .launch import (
    TORCHRUN_VARIABLES,
    DistributedSetupError,
    from_rank0,
    init_distributed,
    maybe_init_distributed,
    rank_partition,
    rank_slice,
    torchrun_environment,
    world,
)

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
    "local_share",
    "any_rank",
    "smallest_on_any_rank",
    "failed_ranks",
    "fail_together",
    "check_same_on_all_ranks",
    "require_data_on_every_rank",
    "rank_partition",
    "rank_slice",
    "align_statistics",
    "reduce_to_owners",
    "wait_for_all_ranks",
    "from_rank0",
]
