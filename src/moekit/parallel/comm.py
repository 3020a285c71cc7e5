"""Collectives the parallel layer needs, on torch.distributed (gloo on CPU, NCCL on GPU).

all_to_all   rows [sum(in_splits), ...] -> [sum(out_splits), ...] with uneven splits and autograd:
             the backward is the mirror exchange (splits swapped), run by every rank, also one
             that sends or receives no rows (its empty tensors stay on the graph).
all_to_all_start / all_to_all_wait
             the same exchange in two halves, for overlap: start it, run other work (the shared
             experts), wait for it; the backward overlaps the same way (the gradients'
             exchange starts in `wait`'s backward and is waited for in `start`'s, and autograd
             runs the work recorded in between, the other work's backward, meanwhile).
init_process_group
             torch's, with the default group left free for destroy_process_group to end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def init_process_group(backend: str, **kwargs) -> None:
    """`torch.distributed.init_process_group(backend, **kwargs)`, torch.distributed.nn.functional
    imported first.

    Imported after (transformers imports it through torch._dynamo), that module's functions
    take the default group as their default argument (`group=group.WORLD`, evaluated then) and
    hold it for good: `destroy_process_group` cannot free it, its gloo threads outlive it, and
    one still releasing a finished collective's tensors when Python shuts down aborts the
    process ("terminate called without an active exception") after a run that succeeded.
    """
    import torch.distributed.nn.functional  # noqa: F401 - its defaults bound while None

    dist.init_process_group(backend, **kwargs)


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
    out, work = _start(x, out_splits, in_splits, group)
    work.wait()
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


class Pending:
    """An exchange in flight: what `all_to_all_start` returns, `all_to_all_wait` takes."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group) -> None:
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = None  # the forward's exchange, then the backward's
        self.grad: Tensor | None = None  # the backward's receive buffer


def _start(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple[Tensor, object]:
    """The exchange begun: (its output buffer, the work to wait for before reading it)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(
        out, x.contiguous(), out_splits, in_splits, group=group, async_op=True
    )
    return out, work


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pending: Pending) -> Tensor:
        ctx.pending = pending
        out, pending.work = _start(x, pending.out_splits, pending.in_splits, pending.group)
        return out  # filled once the exchange completes: read it through _Wait only

    @staticmethod
    def backward(ctx, _unused: Tensor):
        pending = ctx.pending
        pending.work.wait()  # the gradients' exchange `_Wait.backward` started
        return pending.grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, pending: Pending) -> Tensor:
        ctx.pending = pending
        pending.work.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pending = ctx.pending
        # the rows came from where their gradients go back to: start the reverse exchange
        pending.grad, pending.work = _start(
            grad, pending.in_splits, pending.out_splits, pending.group
        )
        return grad.new_zeros(()).expand(grad.shape), None  # unused by _Start.backward


def all_to_all_start(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup
) -> tuple[Tensor, Pending]:
    """Start `all_to_all(x, out_splits, in_splits, group)`; returns (its output, not yet
    valid, and the exchange in flight) for `all_to_all_wait`."""
    pending = Pending(out_splits, in_splits, group)
    return _Start.apply(x, pending), pending


def all_to_all_wait(out: Tensor, pending: Pending) -> Tensor:
    """The started exchange's output, once it has arrived (differentiable)."""
    return _Wait.apply(out, pending)
