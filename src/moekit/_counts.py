"""Counting ids without a host sync."""

from __future__ import annotations

import torch
from torch import Tensor


def count_ids(ids: Tensor, size: int) -> Tensor:
    """[size] int64: how often each id in 0..size-1 occurs in `ids` (any shape).

    `torch.bincount` reads the largest id back to the host on CUDA (a sync, which also breaks
    CUDA-graph capture); a scatter-add into `size` counters does not.
    """
    flat = ids.reshape(-1).long()
    counts = torch.zeros(size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))
