"""Grouped GEMM on rows grouped by expert: `F.grouped_mm`, and a float32 path for torch.compile.

`F.grouped_mm` has a fake (meta) kernel for bfloat16 only, so a compiled graph that hands it a
float32 tensor fails to trace. Under torch.compile any other dtype goes through the custom op
`moekit::grouped_mm` (a fake kernel of its own, and a backward that is two grouped GEMMs:
grad_rows = grad @ w[e]^T per segment, grad_w[e] = rows_e^T @ grad_e); eager runs `F.grouped_mm`
with its own autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_mm_supported(rows: Tensor, weight: Tensor) -> bool:
    """Whether `F.grouped_mm` takes rows [M, .] @ weight [E, d_in, d_out] (rows' dtype and M).

    It needs float32/bf16/fp16, 16-byte aligned row strides and at least one row.
    """
    if not hasattr(F, "grouped_mm") or rows.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.half,
    ):
        return False
    size = rows.element_size()
    d_in, d_out = weight.shape[1], weight.shape[2]
    return rows.shape[0] > 0 and (d_in * size) % 16 == 0 and (d_out * size) % 16 == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects
    the expanded zero-stride gradient that ``out.sum().backward()`` sends."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return F.grouped_mm(rows, weight, offs=offsets)


@_grouped_mm.register_fake
def _(rows, weight, offsets):
    return rows.new_empty((rows.shape[0], weight.shape[2]))


@torch.library.custom_op("moekit::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(
    grad: Tensor, rows: Tensor, weight: Tensor, offsets: Tensor
) -> tuple[Tensor, Tensor]:
    grad = grad.contiguous()
    grad_rows = F.grouped_mm(grad, weight.transpose(-2, -1), offs=offsets)  # [M, d_in]
    grad_weight = F.grouped_mm(rows.t(), grad, offs=offsets)  # [E, d_in, d_out]
    return grad_rows, grad_weight


@_grouped_mm_backward.register_fake
def _(grad, rows, weight, offsets):
    return rows.new_empty(rows.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    rows, weight, offsets = inputs
    ctx.save_for_backward(rows, weight, offsets)


def _backward(ctx, grad):
    rows, weight, offsets = ctx.saved_tensors
    grad_rows, grad_weight = _grouped_mm_backward(grad, rows, weight, offsets)
    return grad_rows, grad_weight, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """rows [M, d_in] @ weight[e] for each expert's segment -> [M, d_out] in one grouped GEMM.

    Args:
        offsets: [E] int32 cumulative group sizes (end of each segment).
    """
    if torch.compiler.is_compiling() and rows.dtype != torch.bfloat16:
        return _grouped_mm(rows, weight, offsets)  # traceable in any dtype
    return _ContiguousGrad.apply(F.grouped_mm(rows, weight, offs=offsets))
