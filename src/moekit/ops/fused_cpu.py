"""Gather, experts and weighted combine as one op: tokens x [N, d] -> out [N, d].

    out[n] = sum over n's kept rows m of  w[m] * keep[m] * scale * MLP_e(m)(x[n])

The unfused path (permute -> ExpertBank -> unpermute) keeps three [M, d] tensors alive from the
forward to the backward (the gathered rows, the expert outputs, their weighted copy) and makes
two more in the combine's backward. Here the forward keeps only the hidden activations [M, h];
the backward
  1. gathers the upstream gradient g[token] [M, d] once,
  2. gets the router-weight gradient from the hidden layer: dL/dw[m] = <y_m, g_m> with
     y_m = hidden_m @ W2 + b2, so <hidden_m, g_m @ W2^T> + <b2, g_m> -- no y kept,
  3. scales g in place by w (and the dropout mask), then runs the expert backward,
  4. re-gathers x[token] for the first layer's weight gradient instead of keeping it.
The [M, d] buffers are reused within each pass (expert output into the gathered rows' buffer,
the re-gather into the gradient's, the input gradient into the re-gather's): a fresh 48 MB
buffer costs ~20 ms of page faults on CPU, more than the copy into it.
At the fine-grained shape (d=512, h=256, E=64, k=6) that is the difference between ~2.3x and
<1x the memory of a dense MLP on the same rows, at the cost of one extra gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layout import batched_weight_grad
from .segment_mlp import (
    _activate,
    _activation_backward,
    _batched,
    _input_grad,
    _linear_into,
    _pad,
    _padded_index,
    _segments,
    _weight_grads,
    padded_capacity,
)

_DOT_CHUNK = 1 << 20  # elements per chunk of the row-wise dot products (bounds the temporary)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """[M] sum(a * b, -1) without an [M, .] temporary beyond one chunk."""
    out = a.new_empty(a.shape[0])
    rows = max(1, _DOT_CHUNK // max(1, a.shape[1]))
    for s in range(0, a.shape[0], rows):
        torch.sum(a[s : s + rows] * b[s : s + rows], dim=1, out=out[s : s + rows])
    return out


class _Segments:
    """Rows grouped by expert, [M, .]: one GEMM per expert segment."""

    def __init__(self, group_sizes: Tensor) -> None:
        self.sizes = group_sizes.tolist()

    def gather(self, x: Tensor, token_index: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.index_select(x, 0, token_index, out=out)  # [M, d]

    def from_rows(self, rows: Tensor) -> Tensor:
        return rows

    def to_rows(self, t: Tensor) -> Tensor:
        return t

    def per_row(self, v: Tensor) -> Tensor:
        return v.unsqueeze(1)  # [M, 1]

    def linear(self, t: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
        out = t.new_empty(t.shape[0], w.shape[2]) if out is None else out
        return _linear_into(out, t, w, b, self.sizes)

    def input_grad(self, g: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
        return _input_grad(g, w, self.sizes, out)

    def weight_grads(self, t: Tensor, g: Tensor, w: Tensor, has_bias: bool):
        return _weight_grads(t, g, w, has_bias, self.sizes)

    def row_dot(self, a: Tensor, b: Tensor) -> Tensor:
        return _row_dot(a, b)

    def bias_dot(self, g: Tensor, b2: Tensor) -> Tensor:
        return _segment_bias_dot(g, b2, self.sizes)


class _Padded:
    """Segments padded to `capacity` rows, [E, C, .]: one batched GEMM per weight. Padding
    rows read zeros and get zero gradients; they cost work, never results."""

    def __init__(self, group_sizes: Tensor, capacity: int) -> None:
        self.index = _padded_index(group_sizes, capacity)  # [M] row in [E * C]
        self.shape = (group_sizes.numel(), capacity)

    def gather(self, x: Tensor, token_index: Tensor, out: Tensor | None = None) -> Tensor:
        return self.from_rows(x.index_select(0, token_index))

    def from_rows(self, rows: Tensor) -> Tensor:
        return _pad(rows, self.index, *self.shape)  # [E, C, .]

    def to_rows(self, t: Tensor) -> Tensor:
        return t.reshape(-1, t.shape[-1]).index_select(0, self.index)  # [M, .]

    def per_row(self, v: Tensor) -> Tensor:
        padded = v.new_zeros(self.shape[0] * self.shape[1]).index_copy_(0, self.index, v)
        return padded.view(*self.shape, 1)  # [E, C, 1]

    def linear(self, t: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
        return _batched(b, t, w)

    def input_grad(self, g: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.bmm(g, w.transpose(1, 2))

    def weight_grads(self, t: Tensor, g: Tensor, w: Tensor, has_bias: bool):
        return batched_weight_grad(t, g, w), (g.sum(1) if has_bias else None)

    def row_dot(self, a: Tensor, b: Tensor) -> Tensor:
        flat = _row_dot(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        return flat.index_select(0, self.index)

    def bias_dot(self, g: Tensor, b2: Tensor) -> Tensor:
        return torch.bmm(g, b2.unsqueeze(2)).reshape(-1).index_select(0, self.index)


def _layout(group_sizes: Tensor, capacity: int):
    return _Padded(group_sizes, capacity) if capacity else _Segments(group_sizes)


def _fused_forward(
    x, token_index, weight, group_sizes, w1, b1, w2, b2, keep, scale, activation, capacity
):
    """(out [N, d], pre, hidden): pre/hidden [M, .] (segments) or [E, C, .] (padded); pre is
    empty for ReLU (its backward needs only hidden)."""
    layout = _layout(group_sizes, capacity)
    rows = layout.gather(x, token_index)  # [M, d] or [E, C, d]
    pre = layout.linear(rows, w1, b1)
    hidden = _activate(pre, activation)  # ReLU in place
    y = layout.to_rows(layout.linear(hidden, w2, b2, out=rows))  # [M, d], in rows' buffer
    del rows
    y.mul_(weight.to(y.dtype).unsqueeze(1) * scale)  # weighted (and dropout-scaled)
    if keep is not None:
        y.masked_fill_(~keep, 0.0)
    out = x.new_zeros(x.shape).index_add_(0, token_index, y)  # [N, d]
    if activation == "relu":
        pre = x.new_empty(0)  # the op's outputs may not alias
    return out, pre, hidden


def _fused_backward(
    grad_out,
    x,
    token_index,
    weight,
    group_sizes,
    w1,
    w2,
    b2,
    keep,
    scale,
    pre,
    hidden,
    activation,
    has_bias,
    input_grad,
    capacity,
    expert_grads=True,
):
    """(grad_x, grad_weight, grad_w1, grad_b1, grad_w2, grad_b2); empty where not wanted
    (`expert_grads` False: frozen experts, as in LoRA fine-tuning: no weight-gradient GEMMs)."""
    layout = _layout(group_sizes, capacity)
    pre = hidden if activation == "relu" else pre
    g = grad_out.contiguous().index_select(0, token_index)  # [M, d] dL/d(weighted y)
    if keep is not None:  # through the dropout mask: g = keep * scale * dL/d(out)[token]
        g.masked_fill_(~keep, 0.0).mul_(scale)
    g = layout.from_rows(g)
    grad_hidden = layout.input_grad(g, w2)  # g @ W2^T, not yet scaled by w
    grad_weight = layout.row_dot(hidden, grad_hidden)  # [M] <hidden_m, g_m W2^T>
    if b2 is not None:
        grad_weight += layout.bias_dot(g, b2)  # + <b2_e, g_m>
    factor = layout.per_row(weight.to(g.dtype))
    g.mul_(factor)  # dL/dy
    empty = x.new_empty(0)
    grad_w2, grad_b2 = (
        layout.weight_grads(hidden, g, w2, has_bias) if expert_grads else (empty,) * 2
    )
    grad_pre = _activation_backward(grad_hidden.mul_(factor), pre, hidden, activation)
    del grad_hidden
    rows = layout.gather(x, token_index, out=g)  # re-gathered into g's buffer, not kept
    del g
    grad_w1, grad_b1 = (
        layout.weight_grads(rows, grad_pre, w1, has_bias) if expert_grads else (empty,) * 2
    )
    grad_x = x.new_empty(0)
    if input_grad:
        grad_rows = layout.to_rows(layout.input_grad(grad_pre, w1, out=rows))  # [M, d]
        grad_x = x.new_zeros(x.shape).index_add_(0, token_index, grad_rows)
    if not has_bias or not expert_grads:  # the op's outputs may not alias each other
        grad_b1, grad_b2 = x.new_empty(0), x.new_empty(0)
    if not expert_grads:
        grad_w1, grad_w2 = x.new_empty(0), x.new_empty(0)
    return grad_x, grad_weight.to(weight.dtype), grad_w1, grad_b1, grad_w2, grad_b2


def _segment_bias_dot(g: Tensor, b2: Tensor, sizes: list[int]) -> Tensor:
    """[M] <b2[e(m)], g_m>, one matrix-vector product per segment."""
    out = g.new_empty(g.shape[0])
    for e, g_e, out_e in _segments(sizes, g, out):
        torch.mv(g_e, b2[e], out=out_e)
    return out


def _fused(
    x: Tensor,
    token_index: Tensor,
    weight: Tensor,
    group_sizes: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    keep: Tensor | None,
    scale: float,
    activation: str,
    capacity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return _fused_forward(
        x, token_index, weight, group_sizes, w1, b1, w2, b2, keep, scale, activation, capacity
    )


def _fused_grads(
    grad_out: Tensor,
    x: Tensor,
    token_index: Tensor,
    weight: Tensor,
    group_sizes: Tensor,
    w1: Tensor,
    w2: Tensor,
    b2: Tensor | None,
    keep: Tensor | None,
    scale: float,
    pre: Tensor,
    hidden: Tensor,
    activation: str,
    has_bias: bool,
    input_grad: bool,
    capacity: int,
    expert_grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fused_backward(
        grad_out,
        x,
        token_index,
        weight,
        group_sizes,
        w1,
        w2,
        b2,
        keep,
        scale,
        pre,
        hidden,
        activation,
        has_bias,
        input_grad,
        capacity,
        expert_grads,
    )


# Under torch.compile both passes are custom ops with fake kernels (the group sizes are read
# on the host inside); eager runs call the same functions through an autograd.Function.
_fused_op = torch.library.custom_op("moekit::fused_moe", mutates_args=())(_fused)
_fused_grads_op = torch.library.custom_op("moekit::fused_moe_backward", mutates_args=())(
    _fused_grads
)


@_fused_op.register_fake
def _(x, token_index, weight, group_sizes, w1, b1, w2, b2, keep, scale, activation, capacity):
    lead = (w1.shape[0], capacity) if capacity else (token_index.shape[0],)
    pre = x.new_empty(0) if activation == "relu" else x.new_empty(*lead, w1.shape[2])
    return torch.empty_like(x), pre, x.new_empty(*lead, w2.shape[1])


@_fused_grads_op.register_fake
def _(
    grad_out,
    x,
    token_index,
    weight,
    group_sizes,
    w1,
    w2,
    b2,
    keep,
    scale,
    pre,
    hidden,
    activation,
    has_bias,
    input_grad,
    capacity,
    expert_grads=True,
):
    num_experts = w1.shape[0]
    if not expert_grads:
        empty = x.new_empty(0)
        grads = (empty, empty, empty, empty)
    else:
        grads = (
            torch.empty_like(w1),
            w1.new_empty(num_experts, w1.shape[2]) if has_bias else w1.new_empty(0),
            torch.empty_like(w2),
            w2.new_empty(num_experts, w2.shape[2]) if has_bias else w2.new_empty(0),
        )
    return (torch.empty_like(x) if input_grad else x.new_empty(0), torch.empty_like(weight), *grads)


def _setup_context(ctx, inputs, output) -> None:
    x, token_index, weight, group_sizes, w1, b1, w2, b2, keep, scale, activation, capacity = inputs
    _, pre, hidden = output
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.activation, ctx.has_bias = scale, activation, b1 is not None
    ctx.capacity = capacity
    ctx.save_for_backward(x, token_index, weight, group_sizes, w1, w2, b2, keep, pre, hidden)


def _backward(ctx, grad_out, *_unused, grads_fn=_fused_grads_op):
    x, token_index, weight, group_sizes, w1, w2, b2, keep, pre, hidden = ctx.saved_tensors
    grad_x, grad_weight, grad_w1, grad_b1, grad_w2, grad_b2 = grads_fn(
        grad_out,
        x,
        token_index,
        weight,
        group_sizes,
        w1,
        w2,
        b2,
        keep,
        ctx.scale,
        pre,
        hidden,
        ctx.activation,
        ctx.has_bias,
        ctx.needs_input_grad[0],
        ctx.capacity,
        expert_grads := any(ctx.needs_input_grad[i] for i in (4, 5, 6, 7)),
    )
    if not ctx.has_bias or not expert_grads:
        grad_b1 = grad_b2 = None
    if not expert_grads:
        grad_w1 = grad_w2 = None
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    grads = (grad_x, None, grad_weight, None, grad_w1, grad_b1, grad_w2, grad_b2)
    return grads + (None,) * 4


_fused_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedMoE(torch.autograd.Function):
    """The eager twin of the custom op (skips the ops' Python dispatch)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _fused(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, grads_fn=_fused_grads)


def fused_moe(
    x: Tensor,
    token_index: Tensor,
    weight: Tensor,
    group_sizes: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str,
    keep: Tensor | None = None,
    scale: float = 1.0,
    layout: str = "auto",
) -> Tensor:
    """out [N, d]: token n gets sum over its rows m of weight[m] * dropout(MLP_e(m)(x[n])).

    Args:
        x: Tokens [N, d].
        token_index: [M] the token of each routed row, rows grouped by expert.
        weight: [M] combine weights (differentiable).
        group_sizes: [E] rows per expert.
        w1, b1, w2, b2: The bank's stacked weights ([E, d, width], [E, h, d]) and biases.
        keep, scale: A dropout keep mask [M, d] and 1/(1-p), or None and 1.
        layout: "segments", "padded" or "auto" (`padded_capacity`'s rule).
    """
    capacity = padded_capacity(group_sizes, x.dtype, layout)
    inputs = (
        x.contiguous(),
        token_index,
        weight,
        group_sizes,
        w1,
        b1,
        w2,
        b2,
        keep,
        scale,
        activation,
        capacity,
    )
    if torch.compiler.is_compiling():
        return _fused_op(*inputs)[0]
    return _FusedMoE.apply(*inputs)
