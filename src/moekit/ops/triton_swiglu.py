"""SwiGLU, silu(gate) * up on h = [gate | up], as two Triton kernels.

Plain torch runs it as chunk, silu, mul forward and mul, mul, silu_backward, cat backward: six
passes over [M, h] tensors and an [M, h] product kept for the backward. Here the forward reads h
once and writes the output; the backward reads h and the output's gradient once and writes
h's gradient [M, 2h] in place of the cat; only h is kept. Float32 arithmetic in registers.
Runs on CPU tensors under `TRITON_INTERPRET=1` (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _forward_kernel(h_ptr, out_ptr, numel, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # over [M, width]
    ok = offs < numel
    row, col = offs // width, offs % width
    gate = tl.load(h_ptr + row * 2 * width + col, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * width + width + col, mask=ok, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(h_ptr, grad_ptr, grad_h_ptr, numel, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    row, col = offs // width, offs % width
    at_gate = row * 2 * width + col
    gate = tl.load(h_ptr + at_gate, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + at_gate + width, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    grad_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    dtype = grad_h_ptr.dtype.element_ty
    tl.store(grad_h_ptr + at_gate, grad_gate.to(dtype), mask=ok)
    tl.store(grad_h_ptr + at_gate + width, (g * silu).to(dtype), mask=ok)


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, _BLOCK),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        h = h.contiguous()
        width = h.shape[-1] // 2
        out = h.new_empty((*h.shape[:-1], width))
        if out.numel():
            _forward_kernel[_grid(out.numel())](h, out, out.numel(), width, BLOCK=_BLOCK)
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h = torch.empty_like(h)
        if grad.numel():
            width = h.shape[-1] // 2
            _backward_kernel[_grid(grad.numel())](
                h, grad, grad_h, grad.numel(), width, BLOCK=_BLOCK
            )
        return grad_h


def swiglu_triton(h: Tensor) -> Tensor:
    """[.., 2h] = [gate | up] -> silu(gate) * up [.., h]."""
    return _SwiGLU.apply(h)
