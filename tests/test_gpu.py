"""CUDA: the layer against the CPU float64 reference, compiled against eager, the Triton combine
against the torch one, decoding. Marked `gpu`; skipped where torch sees no CUDA device.

Run on a GPU machine: `python -m pytest -m gpu` (scripts/gpu_check.sh runs it, then the bench).
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, make_plan
from moekit.lm import SparseMoELanguageModel
from moekit.ops import combine, triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROUTERS = ["softmax", "noisy", "switch", "sigmoid", "expert_choice"]
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-3), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _run(layer, x, upstream):
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out.output.float() * upstream.to(out.output.device)).sum().add(out.aux_loss).backward()
    grads = [p.grad.float().cpu() for p in layer.parameters() if p.grad is not None]
    return out.output.float().cpu(), x.grad.float().cpu(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_on_cuda_matches_cpu_float64(router, dtype, capacity_factor):
    if router == "expert_choice" and capacity_factor is None:
        capacity_factor = 1.0
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    layer = MoE(64, 8, top_k, 96, "swiglu", router=router, capacity_factor=capacity_factor)
    layer.eval()  # no routing noise: both devices route the same
    reference = MoE(64, 8, top_k, 96, "swiglu", router=router, capacity_factor=capacity_factor)
    reference.load_state_dict(layer.state_dict())
    reference.double().eval()
    x = torch.randn(300, 64)
    upstream = torch.randn(300, 64)
    got = _run(layer.to("cuda", dtype), x.to("cuda", dtype), upstream)
    want = _run(reference, x.double(), upstream.double())
    torch.testing.assert_close(got[0], want[0].float(), **TOL[dtype])
    torch.testing.assert_close(got[1], want[1].float(), **TOL[dtype])
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_on_cuda_equals_eager(dtype):
    """float32 compiles too: grouped_mm runs through moekit's custom op under compile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(64, 8, 2, 128, "swiglu").to("cuda", dtype)
    x = torch.randn(4, 50, 64, device="cuda", dtype=dtype)
    upstream = torch.randn(4, 50, 64)
    compiled = torch.compile(layer, fullgraph=True)
    got = _run(compiled, x, upstream)
    want = _run(layer, x, upstream)
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_triton_combine_on_cuda_equals_torch(dtype, capacity_factor):
    assert triton_available(torch.device("cuda")), "install triton on the GPU machine"
    gen = torch.Generator().manual_seed(0)
    n, e, k, d = 1000, 16, 4, 520
    indices = torch.rand(n, e, generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(n, k, generator=gen)
    plan = make_plan(indices.cuda(), weights.cuda(), e, capacity_factor)
    rows = torch.randn(plan.token_index.shape[0], d, device="cuda", dtype=dtype)
    upstream = torch.randn(n, d, device="cuda", dtype=dtype)
    results = []
    for backend in ("triton", "torch", "index_add"):
        r = rows.clone().requires_grad_()
        w = plan.slot_weight.to(dtype).clone().requires_grad_()
        out = combine(r, w, plan.token_index, n, plan.pair_index, k, backend=backend)
        (out * upstream).sum().backward()
        results.append((out.float(), r.grad.float(), w.grad.float()))
    for other in results[1:]:
        for got, want in zip(results[0], other, strict=True):
            torch.testing.assert_close(got, want, **TOL[dtype])


def test_language_model_decodes_on_cuda_as_on_cpu():
    torch.manual_seed(0)
    model = SparseMoELanguageModel(65, block_size=16, n_embed=64, n_head=4, n_layer=2).eval()
    idx = torch.randint(0, 65, (2, 16))
    want = model(idx)[0][:, -1]
    got = model.cuda()._logits(idx.cuda(), None).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    out = model.generate(idx[:, :1].cuda(), 40, generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (2, 41) and out.device.type == "cuda"
