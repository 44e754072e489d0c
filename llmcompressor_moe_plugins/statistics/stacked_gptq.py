"""Quantizing many Linears as one tall matrix against one shared Hessian: one GPTQ
call (and one factorization) per chunk of ``rows_per_call`` rows instead of one per
Linear. ``SharedHessianGPTQModifier`` uses it for the Linears of one input."""

from __future__ import annotations

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import getattr_chain
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, update_batch_qparams
from loguru import logger

from ..upstream import gptq

__all__ = ["row_stackable", "compress_stacked"]

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
    quant_args = getattr_chain(members[0], "quantization_scheme.weights")
    chunks, rows = [[]], 0
    for member in members:
        if chunks[-1] and rows + member.weight.shape[0] > modifier.rows_per_call:
            chunks.append([])
            rows = 0
        chunks[-1].append(member)
        rows += member.weight.shape[0]
    for chunk in chunks:
        qparams = [m.weight_observer.get_qparams() for m in chunk]
        with torch.no_grad(), disable_offloading():
            weights = torch.cat([m.weight for m in chunk]).to(GPTQ_PRECISION)
            scale = torch.cat([q["scale"] for q in qparams])
            zero_point = torch.cat([q["zero_point"] for q in qparams])
            quantized, losses, used_rtn = quantize_weight(
                weights=weights.unsqueeze(0),
                hessians=hessian.clone().unsqueeze(0),
                scale=scale.unsqueeze(0),
                zero_point=zero_point.unsqueeze(0),
                global_scale=None,
                quant_args=quant_args,
                blocksize=modifier.block_size,
                percdamp=modifier.dampening_frac,
            )
            sizes = [m.weight.shape[0] for m in chunk]
            names = [gptq.module_names(modifier)[m] for m in chunk]
            gptq.record_compressed(modifier, names, bool(used_rtn[0].item()))
            update_batch_qparams(
                chunk,
                quantized[0].split(sizes),
                scale.split(sizes),
                zero_point.split(sizes),
                None,
                quant_args,
            )
        logger.debug(  # one per expert chunk per layer: -v only
            f"Quantized {len(chunk)} module(s) against one shared Hessian "
            f"(GPTQ loss {losses[0].item():.4g}): {names[0]} ... {names[-1]}"
        )
