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

from ._layout import batched_weight_grad


def _segments(sizes: list[int], *tensors: Tensor):
    """(expert, segment of each tensor) for every non-empty segment; one split per tensor."""
    parts = [t.split(sizes) for t in tensors]
    for expert, size in enumerate(sizes):
        if size:
            yield expert, *(p[expert] for p in parts)


def _linear_into(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None, sizes: list[int]) -> Tensor:
    ws = w.unbind(0)
    for e, x_e, out_e in _segments(sizes, x, out):
        if b is None:
            torch.mm(x_e, ws[e], out=out_e)
        else:
            torch.addmm(b[e], x_e, ws[e], out=out_e)
    return out


def _activate(pre: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return pre.relu_()  # in place: the backward needs only the output's sign
    if activation == "gelu":
        return F.gelu(pre)
    gate, up = pre.chunk(2, dim=-1)
    return F.silu(gate) * up


def _activation_backward(grad: Tensor, pre: Tensor, hidden: Tensor, activation: str) -> Tensor:
    """d loss / d pre from d loss / d hidden, overwriting `grad` where the shapes allow.

    In place, so the backward holds one hidden-sized buffer fewer (ReLU, GELU); SwiGLU writes
    both halves straight into one [.., 2h] buffer, with no temporaries.
    """
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward.grad_input(grad, hidden, 0, grad_input=grad)
    if activation == "gelu":
        return aten.gelu_backward.grad_input(grad, pre, grad_input=grad)
    gate, up = pre.chunk(2, dim=-1)
    grad_pre = torch.empty_like(pre)  # [.., 2h] = d gate | d up
    grad_gate, grad_up = grad_pre.chunk(2, dim=-1)
    aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad)  # d up = grad * silu(gate)
    torch.mul(grad, up, out=grad_gate)
    aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)  # d gate
    return grad_pre


def _weight_grads(x: Tensor, grad: Tensor, w: Tensor, has_bias: bool, sizes: list[int]):
    """dW [E, d_in, d_out] = x_e^T @ grad_e per segment, zeros for idle experts; db likewise."""
    grad_w = torch.empty_like(w)
    grad_b = grad.new_zeros(w.shape[0], w.shape[2]) if has_bias else None
    grad_ws = grad_w.unbind(0)
    for e, size in enumerate(sizes):
        if not size:  # an idle expert's gradient is zero
            grad_ws[e].zero_()
    for e, x_e, grad_e in _segments(sizes, x, grad):
        torch.mm(x_e.t(), grad_e, out=grad_ws[e])
        if grad_b is not None:
            torch.sum(grad_e, dim=0, out=grad_b[e])
    return grad_w, grad_b


def _input_grad(grad: Tensor, w: Tensor, sizes: list[int], out: Tensor | None = None) -> Tensor:
    if out is None:
        out = grad.new_empty(grad.shape[0], w.shape[1])
    ws = w.unbind(0)
    for e, grad_e, out_e in _segments(sizes, grad, out):
        torch.mm(grad_e, ws[e].t(), out=out_e)
    return out


def _forward(rows, w1, b1, w2, b2, sizes: list[int], activation: str):
    """(out [M, d], pre [M, width], hidden [M, h]); for ReLU `pre` is `hidden` (in place)."""
    pre = _linear_into(rows.new_empty(rows.shape[0], w1.shape[2]), rows, w1, b1, sizes)
    hidden = _activate(pre, activation)  # [M, h]
    out = _linear_into(rows.new_empty(rows.shape[0], w2.shape[2]), hidden, w2, b2, sizes)
    return out, pre, hidden


def _padded_index(group_sizes: Tensor, capacity: int) -> Tensor:
    """[M] the row of each routed row in the padded layout [E * capacity]."""
    num_experts = group_sizes.numel()
    num_rows = int(group_sizes.sum())
    experts = torch.arange(num_experts, device=group_sizes.device)
    expert = torch.repeat_interleave(experts, group_sizes, output_size=num_rows)  # [M]
    starts = torch.cumsum(group_sizes, 0) - group_sizes  # [E]
    offset = torch.arange(num_rows, device=group_sizes.device) - starts[expert]  # [M]
    return expert * capacity + offset


def _pad(x: Tensor, index: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Rows [M, w] -> [E, capacity, w], zeros in the padding."""
    padded = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy_(0, index, x)
    return padded.view(num_experts, capacity, x.shape[1])


def _batched(b: Tensor | None, x: Tensor, w: Tensor) -> Tensor:
    return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)


def _padded_forward(rows, w1, b1, w2, b2, group_sizes: Tensor, capacity: int, activation: str):
    """`_forward` on segments padded to `capacity` rows: one batched GEMM per weight.

    (out [M, d], pre [E, C, width], hidden [E, C, h]); padded rows never reach the output and
    get zero gradients, so they change nothing but the work.
    """
    index = _padded_index(group_sizes, capacity)  # [M]
    pre = _batched(b1, _pad(rows, index, w1.shape[0], capacity), w1)  # [E, C, width]
    hidden = _activate(pre, activation)  # [E, C, h]
    out = _batched(b2, hidden, w2).view(-1, w2.shape[2]).index_select(0, index)  # [M, d]
    return out, pre, hidden


def _padded_backward(grad_out, rows, w1, w2, pre, hidden, group_sizes, capacity, activation):
    num_experts = w1.shape[0]
    index = _padded_index(group_sizes, capacity)
    grad_out = _pad(grad_out, index, num_experts, capacity)  # [E, C, d]
    grad_w2 = batched_weight_grad(hidden, grad_out, w2)  # [E, h, d]
    grad_hidden = torch.bmm(grad_out, w2.transpose(1, 2))  # [E, C, h]
    grad_pre = _activation_backward(grad_hidden, pre, hidden, activation)  # [E, C, width]
    grad_w1 = batched_weight_grad(_pad(rows, index, num_experts, capacity), grad_pre, w1)
    grad_rows = torch.bmm(grad_pre, w1.transpose(1, 2)).view(-1, w1.shape[1])[index]  # [M, d]
    return grad_rows, grad_w1, grad_pre.sum(1), grad_w2, grad_out.sum(1)


def _mlp_forward(
    rows: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    group_sizes: Tensor,
    activation: str,
    capacity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, pre, hidden); `pre` is empty for ReLU, whose backward needs only `hidden`.

    capacity 0: one GEMM per segment, pre/hidden [M, .]; capacity C: segments padded to C rows,
    one batched GEMM per weight, pre/hidden [E, C, .].
    """
    if capacity:
        out, pre, hidden = _padded_forward(rows, w1, b1, w2, b2, group_sizes, capacity, activation)
    else:
        out, pre, hidden = _forward(rows, w1, b1, w2, b2, group_sizes.tolist(), activation)
    if activation == "relu":
        pre = rows.new_empty(0)  # outputs may not alias: relu ran in place
    return out, pre, hidden


# Under torch.compile the two passes are custom ops: one graph node each, with a fake kernel
# (the segment lengths are read on the host inside, which a traced graph cannot do). Eager runs
# call the same functions through an autograd.Function, which skips the ops' Python dispatch
# (~0.1 ms a step, a few percent at makeMoE's size).
_segment_mlp_op = torch.library.custom_op("moekit::segment_mlp", mutates_args=())(_mlp_forward)


@_segment_mlp_op.register_fake
def _(rows, w1, b1, w2, b2, group_sizes, activation, capacity):
    lead = (w1.shape[0], capacity) if capacity else (rows.shape[0],)
    pre = rows.new_empty(0) if activation == "relu" else rows.new_empty(*lead, w1.shape[2])
    return rows.new_empty(rows.shape[0], w2.shape[2]), pre, rows.new_empty(*lead, w2.shape[1])


def _mlp_backward(
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
    capacity: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_rows, grad_w1, grad_b1, grad_w2, grad_b2); empty where not wanted."""
    pre = hidden if activation == "relu" else pre
    grad_out = grad_out.contiguous()
    if capacity:
        grads = _padded_backward(
            grad_out, rows, w1, w2, pre, hidden, group_sizes, capacity, activation
        )
        grad_rows, grad_w1, grad_b1, grad_w2, grad_b2 = grads
        if not input_grad:
            grad_rows = rows.new_empty(0)
        if not has_bias:
            grad_b1, grad_b2 = rows.new_empty(0), rows.new_empty(0)
        return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2
    sizes = group_sizes.tolist()
    grad_w2, grad_b2 = _weight_grads(hidden, grad_out, w2, has_bias, sizes)
    grad_pre = _activation_backward(_input_grad(grad_out, w2, sizes), pre, hidden, activation)
    grad_w1, grad_b1 = _weight_grads(rows, grad_pre, w1, has_bias, sizes)
    grad_rows = _input_grad(grad_pre, w1, sizes) if input_grad else rows.new_empty(0)
    if not has_bias:  # outputs may not alias each other: two empties
        grad_b1, grad_b2 = rows.new_empty(0), rows.new_empty(0)
    return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2


_segment_mlp_backward_op = torch.library.custom_op("moekit::segment_mlp_backward", mutates_args=())(
    _mlp_backward
)


@_segment_mlp_backward_op.register_fake
def _(grad_out, rows, w1, w2, pre, hidden, group_sizes, activation, has_bias, input_grad, capacity):
    num_experts = w1.shape[0]
    return (
        torch.empty_like(rows) if input_grad else rows.new_empty(0),
        torch.empty_like(w1),
        w1.new_empty(num_experts, w1.shape[2]) if has_bias else w1.new_empty(0),
        torch.empty_like(w2),
        w2.new_empty(num_experts, w2.shape[2]) if has_bias else w2.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    rows, w1, b1, w2, _, group_sizes, activation, capacity = inputs
    _, pre, hidden = output
    ctx.set_materialize_grads(False)  # pre and hidden get no gradient: skip zero-filling one
    ctx.activation, ctx.has_bias, ctx.capacity = activation, b1 is not None, capacity
    ctx.save_for_backward(rows, w1, w2, pre, hidden, group_sizes)


def _backward(ctx, grad_out, *_unused, backward_fn=_segment_mlp_backward_op):
    rows, w1, w2, pre, hidden, group_sizes = ctx.saved_tensors
    grad_rows, grad_w1, grad_b1, grad_w2, grad_b2 = backward_fn(
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
        ctx.capacity,
    )
    if not ctx.has_bias:
        grad_b1 = grad_b2 = None
    grad_rows = grad_rows if ctx.needs_input_grad[0] else None
    return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


_segment_mlp_op.register_autograd(_backward, setup_context=_setup_context)


class _SegmentMLP(torch.autograd.Function):
    """The eager twin of the custom op: the same two functions, the same glue."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _mlp_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, backward_fn=_mlp_backward)


LAYOUTS = ("auto", "segments", "padded")


def padded_capacity(group_sizes: Tensor, dtype: torch.dtype, layout: str = "auto") -> int:
    """The padded layout's capacity (the largest segment), or 0 for one GEMM per segment.

    "auto" pads small, balanced segments when several threads share each GEMM or the dtype is
    16-bit: there one batched GEMM beats E small ones (2-core CPU, d=128, h=512, E=8, ~128
    rows an expert, fwd+bwd: fp32 9.7 vs 11.9 ms, bf16 6.5 vs 7.1 ms, dense 7.0 / 4.1 ms); at
    ~400+ rows an expert the segments win (docs/performance.md). Never while compiling (the
    capacity is read on the host).
    """
    if layout == "segments" or torch.compiler.is_compiling() or group_sizes.numel() == 0:
        return 0
    sizes = group_sizes.tolist()
    capacity, rows = max(sizes), sum(sizes)
    if layout == "padded":
        return max(capacity, 1)
    small = rows <= _PAD_MAX_ROWS_PER_EXPERT * len(sizes)
    balanced = capacity * len(sizes) <= _PAD_MAX_WASTE * rows
    helps = torch.get_num_threads() > 1 or dtype in (torch.bfloat16, torch.half)
    return capacity if small and balanced and helps and rows else 0


_PAD_MAX_ROWS_PER_EXPERT = 256
_PAD_MAX_WASTE = 1.3


def segment_mlp(
    rows: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    group_sizes: Tensor,
    activation: str,
    layout: str = "segments",
) -> Tensor:
    """act(rows_e @ w1[e] + b1[e]) @ w2[e] + b2[e] for each expert's segment of rows [M, d].

    Args:
        w1: [E, d, h] ([E, d, 2h] for SwiGLU: gate | up); w2: [E, h, d]; b1, b2: [E, .] or None.
        group_sizes: [E] int64 rows per expert, summing to M.
        layout: "segments" (one GEMM per expert), "padded" (segments padded to the largest,
            one batched GEMM per weight) or "auto" (`padded_capacity`'s rule).
    """
    capacity = padded_capacity(group_sizes, rows.dtype, layout)
    inputs = (rows.contiguous(), w1, b1, w2, b2, group_sizes, activation, capacity)
    if torch.compiler.is_compiling():
        return _segment_mlp_op(*inputs)[0]
    return _SegmentMLP.apply(*inputs)
