"""torch.compile(fullgraph=True) of the MoE layer and the language model equals eager.

Oracle: the same module run eagerly on the same inputs (forward and every gradient); the
segment MLP is a custom op with a fake kernel, so the whole layer is one graph.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.lm import SparseMoELanguageModel
from moekit.lm.model import LMConfig

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _grads(module, x, run):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.is_floating_point())
    out = run(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(upstream.to(out.dtype))
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    return out.detach(), grads, None if x.grad is None else x.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_compiled_moe_layer_equals_eager(dtype, activation):
    torch._dynamo.reset()
    layer = MoE(16, 4, 2, 32, activation).to(dtype)
    x = torch.randn(2, 7, 16, dtype=dtype)
    compiled = torch.compile(layer, fullgraph=True)
    got = _grads(layer, x, lambda t: compiled(t).output)
    want = _grads(layer, x, lambda t: layer(t).output)
    for g, w in zip([got[0], got[2], *got[1]], [want[0], want[2], *want[1]], strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_compiled_grouped_gemm_layer_equals_eager(dtype, capacity_factor):
    """The accelerators' path (`F.grouped_mm` experts, the gather combine) compiles in float32
    too: grouped_mm's own fake kernel takes bf16 only, ours (moekit::grouped_mm) any dtype."""
    from moekit import ExpertBank

    torch._dynamo.reset()
    bank = ExpertBank(4, 16, 32, "swiglu", bias=True, backend="grouped")
    layer = MoE(16, 4, 2, experts=bank, capacity_factor=capacity_factor).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    compiled = torch.compile(layer, fullgraph=capacity_factor is None)
    got = _grads(layer, x, lambda t: compiled(t).output)
    want = _grads(layer, x, lambda t: layer(t).output)
    for g, w in zip([got[0], got[2], *got[1]], [want[0], want[2], *want[1]], strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_grouped_mm_custom_op_registration():
    from moekit.ops.grouped import _grouped_mm

    rows = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(3, 16, 8, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    torch.library.opcheck(_grouped_mm, (rows, weight, offsets))


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_linear_takes_what_grouped_mm_refuses(transposed):
    """float64 and odd widths (and an empty expert) run as one matmul per segment inside the
    custom op: gradcheck, the weight's gradient in its layout, no rows at all."""
    from moekit.ops.grouped import grouped_linear

    rows = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 3, dtype=torch.float64) if transposed else torch.randn(3, 3, 5)
    weight = (weight.transpose(1, 2) if transposed else weight.double()).requires_grad_(True)
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda r, w: grouped_linear(r, w, offsets), (rows, weight))
    grad = torch.autograd.grad(grouped_linear(rows, weight, offsets).sum(), weight)[0]
    assert grad.stride() == weight.stride()
    empty = grouped_linear(rows[:0], weight, torch.zeros(3, dtype=torch.int32))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_language_model_equals_eager(dtype):
    torch._dynamo.reset()
    config = LMConfig(
        vocab_size=30, block_size=8, n_embed=16, n_head=2, n_layer=2, num_experts=4, dropout=0.0
    )
    model = SparseMoELanguageModel.from_config(config).eval()  # eval: no routing noise
    idx, targets = torch.randint(30, (3, 8)), torch.randint(30, (3, 8))
    compiled = torch.compile(model, fullgraph=True)

    def loss(run):
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            return run(idx, targets)[1]

    got = _grads(model, idx, lambda _: loss(compiled))
    want = _grads(model, idx, lambda _: loss(model))
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_compiled_training_step_with_dropout_and_routing_noise():
    """Train mode (dropout, noisy router) compiles as one graph; random draws differ from eager,
    so the check is a finite loss and gradients for every parameter."""
    torch._dynamo.reset()
    model = SparseMoELanguageModel(30, block_size=8, n_embed=16, n_head=2, n_layer=2, num_experts=4)
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(30, (3, 8))
    _, loss = compiled(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
