"""Grouped GEMM as Triton kernels: no host sync, so it runs inside a CUDA graph, in any dtype.

On CUDA `F.grouped_mm` runs CUTLASS in bfloat16 but a per-group loop of matmuls in float32,
which reads the group sizes on the host (a sync per call; CUDA graph capture fails). These
kernels read the segment ends on the device:

rows      one program per (row tile, column tile) over a static grid of cdiv(M, BM) + E row
          tiles (enough for any group sizes); a program finds its expert from the tile ends
          (computed on the device) and exits when it has none. rows [M, K] @ w[e] [K, N]; the
          weight is read through strides, so the backward's grad @ w[e]^T is the same kernel.
weights   grad_w[e] = rows_e^T @ grad_e: one program per (expert, K tile, N tile) looping over
          the expert's rows (bounds read on the device).

float32 follows torch's matmul precision (`torch.backends.cuda.matmul.allow_tf32`: tf32, else
full float32). Runs on CPU tensors under `TRITON_INTERPRET=1` (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BM, _BN, _BK = 64, 64, 32


@triton.jit
def _rows_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    ends_ptr,
    tile_ends_ptr,
    expert_of_tile_ptr,
    num_experts,
    K,
    N,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.load(expert_of_tile_ptr + tile)
    if e >= num_experts:  # a spare tile: the groups needed fewer
        return
    seg_start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    seg_end = tl.load(ends_ptr + e)
    first_tile = tl.load(tile_ends_ptr + e - 1, mask=e > 0, other=0)
    rm = seg_start + (tile - first_tile) * BM + tl.arange(0, BM)  # [BM] rows
    rn = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] columns
    row_ok, col_ok = rm < seg_end, rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a = tl.load(
            a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BM, BK]
        b = tl.load(
            b_ptr + e.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c = c_ptr + rm64[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    a_ptr,
    g_ptr,
    dw_ptr,
    ends_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_gm,
    stride_gn,
    stride_we,
    stride_wk,
    stride_wn,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    e = tl.program_id(0)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)  # [BK]
    rn = tl.program_id(2) * BN + tl.arange(0, BN)  # [BN]
    k_ok, n_ok = rk < K, rn < N
    seg_start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    seg_end = tl.load(ends_ptr + e)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for m0 in range(seg_start, seg_end, BM):
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < seg_end
        rm64 = rm.to(tl.int64)
        a_t = tl.load(
            a_ptr + rm64[None, :] * stride_am + rk[:, None] * stride_ak,
            mask=k_ok[:, None] & m_ok[None, :],
            other=0.0,
        )  # [BK, BM] rows^T
        g = tl.load(
            g_ptr + rm64[:, None] * stride_gm + rn[None, :] * stride_gn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # [BM, BN]
        acc = tl.dot(a_t, g, acc, input_precision=PRECISION)
    dw = dw_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # float32 under allow_tf32; ignored for 16-bit inputs


def _ends(offsets: Tensor) -> Tensor:
    return offsets.to(torch.int32).contiguous()


def grouped_mm_rows(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """rows [M, K] @ weight[e] [K, N] per segment -> [M, N] (any strides of `weight`).

    Args:
        offsets: [E] cumulative group sizes (the end of each segment), on rows' device.
    """
    m, k = rows.shape
    num_experts, _, n = weight.shape
    out = rows.new_empty((m, n))
    if m == 0 or n == 0:
        return out
    if num_experts == 0 or k == 0:
        return out.zero_()
    ends = _ends(offsets)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))  # [E]
    tile_ends = torch.cumsum(torch.div(sizes + _BM - 1, _BM, rounding_mode="floor"), 0)  # [E]
    tile_ends = tile_ends.to(torch.int32)
    num_tiles = triton.cdiv(m, _BM) + num_experts  # static: covers any group sizes
    tiles = torch.arange(num_tiles, device=rows.device, dtype=torch.int32)
    expert_of_tile = torch.searchsorted(tile_ends, tiles, right=True).to(torch.int32)  # E: spare
    grid = (num_tiles, triton.cdiv(n, _BN))
    _rows_kernel[grid](
        rows, weight, out, ends, tile_ends, expert_of_tile, num_experts, k, n,
        rows.stride(0), rows.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1),
        PRECISION=_precision(rows.dtype), BM=_BM, BN=_BN, BK=_BK,
    )  # fmt: skip
    return out


def grouped_mm_weight_grad(rows: Tensor, grad: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    """grad_w[e] = rows_e^T [K, M_e] @ grad_e [M_e, N] -> [E, K, N] (zeros for an empty group)."""
    m, k = rows.shape
    n = grad.shape[1]
    out = rows.new_empty((num_experts, k, n))
    if num_experts == 0 or k == 0 or n == 0:
        return out
    grid = (num_experts, triton.cdiv(k, _BK), triton.cdiv(n, _BN))
    _weight_grad_kernel[grid](
        rows, grad, out, _ends(offsets), k, n,
        rows.stride(0), rows.stride(1), grad.stride(0), grad.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        PRECISION=_precision(rows.dtype), BM=_BM, BN=_BN, BK=_BK,
    )  # fmt: skip
    return out
