"""moekit.ops: the atomic-free combine and gather (torch and Triton), the Triton grouped GEMM,
and the per-device choice.

Oracle: a per-token float64 loop over each token's kept rows. The Triton kernels run on CPU
tensors under TRITON_INTERPRET=1 (set before triton is first imported here); they are skipped
where triton is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import make_plan
from moekit.ops import (
    combine,
    combine_reference,
    gather,
    gather_rows,
    gathered_grouped_linear,
    grouped_linear,
    inverse_rows,
    triton_available,
)
from strategies import routings


def _loop_combine(rows, slot_weight, token_index, num_tokens):
    """out[n] = sum over the rows m of token n of w[m] * rows[m], one token at a time."""
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64)
    for n in range(num_tokens):
        for m in (token_index == n).nonzero().flatten().tolist():
            out[n] += slot_weight[m].double() * rows[m].double()
    return out


def _plan_and_rows(routing, capacity_factor, width, dtype=torch.float64):
    indices, weights, num_experts = routing
    plan = make_plan(indices, weights, num_experts, capacity_factor)
    rows = torch.randn(plan.token_index.shape[0], width, dtype=dtype)
    return plan, rows, indices.shape


def _grads(fn, rows, slot_weight, upstream):
    rows = rows.detach().requires_grad_()
    slot_weight = slot_weight.detach().requires_grad_()
    out = fn(rows, slot_weight)
    if not out.requires_grad:  # the loop oracle with no rows: a constant
        return out, (None, None)
    grads = torch.autograd.grad((out * upstream).sum(), [rows, slot_weight], allow_unused=True)
    return out, grads


@given(routings(), st.sampled_from([None, 0.5, 1.0, 1.5]), st.integers(1, 9))
def test_combine_matches_the_token_loop_forward_and_backward(routing, capacity_factor, width):
    plan, rows, (n, k) = _plan_and_rows(routing, capacity_factor, width)
    weight = plan.slot_weight.double()
    upstream = torch.randn(n, width, dtype=torch.float64)

    def ours(r, w):
        return combine_reference(r, w, plan.pair_index, n, k)

    def loop(r, w):
        return _loop_combine(r, w, plan.token_index, n)

    got, got_grads = _grads(ours, rows, weight, upstream)
    want, want_grads = _grads(loop, rows, weight, upstream)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:  # nothing kept: no row, no gradient
            assert g is None or g.numel() == 0
        else:
            torch.testing.assert_close(g, w)


@given(routings(), st.sampled_from([None, 0.5, 1.0, 1.5]), st.integers(1, 9))
def test_gather_backward_sums_each_tokens_row_gradients(routing, capacity_factor, width):
    """rows = x[token]: forward an index_select; backward, per token, the sum of its kept rows'
    gradients (through the inverse permutation), equal to autograd's index_add."""
    indices, weights, num_experts = routing
    plan = make_plan(indices, weights, num_experts, capacity_factor)
    n, k = indices.shape
    x = torch.randn(n, width, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(plan.token_index.shape[0], width, dtype=torch.float64)
    rows = gather_rows(x, plan.token_index, plan.pair_index, k)
    torch.testing.assert_close(rows, x.detach()[plan.token_index])
    (grad,) = torch.autograd.grad((rows * upstream).sum(), x)
    want = torch.zeros(n, width, dtype=torch.float64)
    for m, token in enumerate(plan.token_index.tolist()):  # the per-row loop
        want[token] += upstream[m]
    torch.testing.assert_close(grad, want)
    for backend in ("auto", "index_add", "torch"):
        x2 = x.detach().requires_grad_()
        out = gather(x2, plan.token_index, plan.pair_index, k, backend=backend)
        (out * upstream).sum().backward()
        torch.testing.assert_close(x2.grad, want)


@given(routings(), st.sampled_from([None, 0.5, 1.0]))
def test_inverse_rows_inverts_the_plan(routing, capacity_factor):
    plan, _, (n, k) = _plan_and_rows(routing, capacity_factor, 1)
    row_of = inverse_rows(plan.pair_index, n * k)
    kept = row_of < plan.pair_index.shape[0]
    assert int(kept.sum()) == plan.pair_index.shape[0]  # every kept pair has its row, once
    assert torch.equal(plan.pair_index[row_of[kept]], kept.nonzero().flatten())
    assert int((~kept).sum()) == int(plan.num_dropped)


def test_combine_reads_zero_for_dropped_pairs_and_accumulates_in_float32():
    indices = torch.tensor([[0, 1], [0, 1], [0, 1]])
    weights = torch.full((3, 2), 0.5)
    plan = make_plan(indices, weights, 2, capacity_factor=0.3)  # C = 1: one row an expert
    rows = torch.ones(2, 4, dtype=torch.bfloat16)
    out = combine_reference(rows, plan.slot_weight.bfloat16(), plan.pair_index, 3, 2)
    assert out.dtype == torch.bfloat16 and out[0].tolist() == [1.0] * 4  # token 0 kept both
    assert out[1:].abs().sum() == 0  # the others read nothing
    # 256 + 1 + 1: 258 summed in float32 and rounded once; a bf16 running sum stays at 256
    rows3 = torch.tensor([[256.0], [1.0], [1.0]], dtype=torch.bfloat16)
    ones = torch.ones(3, dtype=torch.bfloat16)
    exact = combine_reference(rows3, ones, torch.tensor([0, 1, 2]), 1, 3)
    assert exact.item() == 258.0


def test_combine_backends_agree_and_bad_ones_are_refused():
    indices = torch.rand(9, 5).topk(3, dim=-1).indices
    plan = make_plan(indices, torch.rand(9, 3), 5, capacity_factor=0.8)
    rows = torch.randn(plan.token_index.shape[0], 6, dtype=torch.float64)
    args = (rows, plan.slot_weight.double(), plan.token_index, 9, plan.pair_index, 3)
    want = combine(*args, backend="index_add")
    torch.testing.assert_close(combine(*args, backend="torch"), want)
    torch.testing.assert_close(combine(*args), want)  # auto: index_add on CPU
    with pytest.raises(ValueError, match="backend="):
        combine(*args, backend="cuda")
    with pytest.raises(ValueError, match="pair_index"):
        combine(rows, plan.slot_weight.double(), plan.token_index, 9, backend="torch")


def test_no_triton_on_cpu_tensors_outside_the_interpreter():
    assert not triton_available(torch.device("cpu"))


@pytest.fixture(scope="module")
def triton_interpreted():
    """moekit.ops.triton_combine with its kernels interpreted on CPU tensors: conftest sets
    TRITON_INTERPRET=1 where no CUDA device is seen, before anything imports triton."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 not set (a CUDA machine: tests/test_gpu.py runs them)")
    return importlib.import_module("moekit.ops.triton_combine")


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,width,capacity_factor,dtype",
    [
        (7, 4, 2, 5, None, torch.float32),
        (9, 3, 3, 33, 0.7, torch.float32),
        (5, 8, 1, 16, 1.0, torch.bfloat16),
        (1, 2, 2, 1100, None, torch.float32),  # wider than one block of columns
        (4, 2, 2, 8, 0.25, torch.float32),  # C = 1: most pairs dropped
    ],
)
def test_triton_combine_equals_the_torch_combine(
    triton_interpreted, num_tokens, num_experts, top_k, width, capacity_factor, dtype
):
    gen = torch.Generator().manual_seed(num_tokens * 31 + width)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    indices = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=gen)
    plan = make_plan(indices, weights, num_experts, capacity_factor)
    rows = torch.randn(plan.token_index.shape[0], width, generator=gen).to(dtype)
    weight = plan.slot_weight.to(dtype)
    upstream = torch.randn(num_tokens, width, generator=gen).to(dtype)

    def run(fn):
        return _grads(
            lambda r, w: fn(r, w, plan.pair_index, num_tokens, top_k), rows, weight, upstream
        )

    got, got_grads = run(triton_interpreted.combine_triton)
    want, want_grads = run(combine_reference)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)


def test_triton_combine_with_no_kept_rows(triton_interpreted):
    out = triton_interpreted.combine_triton(
        torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long), 3, 2
    )
    assert out.shape == (3, 4) and out.abs().sum() == 0


def test_compiled_gather_combine_equals_eager():
    """The accelerators' combine traces under torch.compile (the Triton kernels step aside)."""
    torch._dynamo.reset()
    indices = torch.rand(12, 6).topk(2, dim=-1).indices
    plan = make_plan(indices, torch.rand(12, 2), 6, capacity_factor=1.0)
    rows = torch.randn(plan.token_index.shape[0], 8)
    upstream = torch.randn(12, 8)

    def run(fn):
        return _grads(
            lambda r, w: fn(r, w, plan.token_index, 12, plan.pair_index, 2, backend="torch"),
            rows,
            plan.slot_weight,
            upstream,
        )

    got, got_grads = run(torch.compile(combine, fullgraph=True))
    want, want_grads = run(combine)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,width,capacity_factor",
    [(7, 4, 2, 5, None), (9, 3, 3, 1100, 0.7), (4, 2, 2, 8, 0.25)],
)
def test_triton_gather_equals_the_torch_gather(
    triton_interpreted, num_tokens, num_experts, top_k, width, capacity_factor
):
    gen = torch.Generator().manual_seed(num_tokens + width)
    indices = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices
    plan = make_plan(indices, torch.rand(num_tokens, top_k, generator=gen), num_experts,
                     capacity_factor)  # fmt: skip
    upstream = torch.randn(plan.token_index.shape[0], width, generator=gen)
    grads = []
    for backend in ("triton", "torch"):
        x = torch.randn(num_tokens, width, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        rows = gather_rows(x, plan.token_index, plan.pair_index, top_k, backend)
        (rows * upstream).sum().backward()
        grads.append((rows.detach(), x.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def triton_grouped():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 not set (a CUDA machine: tests/test_gpu.py runs them)")
    return importlib.import_module("moekit.ops.triton_grouped")


def _segment_loop(rows, weight, sizes):
    """Each segment through its expert's weight, one matmul a segment (float64)."""
    outs, start = [], 0
    for e, size in enumerate(sizes.tolist()):
        outs.append(rows[start : start + size].double() @ weight[e].double())
        start += size
    return torch.cat(outs) if outs else rows.new_zeros(0, weight.shape[2]).double()


@pytest.mark.parametrize(
    "sizes,d_in,d_out,dtype",
    [
        ([5, 0, 70, 3], 48, 72, torch.float32),  # an empty expert, a segment over a row tile
        ([0, 0, 0], 16, 16, torch.float32),  # no rows
        ([1], 33, 20, torch.float32),  # widths off the tile sizes
        ([64, 64], 64, 130, torch.float32),  # segments on tile boundaries
        ([9, 30, 2, 0, 11], 32, 48, torch.float16),  # CUDA runs bf16 on CUTLASS
    ],
)
def test_triton_grouped_gemm_matches_the_segment_loop(triton_grouped, sizes, d_in, d_out, dtype):
    """rows @ w[e], grad @ w[e]^T (the same kernel through strides) and rows_e^T @ grad_e."""
    gen = torch.Generator().manual_seed(sum(sizes) + d_in)
    sizes = torch.tensor(sizes)
    m, e = int(sizes.sum()), sizes.numel()
    rows = torch.randn(m, d_in, generator=gen).to(dtype)
    weight = torch.randn(e, d_in, d_out, generator=gen).to(dtype)
    grad = torch.randn(m, d_out, generator=gen).to(dtype)
    ends = sizes.cumsum(0)
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-4)
    out = triton_grouped.grouped_mm_rows(rows, weight, ends)
    torch.testing.assert_close(out.double(), _segment_loop(rows, weight, sizes), **tol)
    back = triton_grouped.grouped_mm_rows(grad, weight.transpose(1, 2), ends)
    want = _segment_loop(grad, weight.transpose(1, 2), sizes)
    torch.testing.assert_close(back.double(), want, **tol)
    dw = triton_grouped.grouped_mm_weight_grad(rows, grad, ends, e)
    starts = (ends - sizes).tolist()
    want_dw = torch.stack(
        [rows[s : s + n].double().T @ grad[s : s + n].double() for s, n in
         zip(starts, sizes.tolist(), strict=True)]
    )  # fmt: skip
    torch.testing.assert_close(dw.double(), want_dw, **tol)


@pytest.mark.parametrize("shape,dtype", [((7, 10), torch.float32), ((3, 4, 2100), torch.float32),
                                         ((0, 6), torch.float32), ((5, 64), torch.float16)])  # fmt: skip
def test_triton_swiglu_matches_torch(shape, dtype):
    """silu(gate) * up on [gate | up], forward and backward, against torch in float64."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 not set (a CUDA machine: tests/test_gpu.py runs them)")
    kernels = importlib.import_module("moekit.ops.triton_swiglu")
    gen = torch.Generator().manual_seed(shape[-1])
    h = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    upstream = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(dtype)
    got_h, want_h = h.clone().requires_grad_(), h.double().requires_grad_()
    got = kernels.swiglu_triton(got_h)
    (got * upstream).sum().backward()
    gate, up = want_h.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    (want * upstream.double()).sum().backward()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(got_h.grad.double(), want_h.grad, **tol)


@pytest.mark.parametrize("backend", ["index_add", "torch", "triton"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_gathered_grouped_linear_equals_gather_then_grouped_linear(backend, capacity_factor):
    """The first expert GEMM reading the tokens itself (the gathered rows not kept for the
    backward) = gather, then grouped GEMM: output, and gradients of x and the weight."""
    if backend == "triton" and not (
        importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        pytest.skip("the Triton sum runs on CPU tensors under TRITON_INTERPRET=1 only")
    gen = torch.Generator().manual_seed(3)
    n, e, k, d, h = 40, 6, 2, 16, 24
    indices = torch.rand(n, e, generator=gen).topk(k, dim=-1).indices
    plan = make_plan(indices, torch.rand(n, k, generator=gen), e, capacity_factor)
    offsets = plan.group_sizes.cumsum(0).to(torch.int32)
    weight = torch.randn(e, d, h, generator=gen)
    upstream = torch.randn(plan.token_index.shape[0], h, generator=gen)
    results = []
    for fused in (True, False):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).requires_grad_()
        w = weight.clone().requires_grad_()
        if fused:
            out = gathered_grouped_linear(
                x, w, offsets, plan.token_index, plan.pair_index, k, backend
            )
        else:
            out = grouped_linear(x[plan.token_index], w, offsets)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, w.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_moekit_triton_0_turns_the_triton_kernels_off(monkeypatch):
    from moekit.ops._triton import triton_module

    triton_module.cache_clear()
    monkeypatch.setenv("MOEKIT_TRITON", "0")
    try:
        assert triton_module("triton_combine") is None
        assert not triton_available(torch.device("cuda"))
    finally:
        triton_module.cache_clear()
