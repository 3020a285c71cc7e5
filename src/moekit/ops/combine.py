"""Combine without atomics: expert rows [M, d] -> tokens [N, d] by the inverse permutation.

Token-choice routing gives every token k (token, slot) pairs; the plan sorted them by expert, so
row m holds pair `pair_index[m]` = n * k + j. The inverse `row_of[n * k + j]` is the row holding
that pair, or M when the pair was dropped (over capacity). Then

    out[n]             = sum_j  w[row_of[n, j]] * rows[row_of[n, j]]       (float32 accumulation)
    grad_rows[m]       = w[m] * grad_out[token[m]]                          (a gather)
    grad_slot_weight[m] = <grad_out[token[m]], rows[m]>                     (row-wise dot)

Every output element is written by one reader: no `index_add` forward or backward, the result is
deterministic, and a dropped pair reads nothing. `combine_reference` is the plain-torch version
(the [N, k, d] float32 products are materialised); `moekit.ops.triton_combine` fuses the gather,
the weights and the reduce in one kernel, and the backward's two lines in another.
`combine_index_add` is the scatter form (weighted rows added into their tokens): on CPU, where
adds are not atomics, it measured faster than the gather (fwd+bwd, 2 cores: 0.53 vs 0.99 ms at
N=512 d=128 E=8 k=2; 105 vs 116 ms at N=4096 d=512 E=64 k=6).
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_rows(pair_index: Tensor, num_pairs: int) -> Tensor:
    """row_of [P] int64: the row holding each (token, slot) pair, M where it was dropped."""
    rows = pair_index.shape[0]
    row_of = torch.full((num_pairs,), rows, dtype=torch.long, device=pair_index.device)
    return row_of.scatter_(0, pair_index, torch.arange(rows, device=pair_index.device))


def _forward(rows: Tensor, slot_weight: Tensor | None, row_of: Tensor, top_k: int) -> Tensor:
    """out [N, d] in float32: each token's k rows, weighted (unweighted: None), summed."""
    m, d = rows.shape
    n = row_of.shape[0] // top_k
    acc = torch.promote_types(rows.dtype, torch.float32)
    if m == 0:
        return rows.new_zeros((n, d), dtype=acc)
    kept = row_of < m  # [P]
    safe = torch.where(kept, row_of, 0)  # [P] a dropped pair reads row 0 ...
    weight = kept.to(acc) if slot_weight is None else slot_weight[safe].to(acc)
    weight = torch.where(kept, weight, 0.0)  # ... with weight zero
    picked = rows.index_select(0, safe).to(acc).view(n, top_k, d)  # [N, k, d]
    return torch.einsum("nkd,nk->nd", picked, weight.view(n, top_k))


def _backward(grad_out: Tensor, rows: Tensor, slot_weight: Tensor, token: Tensor):
    """(grad_rows [M, d], grad_slot_weight [M]) by gathers and a row-wise dot."""
    g = grad_out.index_select(0, token)  # [M, d] each row's token's gradient
    grad_rows = (g * slot_weight.to(g.dtype).unsqueeze(-1)).to(rows.dtype)
    acc = torch.promote_types(rows.dtype, torch.float32)
    grad_weight = (g.to(acc) * rows.to(acc)).sum(-1).to(slot_weight.dtype)
    return grad_rows, grad_weight


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, slot_weight, row_of, token, top_k):
        ctx.save_for_backward(rows, slot_weight, token)
        return _forward(rows, slot_weight, row_of, top_k).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        rows, slot_weight, token = ctx.saved_tensors
        grad_rows, grad_weight = _backward(grad_out.contiguous(), rows, slot_weight, token)
        return grad_rows, grad_weight, None, None, None


def combine_reference(
    rows: Tensor, slot_weight: Tensor, pair_index: Tensor, num_tokens: int, top_k: int
) -> Tensor:
    """rows [M, d] (pair `pair_index[m]` each) -> [N, d] in plain torch, gathers only.

    Args:
        rows: Expert outputs grouped by expert.
        slot_weight: [M] combine weight of each row (differentiable).
        pair_index: [M] int64 pair n * k + j of each row, distinct.
        num_tokens, top_k: N and k.
    """
    row_of = inverse_rows(pair_index, num_tokens * top_k)
    token = torch.div(pair_index, top_k, rounding_mode="floor")
    return _Combine.apply(rows, slot_weight, row_of, token, top_k)


def combine_index_add(
    rows: Tensor, slot_weight: Tensor, token_index: Tensor, num_tokens: int
) -> Tensor:
    """rows [M, d] -> [N, d] by a weighted `index_add` into each row's token (rows' dtype)."""
    weighted = rows * slot_weight.to(rows.dtype).unsqueeze(-1)  # [M, d]
    out = rows.new_zeros((num_tokens, rows.shape[-1]))  # [N, d]
    return out.index_add(0, token_index, weighted)


def sum_token_rows(
    rows: Tensor, token_index: Tensor, row_of: Tensor | None, top_k: int, num_tokens: int,
    backend: str,
) -> Tensor:  # fmt: skip
    """[M, d] rows -> [N, d]: each token the sum of its rows (the backward of a gather x[token]).

    backend "index_add": scatter-add by `token_index`; "torch" / "triton": each token gathers
    its k rows through the inverse permutation `row_of` (float32 sums, no atomics).
    """
    if backend == "index_add":
        return rows.new_zeros((num_tokens, rows.shape[1])).index_add_(0, token_index, rows)
    if backend == "triton":
        from .triton_combine import sum_rows_triton

        return sum_rows_triton(rows, row_of, top_k)
    return _forward(rows, None, row_of, top_k).to(rows.dtype)


class _Gather(torch.autograd.Function):
    """x [N, d] -> rows [M, d] = x[token]; backward: `sum_token_rows` of the row gradients."""

    @staticmethod
    def forward(ctx, x, token, row_of, top_k, backend):
        ctx.save_for_backward(token, row_of)
        ctx.top_k, ctx.backend, ctx.num_tokens = top_k, backend, x.shape[0]
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad_rows):
        token, row_of = ctx.saved_tensors
        grad_x = sum_token_rows(
            grad_rows.contiguous(), token, row_of, ctx.top_k, ctx.num_tokens, ctx.backend
        )
        return grad_x, None, None, None, None


def gather_rows(
    x: Tensor, token_index: Tensor, pair_index: Tensor, top_k: int, backend: str = "torch"
) -> Tensor:
    """rows [M, d] = x[token_index] whose backward gathers (no `index_add`): "torch" in plain
    torch, "triton" as the combine's forward kernel without weights.

    Args:
        x: [N, d] tokens.
        token_index, pair_index: [M] int64 each row's token and its pair n * k + j (distinct).
        top_k: k.
    """
    row_of = inverse_rows(pair_index, x.shape[0] * top_k)
    return _Gather.apply(x, token_index, row_of, top_k, backend)
