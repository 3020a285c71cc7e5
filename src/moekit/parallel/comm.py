"""Collectives the parallel layer needs, on torch.distributed (gloo on CPU, NCCL on GPU).

all_to_all   rows [sum(in_splits), ...] -> [sum(out_splits), ...] with uneven splits and autograd:
             the backward is the mirror exchange (splits swapped), run by every rank, also one
             that sends or receives no rows (its empty tensors stay on the graph).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def process_group(group: ProcessGroup | object | None) -> ProcessGroup:
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh or None (the default group).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: A DeviceMesh with more than one dimension.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(or run under torchrun) before expert parallelism"
        )
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group must be a 1-D DeviceMesh, got {group.ndim} dimensions")
        return group.get_group()
    return group


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the rows came from where their gradients go back to: the same exchange, reversed
        return exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """`all_to_all` without autograd."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup
) -> Tensor:
    """Send x's row block i (`in_splits[i]` rows) to rank i; receive `out_splits[j]` from rank j.

    Args:
        x: Rows [sum(in_splits), ...], blocks in rank order.
        out_splits: Rows received from each rank of `group`.
        in_splits: Rows sent to each rank of `group`.

    Returns:
        [sum(out_splits), ...], blocks in rank order; differentiable (the backward sends the
        gradients back the way the rows came).
    """
    return _AllToAll.apply(x, out_splits, in_splits, group)
