"""Quantizing many Linears as one tall matrix against one shared Hessian: one GPTQ
call (and one factorization) per chunk of ``rows_per_call`` rows instead of one per
Linear. ``SharedHessianGPTQModifier`` uses it for the Linears of one input.

Groups of the same shapes and scheme (every expert's ``gate_proj`` + ``up_proj``
against its own Hessian, in a weighted mode) are solved together, batched, as
upstream GPTQ batches same-shape modules (``batched_quantization``): one call for
many experts instead of one GPTQ column loop each."""

from __future__ import annotations

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import get_execution_device, getattr_chain
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, update_batch_qparams
from loguru import logger

from ..upstream import gptq

__all__ = [
    "row_stackable",
    "compress_stacked",
    "compress_stacked_groups",
    "batch_cap",
    "solve_batch_cap",
]

# Per-row scales let many Linears be quantized as one tall matrix against one
# Hessian; per-tensor scales (TENSOR, TENSOR_GROUP e.g. NVFP4) cannot be stacked so.
_ROW_STACKABLE = (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)


def row_stackable(members: list[torch.nn.Module]) -> bool:
    """Whether these Linears can be quantized as one matrix: per-row scales, one
    scheme and one input width."""
    first = getattr_chain(members[0], "quantization_scheme.weights")
    return first.strategy in _ROW_STACKABLE and all(
        getattr_chain(m, "quantization_scheme.weights") == first
        and m.weight.shape[1] == members[0].weight.shape[1]
        for m in members
    )


def compress_stacked(
    modifier, members: list[torch.nn.Module], hessian: torch.Tensor
) -> None:
    """GPTQ on ``members`` stacked by rows against ``hessian`` (already divided by
    its sample count), with the modifier's block size and dampening."""
    chunks, rows = [[]], 0
    for member in members:
        if chunks[-1] and rows + member.weight.shape[0] > modifier.rows_per_call:
            chunks.append([])
            rows = 0
        chunks[-1].append(member)
        rows += member.weight.shape[0]
    for chunk in chunks:
        _solve_batch(modifier, [(chunk, hessian)])


def compress_stacked_groups(
    modifier,
    groups: list[tuple[list[torch.nn.Module], torch.Tensor]],
    limit: int | None = None,
) -> None:
    """Each ``(members, hessian)`` quantized as one stacked matrix, like
    :func:`compress_stacked`; groups that fit one call and match in shapes,
    scheme and device go to GPTQ together, as many at a time as
    :func:`batch_cap` allows (within ``limit`` bytes of workspace, where set)."""
    batches: dict[tuple, list] = {}
    for members, hessian in groups:
        rows = sum(m.weight.shape[0] for m in members)
        if rows > modifier.rows_per_call:
            compress_stacked(modifier, members, hessian)
            continue
        quant_args = getattr_chain(members[0], "quantization_scheme.weights")
        key = (
            tuple(tuple(m.weight.shape) for m in members),
            str(members[0].weight.dtype),
            str(get_execution_device(members[0])),
            quant_args.model_dump_json(),
        )
        batches.setdefault(key, []).append((members, hessian))
    for items in batches.values():
        cap = batch_cap(modifier, items[0][0], limit)
        for start in range(0, len(items), cap):
            _solve_batch(modifier, items[start : start + cap])


def batch_cap(
    modifier, members: list[torch.nn.Module], limit: int | None = None
) -> int:
    """Groups per GPTQ call: ``batched_quantization`` where it is a number, one
    where it is None or off CUDA, else what 75 % of the free memory holds at
    GPTQ's peak per group (upstream's estimate for a module of the stack's
    shape), and no more than ``limit`` bytes hold."""
    setting = modifier.batched_quantization
    if setting is None:
        return 1
    if isinstance(setting, int):
        return setting
    device = get_execution_device(members[0])
    if torch.device(device).type != "cuda":
        return 1
    rows = sum(m.weight.shape[0] for m in members)
    need = gptq.solve_bytes(rows, members[0].weight.shape[1], modifier.block_size)
    free, _ = torch.cuda.mem_get_info(device)
    return solve_batch_cap(need, int(free * 0.75), limit)


def solve_batch_cap(need: int, room: int, limit: int | None) -> int:
    """How many solves of ``need`` bytes fit ``room`` and ``limit``: at least one."""
    if limit is not None:
        room = min(room, limit)
    return max(1, room // need)


def _solve_batch(modifier, items: list[tuple[list, torch.Tensor]]) -> None:
    quant_args = getattr_chain(items[0][0][0], "quantization_scheme.weights")
    sizes = [m.weight.shape[0] for m in items[0][0]]
    with torch.no_grad(), disable_offloading():
        qparams = [[m.weight_observer.get_qparams() for m in ms] for ms, _ in items]
        weights = torch.stack(
            [torch.cat([m.weight for m in ms]) for ms, _ in items]
        ).to(GPTQ_PRECISION)
        scale = torch.stack([torch.cat([q["scale"] for q in qs]) for qs in qparams])
        zero_point = torch.stack(
            [torch.cat([q["zero_point"] for q in qs]) for qs in qparams]
        )
        quantized, losses, used_rtn = quantize_weight(
            weights=weights,
            hessians=torch.stack([hessian for _, hessian in items]),
            scale=scale,
            zero_point=zero_point,
            global_scale=None,
            quant_args=quant_args,
            blocksize=modifier.block_size,
            percdamp=modifier.dampening_frac,
        )
        for index, (members, _) in enumerate(items):
            names = [gptq.module_names(modifier)[m] for m in members]
            gptq.record_compressed(modifier, names, bool(used_rtn[index].item()))
            update_batch_qparams(
                members,
                quantized[index].split(sizes),
                scale[index].split(sizes),
                zero_point[index].split(sizes),
                None,
                quant_args,
            )
    logger.debug(  # one per batch per layer: -v only
        f"Quantized {len(items)} stacked group(s) in one GPTQ call "
        f"(mean loss {losses.mean().item():.4g})"
    )
