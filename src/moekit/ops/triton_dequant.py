"""One expert's quantised weight dequantised by a Triton kernel (`moekit.quant`, on CUDA).

    dequantize_nf4(data [n_pad / 2] uint8, absmax [n_pad / 64], levels [16], n, dtype) -> [n]
    dequantize_int8(data [d_in, d_out] int8, scales [d_out], dtype) -> [d_in, d_out]
    dequantize_mxfp4(blocks [d_out, d_in / 2] uint8, scales [d_out, d_in / 32] uint8,
                     values [16], dtype) -> [d_in, d_out]

Each program writes BLOCK values: NF4 reads a value's byte (the first of a pair in the high
nibble), looks its level up and scales it by its block's absmax; int8 scales each value by its
column's scale; MXFP4 (gpt-oss as stored: [d_out, d_in] codes, the first of a pair in the low
nibble, one power-of-two exponent a 32 values, biased by 127) writes the transposed weight
[d_in, d_out]. Float32 arithmetic, the output in the compute dtype. Runs on CPU tensors under
`TRITON_INTERPRET=1` (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _nf4_kernel(data_ptr, absmax_ptr, levels_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # value indices
    ok = offs < n
    byte = tl.load(data_ptr + offs // 2, mask=ok, other=0).to(tl.int32)
    code = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    level = tl.load(levels_ptr + code, mask=ok, other=0.0)
    absmax = tl.load(absmax_ptr + offs // 64, mask=ok, other=0.0)
    tl.store(out_ptr + offs, (level * absmax).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int8_kernel(data_ptr, scales_ptr, out_ptr, n, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # over [d_in, d_out]
    ok = offs < n
    value = tl.load(data_ptr + offs, mask=ok, other=0).to(tl.float32)
    scale = tl.load(scales_ptr + offs % width, mask=ok, other=0.0)
    tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mxfp4_kernel(blocks_ptr, scales_ptr, values_ptr, out_ptr, n, d_in, d_out, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # over [d_in, d_out]
    ok = offs < n
    i, j = offs // d_out, offs % d_out  # the stored weight's [j, i]
    byte = tl.load(blocks_ptr + j * (d_in // 2) + i // 2, mask=ok, other=0).to(tl.int32)
    code = tl.where(i % 2 == 0, byte & 15, byte >> 4)
    value = tl.load(values_ptr + code, mask=ok, other=0.0)
    exponent = tl.load(scales_ptr + j * (d_in // 32) + i // 32, mask=ok, other=127)
    scale = tl.exp2((exponent.to(tl.int32) - 127).to(tl.float32))
    tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_nf4(
    data: Tensor, absmax: Tensor, levels: Tensor, n: int, dtype: torch.dtype
) -> Tensor:
    """The first `n` values of one expert's NF4 codes [n_pad / 2], as `dtype` [n]."""
    out = torch.empty(n, dtype=dtype, device=data.device)
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _nf4_kernel[grid](
            data.contiguous(), absmax.float().contiguous(), levels, out, n, BLOCK=_BLOCK
        )
    return out


def dequantize_int8(data: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """One expert's int8 weight [d_in, d_out] with its column scales [d_out], as `dtype`."""
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    if out.numel():
        grid = (triton.cdiv(out.numel(), _BLOCK),)
        _int8_kernel[grid](
            data.contiguous(),
            scales.float().contiguous(),
            out,
            out.numel(),
            data.shape[1],
            BLOCK=_BLOCK,
        )
    return out


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, values: Tensor, dtype: torch.dtype) -> Tensor:
    """One expert's MXFP4 codes [d_out, d_in / 2] and exponents [d_out, d_in / 32] (uint8),
    with the 16 FP4 `values`, as its weight [d_in, d_out] in `dtype`."""
    d_out, d_in = blocks.shape[0], blocks.shape[1] * 2
    out = torch.empty(d_in, d_out, dtype=dtype, device=blocks.device)
    if out.numel():
        grid = (triton.cdiv(out.numel(), _BLOCK),)
        _mxfp4_kernel[grid](
            blocks.contiguous(),
            scales.contiguous(),
            values.float().contiguous(),
            out,
            out.numel(),
            d_in,
            d_out,
            BLOCK=_BLOCK,
        )
    return out
