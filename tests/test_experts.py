"""Expert banks: cross-implementation parity.

Oracles: the loop over segments (for grouped GEMM), `to_modules()` copies (for the stacked bank),
a dense MLP (for E = 1), and the dropless plan (for a capacity too large to drop anything).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import ExpertBank, ExpertList, MLPExpert, MoE, SoftmaxRouter, make_plan
from moekit.ops.grouped import _ContiguousGrad, grouped_mm_supported

SIZES = [torch.tensor(s) for s in ([3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2], [0, 0, 0, 0])]


def _grads(bank: ExpertBank, rows: torch.Tensor, sizes: torch.Tensor, upstream=None):
    rows = rows.detach().requires_grad_(True)
    out = bank(rows, sizes)
    if upstream is None:
        out.sum().backward()  # the expanded zero-stride gradient of seed 000's check
    else:
        out.backward(upstream)
    return out.detach(), [rows.grad] + [p.grad for p in bank.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("expanded_grad", [False, True])
@pytest.mark.parametrize("backend", ["grouped", "padded"])
def test_backends_match_loop(dtype, activation, sizes, expanded_grad, backend):
    """grouped_mm and the padded batched layout against one GEMM per segment."""
    torch.manual_seed(0)
    loop = ExpertBank(4, 16, 32, activation, bias=True, backend="loop").to(dtype)
    grouped = ExpertBank(4, 16, 32, activation, bias=True, backend=backend).to(dtype)
    grouped.load_state_dict(loop.state_dict())
    rows = torch.randn(int(sizes.sum()), 16, dtype=dtype)
    if backend == "grouped":
        assert grouped_mm_supported(rows, grouped.w1) == (rows.shape[0] > 0)
    upstream = None if expanded_grad else torch.randn(rows.shape[0], 16, dtype=dtype)
    out_l, grads_l = _grads(loop, rows, sizes, upstream)
    out_g, grads_g = _grads(grouped, rows, sizes, upstream)
    # bf16: the two paths round their float32 accumulators at different points
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out_g, out_l, **tol)
    for g, want in zip(grads_g, grads_l, strict=True):
        torch.testing.assert_close(g, want, **tol)


@pytest.mark.parametrize("backend", ["loop", "grouped", "padded"])
def test_idle_experts_get_zero_gradients(backend):
    bank = ExpertBank(4, 16, 32, "gelu", bias=True, backend=backend)
    sizes = torch.tensor([0, 5, 0, 0])  # experts 0, 2, 3 idle
    bank(torch.randn(5, 16), sizes).sum().backward()
    for p in bank.parameters():
        assert p.grad is not None
        assert torch.all(p.grad[[0, 2, 3]] == 0)
        assert p.grad[1].abs().sum() > 0


def test_expert_list_calls_every_expert_once():
    calls = []

    class Recorder(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i, self.lin = i, nn.Linear(3, 3)

        def forward(self, x):
            calls.append((self.i, x.shape[0]))
            return self.lin(x)

    experts = ExpertList(Recorder(i) for i in range(3))
    experts(torch.randn(4, 3), torch.tensor([1, 0, 3])).sum().backward()
    assert calls == [(0, 1), (1, 0), (2, 3)]
    assert torch.all(experts[1].lin.weight.grad == 0)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_module_list_equals_stacked_bank(activation, bias):
    stacked = MoE(17, 5, 2, d_hidden=9, activation=activation, bias=bias).double()
    listed = MoE(17, 5, 2, experts=stacked.experts.to_modules()).double()
    listed.router.load_state_dict(stacked.router.state_dict())
    x = torch.randn(33, 17, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(33, 17, dtype=torch.float64)
    out_s, _ = stacked(x)
    gx_s, gw_s = torch.autograd.grad(out_s, [x, stacked.experts.w1], upstream)
    out_l, _ = listed(x)
    gx_l, *gw_l = torch.autograd.grad(out_l, [x, *[e.fc1.weight for e in listed.experts]], upstream)
    torch.testing.assert_close(out_l, out_s)
    torch.testing.assert_close(gx_l, gx_s)
    torch.testing.assert_close(torch.stack([g.t() for g in gw_l]), gw_s)


def test_one_expert_top1_equals_dense_mlp():
    layer = MoE(17, 1, 1, d_hidden=11, activation="relu", bias=True).double()
    dense = nn.Sequential(nn.Linear(17, 11), nn.ReLU(), nn.Linear(11, 17)).double()
    with torch.no_grad():
        dense[0].weight.copy_(layer.experts.w1[0].t())
        dense[0].bias.copy_(layer.experts.b1[0])
        dense[2].weight.copy_(layer.experts.w2[0].t())
        dense[2].bias.copy_(layer.experts.b2[0])
    x = torch.randn(2, 7, 17, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x)
    want = dense(x)
    torch.testing.assert_close(out, want)
    upstream = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, upstream)[0], torch.autograd.grad(want, x, upstream)[0]
    )


@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid"])
def test_large_capacity_equals_dropless(router):
    dropless = MoE(8, 6, 3, d_hidden=12, router=router).eval()
    capped = MoE(8, 6, 3, d_hidden=12, router=router, capacity_factor=2.0).eval()  # C = N
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(40, 8)
    out_d, _ = dropless(x)
    out_c, _ = capped(x)
    torch.testing.assert_close(out_c, out_d, rtol=0, atol=0)
    assert float(capped.stats.dropped_fraction) == 0.0


def test_kaiming_init_std():
    bank = ExpertBank(8, 256, 512, "relu", init="kaiming")
    assert abs(bank.w1.std().item() - (2 / 256) ** 0.5) < 0.02 * (2 / 256) ** 0.5
    assert abs(bank.w2.std().item() - (2 / 512) ** 0.5) < 0.02 * (2 / 512) ** 0.5
    default = ExpertBank(8, 256, 512, "relu")
    assert default.w1.abs().max() <= 256**-0.5


def test_bank_under_autocast_computes_in_bf16():
    bank = ExpertBank(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bank(torch.randn(5, 16), torch.tensor([2, 3]))
    assert out.dtype == torch.bfloat16


def test_contiguous_grad_gradcheck():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ContiguousGrad.apply, (x,))


def test_mlp_expert_weight_is_first_layer():
    expert = MLPExpert(4, 8, "relu")
    assert expert.weight is expert.fc1.weight
    expert(torch.randn(0, 4)).sum().backward()
    assert torch.all(expert.weight.grad == 0)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("capacity", [0, 5])
def test_segment_mlp_custom_op_registration(activation, bias, capacity):
    """opcheck: the fake kernel's shapes, the schema and the registered autograd are consistent."""
    from moekit.ops.segment_mlp import _segment_mlp_op

    width = 12 if activation == "swiglu" else 6
    rows = torch.randn(7, 4, requires_grad=True)
    w1 = torch.randn(3, 4, width, requires_grad=True)
    w2 = torch.randn(3, 6, 4, requires_grad=True)
    b1 = torch.randn(3, width, requires_grad=True) if bias else None
    b2 = torch.randn(3, 4, requires_grad=True) if bias else None
    sizes = torch.tensor([2, 0, 5])
    torch.library.opcheck(_segment_mlp_op, (rows, w1, b1, w2, b2, sizes, activation, capacity))


def test_auto_layout_pads_only_small_balanced_segments_where_it_helps():
    from moekit.ops.segment_mlp import padded_capacity

    balanced = torch.tensor([120, 130, 128, 134])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert padded_capacity(balanced, torch.bfloat16) == 134
        assert padded_capacity(balanced, torch.float32) == 0  # one thread: segments as fast
        torch.set_num_threads(2)
        assert padded_capacity(balanced, torch.float32) == 134
    finally:
        torch.set_num_threads(threads)
    assert padded_capacity(torch.tensor([500, 0, 0, 12]), torch.bfloat16) == 0  # skewed
    assert padded_capacity(balanced * 4, torch.bfloat16) == 0  # large segments
    assert padded_capacity(balanced, torch.bfloat16, "segments") == 0
    assert padded_capacity(torch.tensor([0, 0]), torch.float32, "padded") == 1


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_fused_dispatch_equals_permute_experts_unpermute(
    activation, bias, dropout, capacity_factor
):
    """The fused CPU op against the three unfused steps: output and every gradient (input,
    router gate, expert weights, biases), same dropout draws."""
    torch.manual_seed(0)
    kw = dict(activation=activation, bias=bias, dropout=dropout)
    fused = MoE(16, 4, 2, 24, capacity_factor=capacity_factor, **kw)
    unfused = MoE(16, 4, 2, 24, capacity_factor=capacity_factor, **kw)
    unfused.experts = ExpertBank(4, 16, 24, backend="grouped", **kw)
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(3, 11, 16)
    upstream = torch.randn(3, 11, 16)
    results = []
    for layer in (fused, unfused):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        out = layer(xi).output
        torch.autograd.backward([out, layer.aux_loss], [upstream, torch.ones(())])
        results.append([out, xi.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("capacity", [0, 5])
def test_fused_moe_custom_op_registration(activation, bias, dropout, capacity):
    from moekit.ops.fused_cpu import _fused_op

    width = 12 if activation == "swiglu" else 6
    x = torch.randn(5, 4, requires_grad=True)
    token_index = torch.tensor([0, 3, 4, 1, 2, 3, 0])
    weight = torch.rand(7, requires_grad=True)
    sizes = torch.tensor([2, 0, 5])
    w1 = torch.randn(3, 4, width, requires_grad=True)
    w2 = torch.randn(3, 6, 4, requires_grad=True)
    b1 = torch.randn(3, width, requires_grad=True) if bias else None
    b2 = torch.randn(3, 4, requires_grad=True) if bias else None
    keep = torch.rand(7, 4) > 0.3 if dropout else None
    scale = 1 / 0.7 if dropout else 1.0
    args = (x, token_index, weight, sizes, w1, b1, w2, b2, keep, scale, activation, capacity)
    torch.library.opcheck(_fused_op, args)


@pytest.mark.parametrize("backend", ["auto", "grouped", "loop", "padded"])
def test_experts_stored_transposed_get_gradients_in_their_layout(backend):
    """transformers keeps experts as gate_up_proj [E, 2h, d] and down_proj [E, d, h]; the
    engine reads them as transposed views (moekit.hf.experts.bank_weights) and must hand back
    gradients that land in those tensors without a layout copy, equal to a bank's."""
    from moekit.experts import bank_dispatch
    from moekit.hf.experts import Layout, bank_weights

    torch.manual_seed(0)
    bank = ExpertBank(6, 16, 12, "swiglu", backend=backend)
    source = torch.nn.Module()
    source.gate_up_proj = torch.nn.Parameter(bank.w1.detach().transpose(1, 2).contiguous())
    source.down_proj = torch.nn.Parameter(bank.w2.detach().transpose(1, 2).contiguous())
    view = bank_weights(source, Layout())
    x = torch.randn(40, 16)
    routing = SoftmaxRouter(16, 6, 2)(x)
    plan = make_plan(routing.indices, routing.weights.detach(), 6)
    upstream = torch.randn(40, 16)
    want = torch.autograd.grad((bank.dispatch(x, plan) * upstream).sum(), [bank.w1, bank.w2])
    leaves = [source.gate_up_proj, source.down_proj]
    out = bank_dispatch(view, x, plan, "swiglu", backend)
    got = torch.autograd.grad((out * upstream).sum(), leaves)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous()  # the transposed layout all the way: no copy to accumulate
        torch.testing.assert_close(g.transpose(1, 2), w)


@pytest.mark.parametrize("backend", ["auto", "grouped", "loop", "padded"])
@pytest.mark.parametrize("transposed", [False, True])
def test_frozen_experts_get_no_weight_gradients_and_the_same_input_gradients(backend, transposed):
    """Frozen expert weights (LoRA fine-tuning trains other tensors): the backward skips their
    weight-gradient GEMMs (fused CPU op and grouped GEMMs) and gives the same gradients to the
    tokens and the routing weights as with trainable experts."""
    from moekit.experts import bank_dispatch
    from moekit.hf.experts import Layout, bank_weights

    torch.manual_seed(0)
    bank = ExpertBank(6, 16, 12, "swiglu", backend=backend)
    x = torch.randn(40, 16)
    routing = SoftmaxRouter(16, 6, 2)(x)
    upstream = torch.randn(40, 16)
    source = torch.nn.Module()
    source.gate_up_proj = torch.nn.Parameter(bank.w1.detach().transpose(1, 2).contiguous())
    source.down_proj = torch.nn.Parameter(bank.w2.detach().transpose(1, 2).contiguous())
    tensors = bank_weights(source, Layout()) if transposed else bank.weights
    grads = []
    for frozen in (False, True):
        for p in (*bank.parameters(), *source.parameters()):
            p.requires_grad_(not frozen)
            p.grad = None
        xi = x.clone().requires_grad_(True)
        weights = routing.weights.detach().clone().requires_grad_(True)
        plan = make_plan(routing.indices, weights, 6)
        (bank_dispatch(tensors, xi, plan, "swiglu", backend) * upstream).sum().backward()
        grads.append((xi.grad, weights.grad))
        if frozen:
            assert all(p.grad is None for p in (*bank.parameters(), *source.parameters()))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
