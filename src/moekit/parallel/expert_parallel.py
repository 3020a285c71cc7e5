"""Expert parallelism: each of R ranks holds E/R experts; tokens travel to them and back.

On every rank, for tokens x [N, d] (its own slice of the global batch):
  1. route and plan locally with global expert ids: rows sorted by expert are already sorted by
     owner rank (rank r owns experts r*e .. (r+1)*e - 1, e = E/R)
  2. exchange the per-expert counts (one all-to-all of [E] ints), one host read of the splits
  3. all-to-all the rows [M, d] -> received [M_recv, d], blocks by source rank
  4. the local ExpertBank on the received rows, read expert-major (contiguous segments) and
     written back rank-major: `ExpertBank.dispatch` with the regrouping as its plan
  5. the reverse all-to-all [M_recv, d] -> [M, d], then the weighted combine on this rank
     (routing weights never travel)
The backward runs the mirror exchanges. Capacity is counted per sending rank: rank r keeps at
most ceil(capacity_factor * N_r * k / E) of its pairs per expert, so an expert receives at most
R times that; the layer under EP equals the full layer applied to each rank's slice.
A layer with shared experts computes them while its rows travel to their experts in step 3
(and their backward while the rows' gradients travel back): `overlap` (on by default on NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..dispatch import DispatchPlan, permute, unpermute
from ..experts import ExpertBank, compute_dtype
from ..layers import MoE
from ..routing import ExpertChoiceRouter
from ..soft import SoftMoE
from .comm import all_to_all, all_to_all_start, all_to_all_wait, process_group


def _transpose_blocks(sizes: Tensor, total: int) -> Tensor:
    """Index [total] reading blocks laid out row-major by `sizes` [a, b] in column-major order.

    Block (i, j) holds sizes[i, j] rows; out[p] is the row at position p of the (j, i) order.
    """
    flat = sizes.reshape(-1)  # [a*b]
    starts = torch.cumsum(flat, 0) - flat  # [a*b] where block (i, j) starts, row-major
    sizes_t = sizes.t().reshape(-1)  # [b*a] in the new order
    starts_t = starts.view_as(sizes).t().reshape(-1)
    new_starts = torch.cumsum(sizes_t, 0) - sizes_t  # where each block starts in the new order
    shift = torch.repeat_interleave(starts_t - new_starts, sizes_t, output_size=total)
    return shift + torch.arange(total, device=sizes.device)  # [total]


class ExpertParallel:
    """How one MoE layer runs across the ranks of an expert-parallel group.

    Args:
        group: The expert-parallel group (R ranks; this rank owns experts
            rank*E/R .. (rank+1)*E/R - 1).
        data_group: The ranks whose counts make the layer's statistics and balancing loss
            (all ranks that see distinct tokens); None: the default group.
        num_experts: E, global.

    `overlap`: run the layer's shared experts during the rows' exchange (False: after it);
    default True on NCCL, False on gloo.
    """

    def __init__(
        self, group: ProcessGroup, data_group: ProcessGroup | None, num_experts: int
    ) -> None:
        self.group = group
        self.data_group = data_group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.size
        self.first_expert = self.rank * self.num_local
        # shared experts during the rows' exchange: on NCCL (its own stream); on gloo measured
        # 3-10% slower on a 2-core CPU (its threads compete with the compute: docs/scaling.md)
        self.overlap = "nccl" in str(dist.get_backend(group))  # also "cpu:gloo,cuda:nccl"

    def __deepcopy__(self, memo) -> ExpertParallel:  # a copy of a model talks to the same ranks
        return self

    def all_reduce(self, t: Tensor) -> Tensor:
        """`t` summed over the data-parallel ranks, as a new tensor without gradient."""
        t = t.detach().clone()
        dist.all_reduce(t, group=self.data_group)
        return t

    def dispatch(
        self, x: Tensor, plan: DispatchPlan, experts: nn.Module, alongside=None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens x [N, d] -> [N, d]: each row computed by its expert's owner rank.

        `alongside`: a function of no arguments (the shared experts on x) run while the rows
        travel to their experts (and its backward while their gradients travel back); then
        returns (the experts' output, its result)."""
        if self.size == 1:  # data parallelism only: the single-process path
            out = experts.dispatch(x, plan)
            return out if alongside is None else (out, alongside())
        rows = permute(x.to(compute_dtype(x, experts.w1)), plan)  # [M, d] owner-rank order
        if torch.is_grad_enabled() and not rows.requires_grad:
            # every rank must run the backward exchanges, also one whose input needs no grad
            rows = rows.detach().requires_grad_()
        send_counts, recv_counts = self._exchange_counts(plan.group_sizes)  # [R, e] each
        send_splits = send_counts.sum(1)
        recv_splits = recv_counts.sum(1)
        splits = torch.cat([send_splits, recv_splits]).tolist()  # the one host read
        send_splits, recv_splits = splits[: self.size], splits[self.size :]
        if alongside is None:
            received = all_to_all(rows, recv_splits, send_splits, self.group)  # [M_recv, d]
        else:  # overlapped: the exchange runs while `alongside` computes
            received, pending = all_to_all_start(rows, recv_splits, send_splits, self.group)
            side = alongside()
            received = all_to_all_wait(received, pending)
        # the local experts read the received rows in expert-major order and write each result
        # back to its row's place: a dispatch whose "tokens" are the received rows
        total = sum(recv_splits)
        regroup = DispatchPlan(
            token_index=_transpose_blocks(recv_counts, total),  # [M_recv] rank- to expert-major
            slot_weight=received.new_ones(total),
            group_sizes=recv_counts.sum(0),  # [e]
            num_dropped=plan.num_dropped.new_zeros(()),
        )
        out = experts.dispatch(received, regroup)  # [M_recv, d], blocks by source rank
        back = all_to_all(out, send_splits, recv_splits, self.group)  # [M, d]
        out = unpermute(back, plan, x.shape[0])  # [N, d]
        return out if alongside is None else (out, side)

    def _exchange_counts(self, group_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """(rows this rank sends to each rank's local experts, rows it receives from each rank
        for its own), both [R, e]."""
        send = group_sizes.reshape(self.size, self.num_local)  # [R, e]
        recv = torch.empty_like(group_sizes)  # [R*e] block i: rank i's rows for my experts
        dist.all_to_all_single(recv, group_sizes.contiguous(), group=self.group)
        return send, recv.reshape(self.size, self.num_local)


def _shard_bank(bank: ExpertBank, first: int, count: int) -> ExpertBank:
    """Experts first .. first+count-1 of `bank` as a bank of their own (copied, no RNG draws)."""
    return bank.rebuilt(lambda param: param[first : first + count].clone())


def expert_parallel(
    module: nn.Module,
    group: ProcessGroup | object | None,
    *,
    data_group: ProcessGroup | None = None,
) -> nn.Module:
    """Shard the experts of every `MoE` layer in `module` over `group`, in place.

    Rank r keeps experts r*E/R .. (r+1)*E/R - 1 of each layer's `ExpertBank` (copied from the
    full bank: calling this on the same full model on every rank gives, together, the full
    model) and exchanges rows with the other ranks in each forward and backward. Routers and
    every other parameter stay replicated. With R = 1 only the statistics change: they are
    summed over `data_group` (data parallelism).

    Args:
        module: A MoE layer or a model containing them.
        group: A ProcessGroup, a 1-D DeviceMesh, or None (the default group).
        data_group: The data-parallel ranks whose counts the balancing loss, `layer.stats` and
            (through `update_router_biases`) the sigmoid bias use; None: the default group.

    Returns:
        `module`.

    Raises:
        ValueError: num_experts not divisible by R, expert-choice routing, Soft MoE, or a
            layer already parallel. TypeError: a layer whose experts are not an `ExpertBank`.
    """
    group = process_group(group)
    size = dist.get_world_size(group)
    layers = []
    for name, layer in module.named_modules():
        if isinstance(layer, SoftMoE):
            raise ValueError(
                f"{name or 'module'}: Soft MoE mixes every token of a batch into every slot; "
                "it cannot run expert-parallel"
            )
        if isinstance(layer, MoE):
            _check_layer(name or "module", layer, size)
            layers.append(layer)
    if not layers:  # never a silent no-op (a patched transformers model: moekit.hf.parallel)
        raise ValueError(
            "expert_parallel: no moekit MoE layer in the module; for a transformers model "
            "patched by moekit.hf.patch_model use moekit.hf.parallel.expert_parallel"
        )
    rank = dist.get_rank(group)
    for layer in layers:
        if size > 1:
            local = layer.num_experts // size
            layer.experts = _shard_bank(layer.experts, rank * local, local)
        layer.parallel = ExpertParallel(group, data_group, layer.num_experts)
    return module


def _check_layer(name: str, layer: MoE, size: int) -> None:
    if layer.parallel is not None:
        raise ValueError(f"{name}: the layer is already expert-parallel")
    if isinstance(layer.router, ExpertChoiceRouter):
        raise ValueError(
            f"{name}: expert-choice routing picks tokens from the whole batch; under expert "
            "parallelism each rank would see only its own: use a token-choice router"
        )
    if not isinstance(layer.experts, ExpertBank):
        raise TypeError(
            f"{name}: expert parallelism shards an ExpertBank, got experts of type "
            f"{type(layer.experts).__name__}"
        )
    if layer.num_experts % size:
        raise ValueError(
            f"{name}: num_experts={layer.num_experts} must be divisible by the expert-parallel "
            f"group size R={size}"
        )


def sharded_parameters(module: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (first expert, num_experts global)} of the experts `module`'s ranks
    share out; the parameter holds experts first .. first + its dim 0 - 1."""
    found = {}
    for name, layer in module.named_modules():
        if isinstance(layer, MoE) and layer.parallel is not None and layer.parallel.size > 1:
            prefix = f"{name}.experts." if name else "experts."
            for pname, _ in layer.experts.named_parameters():
                found[prefix + pname] = (layer.parallel.first_expert, layer.num_experts)
    return found
