"""The expert MLP over contiguous segments, forward and backward written out, as one custom op.

rows [M, d] grouped by expert -> pre = rows_e @ w1[e] + b1[e] -> act -> @ w2[e] + b2[e] -> [M, d].
Autograd over per-segment matmuls pays for a `cat` of the outputs, a gather of the biases, a
`stack` of the per-expert weight gradients and a fresh buffer per elementwise op; here every
matmul writes straight into its slice of one output buffer (`out=`), the ReLU runs in place, and
the backward fills preallocated gradients. On CPU, where each pass over an [M, h] tensor costs
memory bandwidth, that is the difference between ~1.9x and ~1.3x the dense time.
The readable twin is `experts.loop_linear` with autograd; tests hold the two equal.
`moekit::segment_mlp` reads the group sizes on the host inside the op; its fake kernel gives
`torch.compile` the output shapes without them, so a compiled layer is one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segments(sizes: list[int]):
    """(expert, start, end) of every non-empty segment."""
    start = 0
    for expert, size in enumerate(sizes):
        if size:
            yield expert, start, start + size
        start += size


def _linear_into(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None, sizes: list[int]) -> Tensor:
    for e, s, t in _segments(sizes):
        if b is None:
            torch.mm(x[s:t], w[e], out=out[s:t])
        else:
            torch.addmm(b[e], x[s:t], w[e], out=out[s:t])
    return out


def _activate(pre: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return pre.relu_()  # in place: the backward needs only the output's sign
    if activation == "gelu":
        return F.gelu(pre)
    gate, up = pre.chunk(2, dim=-1)
    return F.silu(gate) * up


def _activation_backward(grad: Tensor, pre: Tensor, hidden: Tensor, activation: str) -> Tensor:
    """d loss / d pre from d loss / d hidden."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, hidden, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    gate, up = pre.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)


def _weight_grads(x: Tensor, grad: Tensor, w: Tensor, has_bias: bool, sizes: list[int]):
    """dW [E, d_in, d_out] = x_e^T @ grad_e per segment, zeros for idle experts; db likewise."""
    grad_w = torch.empty_like(w)
    grad_b = grad.new_zeros(w.shape[0], w.shape[2]) if has_bias else None
    for e, size in enumerate(sizes):
        if not size:
            grad_w[e].zero_()
    for e, s, t in _segments(sizes):
        torch.mm(x[s:t].t(), grad[s:t], out=grad_w[e])
        if grad_b is not None:
            torch.sum(grad[s:t], dim=0, out=grad_b[e])
    return grad_w, grad_b


def _input_grad(grad: Tensor, w: Tensor, sizes: list[int]) -> Tensor:
    out = grad.new_empty(grad.shape[0], w.shape[1])
    for e, s, t in _segments(sizes):
        torch.mm(grad[s:t], w[e].t(), out=out[s:t])
    return out


def _forward(rows, w1, b1, w2, b2, sizes: list[int], activation: str):
    """(out [M, d], pre [M, width], hidden [M, h]); for ReLU `pre` is `hidden` (in place)."""
    pre = _linear_into(rows.new_empty(rows.shape[0], w1.shape[2]), rows, w1, b1, sizes)
    hidden = _activate(pre, activation)  # [M, h]
    out = _linear_into(rows.new_empty(rows.shape[0], w2.shape[2]), hidden, w2, b2, sizes)
    return out, pre, hidden


@torch.library.custom_op("moekit::segment_mlp", mutates_args=())
def _segment_mlp_op(
    rows: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    group_sizes: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, pre, hidden); `pre` is empty for ReLU, whose backward needs only `hidden`.

    An op of its own so that `torch.compile` sees one node with a fake kernel (the segment
    lengths are read on the host inside, which a traced graph cannot do).
    """
    out, pre, hidden = _forward(rows, w1, b1, w2, b2, group_sizes.tolist(), activation)
    if activation == "relu":
        pre = rows.new_empty(0)  # outputs may not alias: relu ran in place
    return out, pre, hidden


@_segment_mlp_op.register_fake
def _(rows, w1, b1, w2, b2, group_sizes, activation):
    m = rows.shape[0]
    pre = rows.new_empty(0) if activation == "relu" else rows.new_empty(m, w1.shape[2])
    return rows.new_empty(m, w2.shape[2]), pre, rows.new_empty(m, w2.shape[1])


@torch.library.custom_op("moekit::segment_mlp_backward", mutates_args=())
def _segment_mlp_backward_op(
    grad_out: Tensor,
    rows: Tensor,
    w1: Tensor,
    w2: Tensor,
    pre: Tensor,
    hidden: Tensor,
    group_sizes: Tensor,
    activation: str,
    has_bias: bool,
    input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_rows, grad_w1, grad_b1, grad_w2, grad_b2); empty where not wanted."""
    sizes = group_sizes.tolist()
    pre = hidden if activation == "relu" else pre
    grad_out = grad_out.contiguous()
    grad_w2, grad_b2 = _weight_grads(hidden, grad_out, w2, has_bias, sizes)
    grad_pre = _activation_backward(_input_grad(grad_out, w2, sizes), pre, hidden, activation)
    grad_w1, grad_b1 = _weight_grads(rows, grad_pre, w1, has_bias, sizes)
    grad_rows = _input_grad(grad_pre, w1, sizes) if input_grad else rows.new_empty(0)
    if not has_bias:  # outputs may not alias each other: two empties
        grad_b1, grad_b2 = rows.new_empty(0), rows.new_empty(0)
    return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2


@_segment_mlp_backward_op.register_fake
def _(grad_out, rows, w1, w2, pre, hidden, group_sizes, activation, has_bias, input_grad):
    num_experts = w1.shape[0]
    return (
        torch.empty_like(rows) if input_grad else rows.new_empty(0),
        torch.empty_like(w1),
        w1.new_empty(num_experts, w1.shape[2]) if has_bias else w1.new_empty(0),
        torch.empty_like(w2),
        w2.new_empty(num_experts, w2.shape[2]) if has_bias else w2.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    rows, w1, b1, w2, _, group_sizes, activation = inputs
    _, pre, hidden = output
    ctx.set_materialize_grads(False)  # pre and hidden get no gradient: skip zero-filling one
    ctx.activation, ctx.has_bias = activation, b1 is not None
    ctx.save_for_backward(rows, w1, w2, pre, hidden, group_sizes)


def _backward(ctx, grad_out, _grad_pre, _grad_hidden):
    rows, w1, w2, pre, hidden, group_sizes = ctx.saved_tensors
    grad_rows, grad_w1, grad_b1, grad_w2, grad_b2 = _segment_mlp_backward_op(
        grad_out,
        rows,
        w1,
        w2,
        pre,
        hidden,
        group_sizes,
        ctx.activation,
        ctx.has_bias,
        ctx.needs_input_grad[0],
    )
    if not ctx.has_bias:
        grad_b1 = grad_b2 = None
    grad_rows = grad_rows if ctx.needs_input_grad[0] else None
    return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2, None, None


_segment_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def segment_mlp(
    rows: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    group_sizes: Tensor,
    activation: str,
) -> Tensor:
    """act(rows_e @ w1[e] + b1[e]) @ w2[e] + b2[e] for each expert's segment of rows [M, d].

    Args:
        w1: [E, d, h] ([E, d, 2h] for SwiGLU: gate | up); w2: [E, h, d]; b1, b2: [E, .] or None.
        group_sizes: [E] int64 rows per expert, summing to M.
    """
    return _segment_mlp_op(rows.contiguous(), w1, b1, w2, b2, group_sizes, activation)[0]
