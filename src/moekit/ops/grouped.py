"""Grouped GEMM on rows grouped by expert: `F.grouped_mm`, and the custom op `moekit::grouped_mm`.

`F.grouped_mm` runs CUTLASS for bfloat16 on CUDA, but a per-group loop of matmuls for float32
there, which reads the group sizes on the host (a sync each call, and CUDA graph capture fails);
and it has a fake (meta) kernel for bfloat16 only, so torch.compile cannot trace it in float32.
The custom op `moekit::grouped_mm` (a fake kernel of its own; backward = two grouped GEMMs:
grad_rows = grad @ w[e]^T per segment, grad_w[e] = rows_e^T @ grad_e) takes every other case:
under torch.compile in any dtype but bfloat16, and on CUDA outside bfloat16 always, where it
runs the Triton kernels of `triton_grouped` (no host sync) when triton imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._layout import transposed
from ._triton import triton_module
from .combine import sum_token_rows
from .segment_mlp import _input_grad, _linear_into, _weight_grads


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


def _sizes(offsets: Tensor) -> list[int]:
    """[E] segment ends -> the segment lengths, on the host (inside the op: torch.compile and
    torch.export never see the read)."""
    return torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()


def _loop_forward(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """One matmul per segment (`segment_mlp`'s loops): what `F.grouped_mm` does not take
    (float64, odd widths, no rows)."""
    out = rows.new_empty(rows.shape[0], weight.shape[2])  # [M, d_out]
    return _linear_into(out, rows, weight, None, _sizes(offsets))


def _loop_backward(grad: Tensor, rows: Tensor, weight: Tensor, offsets: Tensor, weight_grad: bool):
    sizes = _sizes(offsets)
    grad_rows = _input_grad(grad, weight, sizes)  # [M, d_in]
    if not weight_grad:
        return grad_rows, weight.new_empty(0)
    return grad_rows, _weight_grads(rows, grad, weight, False, sizes)[0]  # the weight's layout


def _torch_forward(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    if not grouped_mm_supported(rows, weight):
        return _loop_forward(rows, weight, offsets)
    return F.grouped_mm(rows, weight, offs=offsets).contiguous()  # the fake kernel's layout


def _torch_backward(
    grad: Tensor, rows: Tensor, weight: Tensor, offsets: Tensor, weight_grad: bool = True
):
    grad = grad.contiguous()
    if not grouped_mm_supported(rows, weight):
        return _loop_backward(grad, rows, weight, offsets, weight_grad)
    grad_rows = F.grouped_mm(grad, weight.transpose(-2, -1), offs=offsets)  # [M, d_in]
    if not weight_grad:  # a frozen weight (LoRA fine-tuning): no [E, d_in, d_out] GEMMs
        return grad_rows.contiguous(), weight.new_empty(0)
    if transposed(weight):  # [E, d_out, d_in], seen as [E, d_in, d_out]
        grad_weight = F.grouped_mm(grad.t(), rows, offs=offsets).transpose(-2, -1)
    else:
        grad_weight = F.grouped_mm(rows.t(), grad, offs=offsets).contiguous()  # [E, d_in, d_out]
    return grad_rows.contiguous(), grad_weight


def _triton_kernels(rows: Tensor):
    """`triton_grouped` for this CUDA tensor's dtype, or None (bf16 runs CUTLASS)."""
    return None if rows.dtype == torch.bfloat16 else triton_module("triton_grouped")


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return _torch_forward(rows, weight, offsets)


@_grouped_mm.register_kernel("cuda")
def _(rows, weight, offsets):
    kernels = _triton_kernels(rows)
    if kernels is None:
        return _torch_forward(rows, weight, offsets)
    return kernels.grouped_mm_rows(rows, weight, offsets)


@_grouped_mm.register_fake
def _(rows, weight, offsets):
    return rows.new_empty((rows.shape[0], weight.shape[2]))


@torch.library.custom_op("moekit::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(
    grad: Tensor, rows: Tensor, weight: Tensor, offsets: Tensor, weight_grad: bool = True
) -> tuple[Tensor, Tensor]:
    """(grad rows [M, d_in], grad weight in the weight's layout, or empty where not wanted)."""
    return _torch_backward(grad, rows, weight, offsets, weight_grad)


@_grouped_mm_backward.register_kernel("cuda")
def _(grad, rows, weight, offsets, weight_grad=True):
    kernels = _triton_kernels(rows)
    if kernels is None:
        return _torch_backward(grad, rows, weight, offsets, weight_grad)
    grad = grad.contiguous()
    grad_rows = kernels.grouped_mm_rows(grad, weight.transpose(-2, -1), offsets)  # [M, d_in]
    if not weight_grad:
        return grad_rows, weight.new_empty(0)
    if transposed(weight):  # grad^T rows per expert: [E, d_out, d_in], the weight's layout
        grad_weight = kernels.grouped_mm_weight_grad(grad, rows, offsets, weight.shape[0])
        return grad_rows, grad_weight.transpose(-2, -1)
    grad_weight = kernels.grouped_mm_weight_grad(rows, grad, offsets, weight.shape[0])
    return grad_rows, grad_weight


@_grouped_mm_backward.register_fake
def _(grad, rows, weight, offsets, weight_grad=True):
    grad_weight = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return rows.new_empty(rows.shape), grad_weight  # the weight's layout


def _setup_context(ctx, inputs, output) -> None:
    rows, weight, offsets = inputs
    ctx.save_for_backward(rows, weight, offsets)


def _backward(ctx, grad):
    rows, weight, offsets = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    grad_rows, grad_weight = _grouped_mm_backward(grad, rows, weight, offsets, weight_grad)
    return grad_rows, grad_weight if weight_grad else None, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def _uses_custom_op(rows: Tensor, weight: Tensor) -> bool:
    if transposed(weight) or not grouped_mm_supported(rows, weight):  # its layout; the loop
        return True
    return rows.dtype != torch.bfloat16 and (torch.compiler.is_compiling() or rows.is_cuda)


def grouped_linear(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """rows [M, d_in] @ weight[e] for each expert's segment -> [M, d_out] in one grouped GEMM
    (where `F.grouped_mm` takes neither the dtype nor the widths, one matmul per segment inside
    the custom op: still one node for torch.compile and torch.export).

    Args:
        offsets: [E] int32 cumulative group sizes (end of each segment).
    """
    if _uses_custom_op(rows, weight):
        return _grouped_mm(rows, weight, offsets)  # traceable, and sync-free on CUDA
    return _ContiguousGrad.apply(F.grouped_mm(rows, weight, offs=offsets))


class _GatheredGroupedLinear(torch.autograd.Function):
    """x[token_index] @ w[e] per segment, without keeping the gathered rows for the backward:
    it gathers them again (one [M, d_in] gather) instead of holding them all step long."""

    @staticmethod
    def forward(ctx, x, weight, offsets, token_index, row_of, top_k, backend):
        rows = x.index_select(0, token_index)  # [M, d_in]
        if _uses_custom_op(rows, weight):
            out = _grouped_mm(rows, weight, offsets)
        else:
            out = F.grouped_mm(rows, weight, offs=offsets)
        ctx.save_for_backward(x, weight, offsets, token_index, row_of)
        ctx.top_k, ctx.backend = top_k, backend
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets, token_index, row_of = ctx.saved_tensors
        rows = x.index_select(0, token_index)  # [M, d_in] again
        weight_grad = ctx.needs_input_grad[1]
        grad_rows, grad_weight = _grouped_mm_backward(
            grad.contiguous(), rows, weight, offsets, weight_grad
        )
        if not weight_grad:
            grad_weight = None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = sum_token_rows(
                grad_rows, token_index, row_of, ctx.top_k, x.shape[0], ctx.backend
            )
        return grad_x, grad_weight, None, None, None, None, None


@torch.library.custom_op("moekit::row_bias", mutates_args=())
def _row_bias(bias: Tensor, row_expert: Tensor) -> Tensor:
    return bias.index_select(0, row_expert)


@_row_bias.register_fake
def _(bias, row_expert):
    return bias.new_empty(row_expert.shape[0], bias.shape[1])


@torch.library.custom_op("moekit::row_bias_backward", mutates_args=())
def _row_bias_backward(grad: Tensor, row_expert: Tensor, num_experts: int) -> Tensor:
    out = grad.new_zeros(num_experts, grad.shape[1])  # [E, n] each expert's rows summed
    return out.index_add_(0, row_expert, grad)


@_row_bias_backward.register_fake
def _(grad, row_expert, num_experts):
    return grad.new_empty(num_experts, grad.shape[1])


def _row_bias_setup(ctx, inputs, output) -> None:
    bias, row_expert = inputs
    ctx.save_for_backward(row_expert)
    ctx.num_experts = bias.shape[0]


def _row_bias_grad(ctx, grad):
    (row_expert,) = ctx.saved_tensors
    return _row_bias_backward(grad.contiguous(), row_expert, ctx.num_experts), None


_row_bias.register_autograd(_row_bias_grad, setup_context=_row_bias_setup)


def row_bias(bias: Tensor, row_expert: Tensor) -> Tensor:
    """bias [E, n] -> [M, n], each row its expert's bias (`row_expert` [M]); the backward sums
    each expert's rows. Eager runs `index_select`; under torch.compile one opaque op each way:
    inductor's CPU code for the fused scatter of this gradient (vectorised, several threads)
    corrupted memory in torch 2.13 (gpt-oss's biased experts, two layers)."""
    if torch.compiler.is_compiling():
        return _row_bias(bias, row_expert)
    return bias.index_select(0, row_expert)
