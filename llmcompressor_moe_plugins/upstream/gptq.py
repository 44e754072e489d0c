"""GPTQModifier's private state, and the one patch of its ``compress_modules``.

``SharedHessianGPTQModifier`` accumulates Hessians GPTQ would have (shared per
block, routing-weighted per expert) and hands them to GPTQ's own state:
``_hessians``, ``_num_samples`` (per module), ``_module_names`` (model order), and
``_rtn_fallback_module_names`` / ``_num_compressed_modules`` (its end-of-layer
log). Under torchrun GPTQ's Hessian reduction is positional (``compress_modules``
bin-packs ``list(self._hessians)``), so :func:`aligned_compress_modules` makes every
rank hold the same Hessians in the same order first and waits for every rank after
(``distributed.gptq``); it is installed only while a run of ours is active
(``upstream.run``).
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from compressed_tensors.offload.dist_utils import is_distributed

from .. import distributed

__all__ = [
    "statistics",
    "module_names",
    "record_compressed",
    "zero_hessian",
    "add_rows",
    "solve_bytes",
    "batches_within",
    "module_zero_hessian",
    "ensure_same_hessian_order",
    "broadcast_qparams",
    "aligned_compress_modules",
]


def statistics(
    modifier: Any,
) -> tuple[dict[torch.nn.Module, torch.Tensor], dict[torch.nn.Module, torch.Tensor]]:
    """GPTQ's (Hessians, sample counts) by module, the dicts it compresses from."""
    return modifier._hessians, modifier._num_samples


def module_names(modifier: Any) -> dict[torch.nn.Module, str]:
    """GPTQ's targeted modules -> names, in model order (set at initialize)."""
    return modifier._module_names


def record_compressed(modifier: Any, names: list[str], used_rtn: bool) -> None:
    """Count ``names`` as compressed in GPTQ's end-of-layer summary."""
    if used_rtn:
        modifier._rtn_fallback_module_names.extend(names)
    modifier._num_compressed_modules += len(names)


def zero_hessian(width: int, device: torch.device | str) -> torch.Tensor:
    """An empty GPTQ Hessian (``width`` x ``width`` in GPTQ's precision)."""
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

    return torch.zeros((width, width), device=device, dtype=GPTQ_PRECISION)


def add_rows(
    hessian: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None = None
) -> None:
    """``hessian += 2 rows^T diag(weights) rows``: GPTQ's ``2 X^T X`` in its
    precision, weighted per row where ``weights`` are given."""
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

    rows = rows.to(GPTQ_PRECISION)
    left = rows.t()
    if weights is not None:  # scales the columns of rows^T: no broadcast view
        left = left * weights.to(device=rows.device, dtype=GPTQ_PRECISION)
    hessian.addmm_(left, rows, alpha=2.0)


def solve_bytes(rows: int, columns: int, block_size: int) -> int:
    """GPTQ's peak workspace for one ``rows`` x ``columns`` weight: upstream's own
    estimate, which its ``max_batch_size`` computes inline (not exposed), so that
    our budgets count a solve exactly as its ``batched_quantization="auto"`` does."""
    weight, hessian, block = rows * columns, columns * columns, rows * block_size
    quantization_peak = hessian + 3 * weight + 4 * block
    actorder_peak = 3 * hessian + 2 * weight
    return max(quantization_peak, actorder_peak) * 4  # fp32


@contextlib.contextmanager
def batches_within(modifier: Any, limit: int | None) -> Iterator[None]:
    """While GPTQ compresses its pending modules, its automatic batches hold at most
    ``limit`` bytes of solve workspace (at least one module per batch); a number or
    None the user set is kept. ``"auto"`` alone would take 75 % of the free memory,
    the room a budgeted layer's statistics were sized to leave."""
    setting = modifier.batched_quantization
    automatic = limit is not None and setting == "auto"
    batched = _batched_modules(modifier) if automatic else []
    if not batched:
        yield
        return
    from llmcompressor.modifiers.gptq.helpers import max_batch_size

    block_size = modifier.block_size
    largest = max(batched, key=lambda m: solve_bytes(*m.weight.shape, block_size))
    need = solve_bytes(*largest.weight.shape, block_size)
    cap = min(max_batch_size(largest, "auto", block_size), max(1, limit // need))
    modifier.batched_quantization = cap
    try:
        yield
    finally:
        modifier.batched_quantization = setting


def _batched_modules(modifier: Any) -> list[torch.nn.Module]:
    """The pending modules GPTQ may batch: a Linear alone in its shape never is."""
    pending = list(statistics(modifier)[1])
    shapes = Counter(tuple(m.weight.shape) for m in pending)
    return [m for m in pending if shapes[tuple(m.weight.shape)] > 1]


def module_zero_hessian(module: torch.nn.Module) -> torch.Tensor:
    """An empty Hessian for ``module``'s input, on its execution device."""
    from compressed_tensors.utils import get_execution_device

    return zero_hessian(module.weight.shape[1], get_execution_device(module))


def ensure_same_hessian_order(modifier: Any) -> list[torch.nn.Module]:
    """``distributed.align_statistics`` for a ``GPTQModifier``'s statistics, in
    model order. Call before its ``compress_modules`` runs the distributed
    branch; idempotent."""
    hessians, num_samples = statistics(modifier)
    return distributed.align_statistics(
        hessians, num_samples, module_names(modifier), module_zero_hessian
    )


def broadcast_qparams(
    members: list[torch.nn.Module], owner_of: dict[torch.nn.Module, int]
) -> None:
    """Broadcast each member's GPTQ results from its owning rank, as GPTQ does."""
    from llmcompressor.modifiers.gptq.base import _GPTQ_Q_PARAMS
    from llmcompressor.utils.dist import broadcast_qparams_and_cleanup

    broadcast_qparams_and_cleanup(members, owner_of, _GPTQ_Q_PARAMS)


def aligned_compress_modules(original: Callable) -> Callable:
    """``GPTQModifier.compress_modules`` that, when distributed, first aligns the
    Hessians and afterwards waits for every rank (on CPU upstream skips the
    broadcast of CPU-executed results: ``distributed.wait_for_all_ranks``).
    Single process: the original.

    Wrapping ``compress_modules`` rather than listening to the layer's
    ``sequential_epoch_end``: ``SharedHessianGPTQModifier`` adds statistics inside
    its ``compress_modules`` (batched ``down_proj`` inputs), after any event, and
    the barrier must follow the compression."""

    @functools.wraps(original)
    def compress_modules(self):
        if not is_distributed():
            return original(self)
        ensure_same_hessian_order(self)
        result = original(self)
        distributed.wait_for_all_ranks()
        return result

    return compress_modules
