"""Accelerator memory housekeeping (``--accelerator_cache_clear_interval``).

PyTorch's caching allocators keep freed blocks for reuse; with changing shapes (aspect buckets of
different sizes) the cache can fragment and grow until an allocation fails. Emptying it every N
steps returns those blocks, at the cost of re-allocating them.
"""

from __future__ import annotations

import gc

import torch


def clear_accelerator_cache(device: torch.device | str) -> None:
    """Run the garbage collector and empty the allocator cache of ``device``'s backend."""
    gc.collect()
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
    elif kind == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()
