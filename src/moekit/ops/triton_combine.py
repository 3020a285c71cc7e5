"""The atomic-free combine (`moekit.ops.combine`) as two Triton kernels.

forward   one program per (token, block of columns): reads the token's k rows through the
          inverse permutation, weights them and sums in float32 registers; one store per output
          element, nothing materialised (a dropped pair adds zero, never a NaN times zero).
backward  one program per expert row: reads its token's upstream gradient once, writes the row's
          gradient (weight * g) and, from the same loads, the router-weight gradient <g, row>.
The forward kernel without weights is also the backward of the gather x[token] -> rows
(`sum_rows_triton`): each token sums its rows' gradients, where autograd would `index_add`.
Both run on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (how CI tests them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .combine import inverse_rows


@triton.jit
def _combine_forward_kernel(
    rows_ptr,
    weight_ptr,
    row_of_ptr,
    out_ptr,
    num_rows,
    width,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_width = cols < width
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(row_of_ptr + token * TOP_K + j)
        kept = row < num_rows  # a dropped pair points past the last row ...
        row = tl.where(kept, row, 0)  # ... so it reads row 0 and adds nothing
        x = tl.load(rows_ptr + row * width + cols, mask=in_width, other=0.0).to(tl.float32)
        if WEIGHTED:
            x *= tl.load(weight_ptr + row).to(tl.float32)
        acc += tl.where(kept, x, 0.0)
    tl.store(out_ptr + token * width + cols, acc.to(out_ptr.dtype.element_ty), mask=in_width)


@triton.jit
def _combine_backward_kernel(
    grad_out_ptr,
    rows_ptr,
    weight_ptr,
    token_ptr,
    grad_rows_ptr,
    grad_weight_ptr,
    width,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(token_ptr + row)
    w = tl.load(weight_ptr + row).to(tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_width = cols < width
        g = tl.load(grad_out_ptr + token * width + cols, mask=in_width, other=0.0).to(tl.float32)
        x = tl.load(rows_ptr + row * width + cols, mask=in_width, other=0.0).to(tl.float32)
        grad_row = (w * g).to(grad_rows_ptr.dtype.element_ty)
        tl.store(grad_rows_ptr + row * width + cols, grad_row, mask=in_width)
        dot += g * x
    tl.store(grad_weight_ptr + row, tl.sum(dot, axis=0).to(grad_weight_ptr.dtype.element_ty))


def _block(width: int) -> int:
    return min(1024, triton.next_power_of_2(max(width, 16)))


def _sum_rows(rows: Tensor, slot_weight: Tensor | None, row_of: Tensor, top_k: int) -> Tensor:
    """out [N, d]: each token's k rows (weighted by `slot_weight` unless None) summed in float32."""
    rows = rows.contiguous()
    num_rows, width = rows.shape
    num_tokens = row_of.shape[0] // top_k
    out = rows.new_empty((num_tokens, width))
    if num_tokens and width:
        if num_rows == 0:
            out.zero_()
        else:
            block = _block(width)
            grid = (num_tokens, triton.cdiv(width, block))
            weighted = slot_weight is not None
            _combine_forward_kernel[grid](
                rows, slot_weight if weighted else rows, row_of, out, num_rows, width,
                TOP_K=top_k, BLOCK=block, WEIGHTED=weighted,
            )  # fmt: skip
    return out


class _TritonCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, slot_weight, row_of, token, top_k):
        rows, slot_weight = rows.contiguous(), slot_weight.contiguous()
        ctx.save_for_backward(rows, slot_weight, token)
        return _sum_rows(rows, slot_weight, row_of, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        rows, slot_weight, token = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        num_rows, width = rows.shape
        grad_rows = torch.empty_like(rows)
        grad_weight = torch.empty_like(slot_weight)
        if num_rows and width:
            _combine_backward_kernel[(num_rows,)](
                grad_out, rows, slot_weight, token, grad_rows, grad_weight, width,
                BLOCK=_block(width),
            )  # fmt: skip
        elif num_rows:
            grad_weight.zero_()
        return grad_rows, grad_weight, None, None, None


def combine_triton(
    rows: Tensor, slot_weight: Tensor, pair_index: Tensor, num_tokens: int, top_k: int
) -> Tensor:
    """`moekit.ops.combine.combine_reference` in two Triton kernels (same arguments)."""
    row_of = inverse_rows(pair_index, num_tokens * top_k)
    token = torch.div(pair_index, top_k, rounding_mode="floor")
    return _TritonCombine.apply(rows, slot_weight, row_of, token, top_k)


def sum_rows_triton(rows: Tensor, row_of: Tensor, top_k: int) -> Tensor:
    """Each token's k rows [M, d] summed (no weights) -> [N, d]: the backward of a gather."""
    return _sum_rows(rows, None, row_of, top_k)
