"""What a GPU can still give: the one measure the statistics budget and the expert
stacks are sized from."""

from __future__ import annotations

import torch

__all__ = ["allocatable_bytes"]


def allocatable_bytes(device: torch.device) -> int | None:
    """Free memory plus what PyTorch's caching allocator holds unused on
    ``device``; None (no limit) off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached
