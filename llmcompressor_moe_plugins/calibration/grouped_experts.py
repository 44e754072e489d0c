"""A block's experts in one grouped GEMM per projection (``F.grouped_mm``) on a
CUDA GPU: in the forwards nobody observes (propagation, search) and in the default's
routing-weighted calibrating forwards of a layer calibrated in one pass.

At real widths a block of 128-384 experts is launch-bound: calling each expert costs
about 16 kernels (a gather, three Linears, the activation, the weighting and an
``index_add_``). At GLM-4.5-Air shapes that is 48 ms of a 2048-token propagating
forward on an H200, of which the matmuls are 2 ms (``benchmarks/RESULTS.md``,
session 10). Here a block costs a dozen kernels, whatever its expert count (plus,
when calibrating, each expert's Hessian sums): the rows gathered once, grouped by
expert; ``gate``/``up`` in one grouped GEMM; the activation; ``down`` in another;
the routing weights; and each token's outputs summed in ascending expert order, the
order of the per-expert ``index_add_``. The only difference from the loop is then
the GEMMs' rounding; each block checks it once, against the loop, before relying on
it.

The grouped GEMM takes each projection's weights stacked ``[experts, out, in]``: a
copy of the layer's experts, built at the block's first such forward and kept while
their weights stay the same tensors, unmodified. One block holds a stack at a time;
another block's calibrating forward drops it, so a stack never shares the device with
another layer's statistics (a layer's own calibration builds it after its statistics
budget is planned). It is built only where it fits :data:`STACK_FRACTION` of what the
device can still allocate (a DeepSeek-V3 layer's 21 GiB does not on an 80 GB GPU);
elsewhere the loop runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import upstream
from ..device_memory import allocatable_bytes
from .batched_experts import GatedMLP
from .tokens import RoutedTokens

__all__ = [
    "AGREEMENT",
    "STACK_FRACTION",
    "ExpertStack",
    "device_runs_grouped_gemms",
    "drop_stack",
    "grouped_forward",
    "held_stack",
    "stack_bytes",
    "stack_for",
    "sum_in_expert_order",
    "supported",
    "weighted_forward",
]

# the statistics budget's share of the free memory (``expert_budget.AUTO_FRACTION``):
# what is left after the stack is what the layer's statistics had, and they are freed
STACK_FRACTION = 0.25


# relative difference from the loop above which the grouped GEMMs are taken to be
# wrong for a block; their rounding differs from the loop's by about 1e-3 in bf16, a
# wrong expert or weight by O(1)
AGREEMENT = 1e-2

stack_builds = 0  # stacks built in this process (benchmarks read it)


def device_runs_grouped_gemms(device: torch.device, dtype: torch.dtype) -> bool:
    """A CUDA GPU with grouped GEMMs (SM 80 and later, torch 2.10's
    ``F.grouped_mm``), in bf16, the kernels' dtype. Elsewhere the loop is as fast
    (a CPU's grouped GEMM is a loop of GEMMs) and bit for bit the block's own."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if not hasattr(F, "grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def supported(mlps: Sequence[GatedMLP], hidden_states: torch.Tensor) -> bool:
    """Whether the grouped path can run these experts here: the device runs grouped
    GEMMs in the input's dtype, and every expert has that dtype, one shape and no
    biases (the kernel adds one bias to every group)."""
    dtype = hidden_states.dtype
    return device_runs_grouped_gemms(hidden_states.device, dtype) and _stackable(
        mlps, dtype
    )


def _stackable(mlps: Sequence[GatedMLP], dtype: torch.dtype) -> bool:
    first = mlps[0]
    shapes = [linear.weight.shape for linear in first.linears]
    return all(
        linear.bias is None
        and linear.weight.dtype == dtype
        and linear.weight.shape == shape
        for mlp in mlps
        for linear, shape in zip(mlp.linears, shapes, strict=True)
    )


def stack_bytes(mlps: Sequence[GatedMLP]) -> int:
    """What stacking these experts' weights costs on the device."""
    return sum(
        linear.weight.numel() * linear.weight.element_size()
        for mlp in mlps
        for linear in mlp.linears
    )


def _weights_key(mlps: Sequence[GatedMLP]) -> tuple:
    # the same tensors (pointer) with no in-place change since (version): an update
    # of any expert (GPTQ, AWQ's scaling, onloading) gives a new key
    return tuple(
        (linear.weight.data_ptr(), upstream.tensor_version(linear.weight))
        for mlp in mlps
        for linear in mlp.linears
    )


@dataclass
class ExpertStack:
    """Every expert's ``gate_proj`` and ``up_proj`` weights stacked as
    [experts, 2 x width, hidden], and ``down_proj``'s as [experts, hidden, width]."""

    owner: int
    key: tuple
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, owner: int, mlps: Sequence[GatedMLP], key: tuple) -> ExpertStack:
        gate = mlps[0].gate_proj.weight
        down = mlps[0].down_proj.weight
        width = gate.shape[0]
        gate_up = gate.new_empty(len(mlps), 2 * width, gate.shape[1])
        downs = down.new_empty(len(mlps), *down.shape)
        for index, mlp in enumerate(mlps):
            gate_up[index, :width].copy_(mlp.gate_proj.weight)
            gate_up[index, width:].copy_(mlp.up_proj.weight)
            downs[index].copy_(mlp.down_proj.weight)
        return cls(owner, key, gate_up, downs)


_held: ExpertStack | None = None


def held_stack() -> ExpertStack | None:
    """The one stack on the device, if any."""
    return _held


def drop_stack(owner: object | None = None, unless_owner: object | None = None):
    """Free the stack: any, only ``owner``'s (its restore), or any but
    ``unless_owner``'s (a calibrating forward of that block)."""
    global _held
    if _held is None or (owner is not None and _held.owner != id(owner)):
        return
    if unless_owner is None or _held.owner != id(unless_owner):
        _held = None


def stack_for(owner: object, mlps: Sequence[GatedMLP]) -> ExpertStack | None:
    """``owner``'s experts stacked: the held stack while their weights are
    unchanged, else a new one (replacing any other block's) where it fits the
    device's memory; None where it does not."""
    global _held, stack_builds
    key = _weights_key(mlps)
    if _held is not None and _held.key == key:  # the same weights, unchanged
        return _held
    drop_stack()
    room = allocatable_bytes(mlps[0].gate_proj.weight.device)
    if room is not None and stack_bytes(mlps) > STACK_FRACTION * room:
        return None
    _held = ExpertStack.build(id(owner), mlps, key)
    stack_builds += 1
    return _held


@torch.no_grad()
def grouped_forward(
    stack: ExpertStack,
    activate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hidden_states: torch.Tensor,
    routed: RoutedTokens,
    top_k: int,
) -> torch.Tensor:
    """The block's combined expert output for ``hidden_states`` [tokens, hidden]:
    what the loop over experts gives, up to the rounding of the GEMMs."""
    width = stack.down.shape[-1]
    rows = hidden_states[routed.tokens]
    ends = _ends(routed.counts, rows)
    gate_up = F.grouped_mm(rows, stack.gate_up.transpose(1, 2), offs=ends)
    intermediate = activate(gate_up[:, :width], gate_up[:, width:])
    output = F.grouped_mm(intermediate, stack.down.transpose(1, 2), offs=ends)
    return _combined(output, hidden_states, routed, top_k)


@torch.no_grad()
def weighted_forward(
    stack: ExpertStack,
    mlps: Sequence[GatedMLP],
    hidden_states: torch.Tensor,
    routed: RoutedTokens,
    extras: Sequence[torch.Tensor | None],
    token_weights: torch.Tensor,
    routed_token_weights: Sequence[torch.Tensor],
    consume: Callable[[GatedMLP, torch.Tensor, torch.Tensor, torch.Tensor], None],
    top_k: int,
) -> torch.Tensor:
    """A routing-weighted calibrating forward: every expert's routed and extra
    tokens (in that order, as the loop hands them) through ``gate``/``up`` in one
    grouped GEMM; each expert's rows, ``down_proj`` inputs and token weights handed
    to ``consume``; the routed rows through ``down`` in another grouped GEMM and
    combined as :func:`grouped_forward` does.

    :param token_weights: [tokens, experts] each token's weight for each expert
    :param routed_token_weights: per expert, ``token_weights`` of its routed tokens
    """
    width = stack.down.shape[-1]
    extra_counts = [0 if t is None else t.numel() for t in extras]
    if any(extra_counts):  # one gather for every expert's extra tokens
        extra_tokens = torch.cat([t for t in extras if t is not None])
        owners = torch.repeat_interleave(
            torch.tensor(extra_counts, device=extra_tokens.device),
            output_size=extra_tokens.numel(),
        )
        extra_weights = token_weights[extra_tokens, owners].split(extra_counts)
    pieces, weights = [], []
    for expert, count in enumerate(extra_counts):
        pieces.append(routed.by_expert[expert])
        weights.append(routed_token_weights[expert])
        if count:
            pieces.append(extras[expert])
            weights.append(extra_weights[expert])
    counts = [r + e for r, e in zip(routed.counts, extra_counts, strict=True)]
    rows = hidden_states[torch.cat(pieces)]
    row_weights = torch.cat(weights)
    gate_up = F.grouped_mm(
        rows, stack.gate_up.transpose(1, 2), offs=_ends(counts, rows)
    )
    intermediate = mlps[0].activate(gate_up[:, :width], gate_up[:, width:])
    start = 0
    for mlp, count in zip(mlps, counts, strict=True):
        if count:
            end = start + count
            consume(
                mlp, rows[start:end], intermediate[start:end], row_weights[start:end]
            )
            start = end
    if any(extra_counts):  # the routed rows' intermediates only
        routed_counts = torch.tensor(routed.counts)
        shift = _starts(torch.tensor(counts)) - _starts(routed_counts)
        positions = torch.arange(routed.tokens.numel())
        positions += shift.repeat_interleave(routed_counts)
        intermediate = intermediate[positions.to(intermediate.device)]
    output = F.grouped_mm(
        intermediate, stack.down.transpose(1, 2), offs=_ends(routed.counts, rows)
    )
    return _combined(output, hidden_states, routed, top_k)


def _starts(counts: torch.Tensor) -> torch.Tensor:
    return counts.cumsum(0) - counts


def _ends(counts: list[int], like: torch.Tensor) -> torch.Tensor:
    """Each group's end row, as the grouped GEMM takes them."""
    ends = torch.tensor(counts).cumsum(0, dtype=torch.int32)
    return ends.to(like.device, non_blocking=True)


def _combined(
    output: torch.Tensor, hidden_states: torch.Tensor, routed: RoutedTokens, top_k: int
) -> torch.Tensor:
    weighted = (output * routed.weights[:, None]).to(hidden_states.dtype)
    return sum_in_expert_order(weighted, routed.tokens, hidden_states.shape[0], top_k)


def sum_in_expert_order(
    rows: torch.Tensor, tokens: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """Each token's ``top_k`` rows summed in the order they come (``rows`` are
    grouped by ascending expert), starting from zero: bit for bit what one
    ``index_add_`` per expert, in expert order, gives.

    :param rows: [tokens x top_k, hidden], row i belonging to token ``tokens[i]``
    """
    by_token = torch.argsort(tokens, stable=True)  # within a token: expert order
    ordered = rows[by_token].view(num_tokens, top_k, rows.shape[-1])
    total = torch.zeros(
        (num_tokens, rows.shape[-1]), dtype=rows.dtype, device=rows.device
    )
    for slot in range(top_k):
        total += ordered[:, slot]
    return total
