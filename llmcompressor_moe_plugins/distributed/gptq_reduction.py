"""GPTQ statistics under torchrun: the same Hessians in the same order on every
rank (upstream's reduction is positional), reduced onto owning ranks. Plain dicts
in, plain dicts out: GPTQModifier's own state is reached in ``upstream.gptq``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, MutableMapping
from typing import TypeVar

import torch
import torch.distributed as dist
from compressed_tensors.offload.dist_utils import is_distributed

from .collectives import (
    all_reduce_counts,
    check_same_on_all_ranks,
    fail_together,
)
from .launch import world

__all__ = ["align_statistics", "reduce_to_owners"]

K = TypeVar("K", bound=Hashable)


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
