"""Dispatch: the plan that moves tokens to experts and back.

(indices [N, k], weights [N, k]) -> DispatchPlan: the N*k (token, slot) pairs sorted by expert,
group sizes per expert, and (with a capacity) the pairs dropped. Then
  permute:   x [N, d] -> rows [M, d] grouped by expert (a gather; on accelerators its backward
             gathers too)
  unpermute: rows [M, d] -> out [N, d], each token the weighted sum of its rows (an
             index_add on CPU; on accelerators a gather through the inverse permutation)
Work and memory are O(N*k): one argsort, no per-expert masks, no [N, E, d] tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_capacity_factor, check_positive_int, expert_capacity
from ._counts import count_ids
from .ops import combine, gather


class DispatchPlan(NamedTuple):
    """Where each routed row comes from and where it goes.

    Rows are grouped by expert (expert 0's rows first); within an expert, in token order.
    """

    token_index: Tensor  # [M] int64 the token each row reads and writes back to
    slot_weight: Tensor  # [M] combine weight of each row (differentiable w.r.t. the router)
    group_sizes: Tensor  # [E] int64 rows per expert; sums to M
    num_dropped: Tensor  # [] int64 token-choice: (token, slot) pairs over capacity;
    #                       expert-choice: tokens that no expert chose
    pair_index: Tensor | None = None  # [M] int64 token-choice: the pair n * k + j of each row
    top_k: int = 0  # token-choice: k (the pairs per token); 0 for expert choice


def _check_routing(indices: Tensor, weights: Tensor, bound: int | None = None) -> None:
    """Shapes and dtypes; on CPU outside compile also the ids' range [0, bound) (a host read)."""
    if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"indices must be an integer tensor of shape [N, k], got {indices.dtype} "
            f"{tuple(indices.shape)}"
        )
    if weights.shape != indices.shape:
        raise ValueError(
            f"weights must have the shape of indices {tuple(indices.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    checkable = indices.device.type == "cpu" and not torch.compiler.is_compiling()
    if bound is not None and checkable and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= bound:
            raise ValueError(f"indices must lie in [0, {bound}), got [{low}, {high}]")


def make_plan(
    indices: Tensor,
    weights: Tensor,
    num_experts: int,
    capacity_factor: float | None = None,
) -> DispatchPlan:
    """Plan the dispatch of token-choice routing.

    Dropless (the default) keeps all N*k pairs and never syncs with the host. With a
    `capacity_factor` each expert keeps at most C = ceil(capacity_factor * N * k / E) rows: an
    over-full expert drops its pairs with the lowest router weight first, and among equal
    weights the later (token, slot) position first (position = token * k + slot). Dropped pairs
    contribute zero to the output (the residual carries the token). The number of kept rows is
    data-dependent, so this path reads one count back to the host.

    Args:
        indices: Expert ids of shape [N, k], distinct per token.
        weights: Combine weights of shape [N, k].
        num_experts: E.
        capacity_factor: None for dropless, else a float > 0.

    Returns:
        The `DispatchPlan`.
    """
    check_positive_int("num_experts", num_experts)
    _check_routing(indices, weights, num_experts)
    check_capacity_factor(capacity_factor)
    num_pairs = indices.numel()
    expert_flat = indices.reshape(-1).long()  # [N*k] pair p = token * k + slot
    counts = count_ids(expert_flat, num_experts)  # [E]
    if capacity_factor is None:
        order = torch.argsort(expert_flat, stable=True)  # [N*k] grouped by expert, token order
        group_sizes, num_dropped = counts, counts.new_zeros(())
    else:
        capacity = expert_capacity(num_pairs, num_experts, capacity_factor)
        keep = _within_capacity(expert_flat, weights.detach().reshape(-1), counts, capacity)
        kept = torch.nonzero(keep).squeeze(1)  # [M] host sync: M is data-dependent
        order = kept[torch.argsort(expert_flat[kept], stable=True)]  # same order as dropless
        group_sizes = counts.clamp(max=capacity)
        num_dropped = num_pairs - group_sizes.sum()
    top_k = indices.shape[1]
    return DispatchPlan(
        token_index=torch.div(order, top_k, rounding_mode="floor"),  # [M]
        slot_weight=weights.reshape(-1)[order],  # [M]
        group_sizes=group_sizes,
        num_dropped=num_dropped,
        pair_index=order,
        top_k=top_k,
    )


def _within_capacity(expert_flat: Tensor, weight_flat: Tensor, counts: Tensor, capacity: int):
    """[P] bool: whether each pair ranks among its expert's `capacity` heaviest.

    Rank within an expert by weight descending, ties by position ascending.
    """
    num_pairs = expert_flat.numel()
    # 1. sort by weight (descending; stable keeps position order on ties), then by expert
    by_weight = torch.argsort(weight_flat, descending=True, stable=True)  # [P]
    ranked = by_weight[torch.argsort(expert_flat[by_weight], stable=True)]  # [P]
    # 2. rank inside the expert's group = sorted position - the group's start
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank_sorted = torch.arange(num_pairs, device=expert_flat.device) - starts[expert_flat[ranked]]
    rank = torch.empty_like(rank_sorted).scatter_(0, ranked, rank_sorted)  # [P] back to pair order
    return rank < capacity


def expert_choice_plan(token_index: Tensor, weights: Tensor, num_tokens: int) -> DispatchPlan:
    """Plan the dispatch of expert-choice routing: expert e's rows are its C chosen tokens.

    Args:
        token_index: Token ids of shape [E, C].
        weights: Combine weights of shape [E, C].
        num_tokens: N, to count the tokens no expert chose.
    """
    _check_routing(token_index, weights, num_tokens)
    num_experts, capacity = token_index.shape
    token_flat = token_index.reshape(-1).long()  # [E*C] grouped by expert
    chosen = count_ids(token_flat, num_tokens)  # [N] experts per token
    return DispatchPlan(
        token_index=token_flat,
        slot_weight=weights.reshape(-1),
        group_sizes=torch.full(
            (num_experts,), capacity, dtype=torch.long, device=token_flat.device
        ),
        num_dropped=(chosen == 0).sum(),
    )


def permute(x: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather token rows x [N, d] into expert order: rows [M, d] (on accelerators, for token
    choice, a backward without atomics: `moekit.ops.gather`)."""
    return gather(x, plan.token_index, plan.pair_index, plan.top_k)


def unpermute(rows: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Combine expert rows [M, d] into tokens [N, d]: out[n] = sum of weight * row over n's rows.

    A token with no kept row gets zeros. On CPU a weighted `index_add`; on accelerators, for
    token choice, each token gathers its k rows through the inverse permutation and sums them
    in float32 (no atomics, deterministic; `moekit.ops.combine`). Returns the rows' dtype.
    """
    weight = plan.slot_weight.to(rows.dtype)
    return combine(rows, weight, plan.token_index, num_tokens, plan.pair_index, plan.top_k)
