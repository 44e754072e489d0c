"""The distributed half of ``SharedHessianGPTQModifier.compress_modules``: one
reduction per shared Hessian (not one per member Linear), onto an owning rank."""

from __future__ import annotations

from typing import Any

from compressed_tensors.offload.dist_utils import is_distributed

from .. import distributed
from ..upstream import gptq
from .stacked_gptq import compress_stacked_groups, row_stackable

__all__ = ["compress_shared_hessians"]


def compress_shared_hessians(modifier: Any, solve_room: int | None = None) -> None:
    """Distributed path of ``SharedHessianGPTQModifier.compress_modules``: reduce
    each MoE block's shared input Hessian once (not once per expert Linear), onto
    one owning rank, which quantizes all of the block's stackable members against
    it; the owners' results are then broadcast as upstream GPTQ broadcasts its own.

    Consumes ``modifier._shared_hessians``/``_shared_num_samples``. Members of
    blocks whose schemes cannot be stacked go to GPTQ's own Hessians (one clone
    each, as before) for GPTQ's normal distributed path. ``solve_room``: the bytes
    of GPTQ workspace a budgeted group leaves (None: GPTQ's own batches).
    """
    members_of = modifier._shared_members
    gptq_hessians, gptq_num_samples = gptq.statistics(modifier)
    module_names = gptq.module_names(modifier)
    names = {
        block: f"{module_names[members[0]]} (shared Hessian)"
        for block, members in members_of.items()
    }
    blocks = distributed.align_statistics(
        modifier._shared_hessians,
        modifier._shared_num_samples,
        names,
        lambda block: gptq.module_zero_hessian(members_of[block][0]),
    )
    stacked = [b for b in blocks if row_stackable(members_of[b])]
    for block in blocks:
        if block in stacked:
            continue
        hessian = modifier._shared_hessians.pop(block)
        count = modifier._shared_num_samples.pop(block)
        for member in members_of[block]:
            gptq_hessians[member] = hessian.clone()
            gptq_num_samples[member] = count.clone()

    owners = distributed.reduce_to_owners(
        stacked, modifier._shared_hessians, modifier._shared_num_samples
    )
    owned = []
    for block in list(modifier._shared_hessians):  # the blocks this rank owns
        hessian = modifier._shared_hessians.pop(block)
        count = modifier._shared_num_samples.pop(block)
        owned.append((members_of[block], hessian / count))
    compress_stacked_groups(modifier, owned, solve_room)
    if is_distributed():
        members = [m for block in stacked for m in members_of[block]]
        owner_of = {m: owners[block] for block in stacked for m in members_of[block]}
        gptq.broadcast_qparams(members, owner_of)
        distributed.wait_for_all_ranks()  # CPU-executed members are not broadcast
