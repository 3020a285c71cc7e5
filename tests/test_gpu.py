"""CUDA: the layer against the CPU float64 reference, compiled against eager, the Triton combine
against the torch one, decoding. Marked `gpu`; skipped where torch sees no CUDA device.

Run on a GPU machine: `python -m pytest -m gpu` (scripts/gpu_check.sh runs it, then the bench).
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, make_plan
from moekit.lm import SparseMoELanguageModel
from moekit.lm.decode import decoder_for
from moekit.ops import combine, gather, grouped_linear, swiglu, triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROUTERS = ["softmax", "noisy", "switch", "sigmoid", "expert_choice"]
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-3), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _close(got, want, dtype) -> None:
    """float32 elementwise; bf16 by the relative error of the whole tensor (a few elements of
    a bf16 result can sit a rounding step past any elementwise bound)."""
    got, want = got.float().cpu(), want.float().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL[dtype])
        return
    assert got.shape == want.shape and not got.isnan().any()
    error = (got - want).norm() / want.norm().clamp_min(1e-6)
    assert error < 2e-2, f"relative error {error:.2e}"


def _run(layer, x, upstream):
    """(output, grad of x, grads of the parameters) on the CPU in float32. The output is read
    before the backward and must read the same after it (a compiled backward must not reuse
    the buffer of an output the caller holds)."""
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    before = out.output.detach().float().cpu()
    (out.output.float() * upstream.to(out.output.device)).sum().add(out.aux_loss).backward()
    after = out.output.detach().float().cpu()
    torch.testing.assert_close(after, before, rtol=0, atol=0, msg="output changed by backward")
    grads = [p.grad.float().cpu() for p in layer.parameters() if p.grad is not None]
    return before, x.grad.float().cpu(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_on_cuda_matches_cpu_float64(router, dtype, capacity_factor):
    if router == "expert_choice" and capacity_factor is None:
        capacity_factor = 1.0
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    layer = MoE(64, 8, top_k, 96, "swiglu", router=router, capacity_factor=capacity_factor)
    layer.to(dtype).eval()  # eval: no routing noise, both devices route the same
    reference = MoE(64, 8, top_k, 96, "swiglu", router=router, capacity_factor=capacity_factor)
    reference.double().eval()
    reference.load_state_dict(layer.state_dict())  # the same (bf16-rounded) weights
    x = torch.randn(300, 64).to(dtype)  # the same (rounded) input: the routers see equal logits
    upstream = torch.randn(300, 64)
    got = _run(layer.to("cuda"), x.to("cuda"), upstream)
    want = _run(reference, x.double(), upstream.double())
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True):
        _close(g, w, dtype)


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
        _close(g, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_triton_combine_on_cuda_equals_torch(dtype, capacity_factor):
    """Every backend against the combine in float64 (index_add in bf16 rounds at each add)."""
    assert triton_available(torch.device("cuda")), "install triton on the GPU machine"
    gen = torch.Generator().manual_seed(0)
    n, e, k, d = 1000, 16, 4, 520
    indices = torch.rand(n, e, generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(n, k, generator=gen)
    plan = make_plan(indices.cuda(), weights.cuda(), e, capacity_factor)
    rows = torch.randn(plan.token_index.shape[0], d, device="cuda", dtype=dtype)
    upstream = torch.randn(n, d, device="cuda", dtype=dtype)
    results = []
    for backend, wide in (("torch", torch.float64), ("triton", dtype), ("torch", dtype),
                          ("index_add", dtype)):  # fmt: skip
        r = rows.to(wide).clone().requires_grad_()  # a leaf of its own each time
        w = plan.slot_weight.to(dtype).to(wide).clone().requires_grad_()
        out = combine(r, w, plan.token_index, n, plan.pair_index, k, backend=backend)
        (out * upstream.to(wide)).sum().backward()
        results.append((out, r.grad, w.grad))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            _close(got, want, dtype)
    x = rows[:n].clone().requires_grad_()  # the gather x[token] and its backward
    grads = []
    for backend in ("triton", "torch", "index_add"):
        x.grad = None
        out = gather(x, plan.token_index, plan.pair_index, k, backend=backend)
        (out * rows).sum().backward()
        grads.append(x.grad.clone())
    for got in grads[1:]:
        _close(got, grads[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_grouped_gemm_on_cuda(dtype):
    """The sync-free grouped GEMM (every non-bf16 dtype on CUDA) against a float64 loop,
    forward and backward, through `grouped_linear`; and it captures in a CUDA graph."""
    torch.manual_seed(0)
    sizes = torch.tensor([70, 0, 130, 1, 64])
    ends = sizes.cumsum(0).cuda()
    rows = torch.randn(int(sizes.sum()), 96, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 96, 80, device="cuda", dtype=dtype, requires_grad=True)
    upstream = torch.randn(rows.shape[0], 80, device="cuda", dtype=dtype)
    out = grouped_linear(rows, weight, ends.to(torch.int32))
    (out * upstream).sum().backward()
    r64, w64 = rows.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = torch.cat([r64[s - n : s] @ w64[e] for e, (n, s) in
                      enumerate(zip(sizes.tolist(), ends.tolist(), strict=True))])  # fmt: skip
    (want * upstream.double()).sum().backward()
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for got, ref in ((out, want), (rows.grad, r64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(got.double().cpu(), ref.detach().cpu(), **tol)
    with torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        grouped_linear(rows, weight, ends.to(torch.int32))  # warm-up: the kernels compile
        with torch.cuda.graph(graph):
            captured = grouped_linear(rows, weight, ends.to(torch.int32))
        graph.replay()
        torch.testing.assert_close(captured, out.detach())


def test_language_model_decodes_on_cuda_as_on_cpu():
    torch.manual_seed(0)
    model = SparseMoELanguageModel(65, block_size=16, n_embed=64, n_head=4, n_layer=2).eval()
    idx = torch.randint(0, 65, (2, 16))
    want = model(idx)[0][:, -1]
    got = model.cuda()._logits(idx.cuda(), None).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    out = model.generate(idx[:, :1].cuda(), 40, generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (2, 41) and out.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_swiglu_on_cuda(dtype):
    torch.manual_seed(0)
    h = (3 * torch.randn(300, 2 * 96, device="cuda")).to(dtype).requires_grad_()
    upstream = torch.randn(300, 96, device="cuda", dtype=dtype)
    got = swiglu(h)
    (got * upstream).sum().backward()
    want_h = h.detach().double().requires_grad_()
    gate, up = want_h.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    (want * upstream.double()).sum().backward()
    _close(got, want.detach(), dtype)
    _close(h.grad, want_h.grad, dtype)


def test_generation_replays_cuda_graphs(caplog):
    """Both decode steps (cache step, window re-encode) capture: no eager fallback, and the
    decoder with its graphs is kept for the next call."""
    torch.manual_seed(0)
    model = SparseMoELanguageModel(65, block_size=16, n_embed=64, n_head=4, n_layer=2).cuda()
    start = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with caplog.at_level("WARNING"):
        out = model.generate(start, 40)
    assert "eagerly" not in caplog.text
    decoder = decoder_for(model, 1, True, True)
    assert set(decoder._graphs) == {"step", "window"}
    assert all(v is not None for v in decoder._graphs.values())
    again = model.generate(start, 40, generator=torch.Generator("cuda").manual_seed(0))
    assert again.shape == out.shape == (1, 41)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_hf_patched_model_on_cuda(family, dtype):
    """transformers' models patched onto the engine on CUDA (the grouped paths read the
    transposed expert tensors in place) against the unpatched model on the same device."""
    pytest.importorskip("transformers")
    import copy

    from moekit.hf import patch_model
    from test_hf import _model

    model = _model(family).to("cuda", dtype).train()
    patched = copy.deepcopy(model)
    assert patch_model(patched) > 0
    ids = torch.randint(0, 64, (4, 16), device="cuda")
    outs = []
    for m in (model, patched):
        out = m(ids, labels=ids)
        out.loss.backward()
        grad = next(p for n, p in m.named_parameters() if n.endswith("experts.gate_up_proj")).grad
        outs.append((out.logits, grad))
    for got, want in zip(outs[1], outs[0], strict=True):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finetune_trains_on_the_gpu_in_one_process(tmp_path, dtype):
    """`moekit finetune --device cuda` (and `auto`) in one process, no torchrun: chat records,
    packed, LoRA on the experts; the model and the batches live on the GPU; the loss falls."""
    pytest.importorskip("transformers")
    from chat_fixtures import save_chat_model
    from moekit.hf.finetune import FinetuneJob
    from moekit.train.finetune_config import FinetuneConfig
    from moekit.train.loop import Loop

    model, data = save_chat_model(tmp_path)
    cfg = FinetuneConfig(
        model=str(model),
        data=str(data),
        out=str(tmp_path / "run"),
        steps=6,
        seq_len=128,
        batch_size=4,
        lr=1e-2,
        lora_rank=4,
        dtype=dtype,
        device="cuda",
        track=False,
        progress=False,
        eval_interval=6,
    )
    job = FinetuneJob(cfg)
    assert job.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in job.model.parameters())
    result = Loop(job).run()
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantised_experts_dequantise_on_cuda_as_on_cpu(scheme):
    """The Triton dequantising kernels on CUDA: quant_grouped_linear equals the CPU's."""
    from moekit.quant import QuantizedExperts, quant_grouped_linear

    generator = torch.Generator().manual_seed(0)
    q = QuantizedExperts.quantize(torch.randn(4, 64, 96, generator=generator), scheme)
    rows = torch.randn(20, 64, generator=generator)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)
    want = quant_grouped_linear(rows, q, offsets)
    got = quant_grouped_linear(rows.cuda(), q.to("cuda"), offsets.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_mxfp4_experts_dequantise_on_cuda_as_on_cpu():
    """gpt-oss's MXFP4 experts as stored: the Triton kernel on CUDA equals the CPU's torch."""
    from moekit.quant import QuantizedExperts, quant_grouped_linear

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 96, 32), generator=generator).to(torch.uint8)
    scales = torch.randint(110, 130, (4, 96, 2), generator=generator).to(torch.uint8)
    q = QuantizedExperts("mxfp4", blocks, scales, (4, 64, 96), torch.float32)
    rows = torch.randn(20, 64, generator=generator)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)
    want = quant_grouped_linear(rows, q, offsets)
    got = quant_grouped_linear(rows.cuda(), q.to("cuda"), offsets.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
