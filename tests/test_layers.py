"""The MoE layer against the float64 per-token oracle (tests/reference.py).

Output and every gradient (input, router gate, expert weights and biases) under one shared
random upstream gradient, with the scaled auxiliary losses in the same backward, on odd shapes:
N in {1, 7, 33}, d in {3, 17}, E in {1, 3, 8}, k in 1..E. The layer runs in float64, so the
comparison uses float64 tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from conftest import bank_params, check_parity, gate_params, leaf64
from moekit import MoE

GRID = [
    (n, d, e, k) for n in (1, 7, 33) for d in (3, 17) for e in (1, 3, 8) for k in range(1, e + 1)
]
LB, Z = 0.01, 1e-3


def _params(layer: MoE) -> list[torch.Tensor]:
    gate, bank = layer.router.gate, layer.experts
    return [
        p for p in (gate.weight, gate.bias, bank.w1, bank.w2, bank.b1, bank.b2) if p is not None
    ]


def _oracle(
    layer: MoE, x64: torch.Tensor, rule: str, capacity_factor=None, expert_bias=None, **choice
):
    """(out, aux, [x, gate and expert params]) of the reference, float64 leaves."""
    gate, experts = gate_params(layer.router.gate), bank_params(layer.experts)
    out, probs, _, choices = ref.token_choice_moe(
        x64, gate, experts, rule, layer.top_k, capacity_factor, expert_bias, **choice
    )
    logits = torch.stack([gate.logits(x64[n]) for n in range(x64.shape[0])])
    aux = LB * ref.load_balancing_loss(probs, choices, layer.num_experts)
    aux = aux + Z * torch.logsumexp(logits, -1).square().mean()
    leaves = [gate.weight, gate.bias, experts.w1, experts.w2, experts.b1, experts.b2]
    return out, aux, [t for t in leaves if t is not None]


def _check_parity(layer: MoE, x: torch.Tensor, oracle) -> None:
    check_parity(layer, x, _params(layer), oracle)


def _layer(d, e, k, **kw) -> MoE:
    kw.setdefault("load_balance_coef", LB)
    kw.setdefault("z_loss_coef", Z)
    return MoE(d, e, k, d_hidden=5, **kw).double()


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("n,d,e,k", GRID)
def test_moe_softmax_matches_oracle(n, d, e, k, activation):
    layer = _layer(d, e, k, activation=activation, bias=activation == "gelu")
    _check_parity(
        layer, torch.randn(n, d, dtype=torch.float64), lambda x: _oracle(layer, x, "softmax")
    )


@pytest.mark.parametrize("n,d,e,k", GRID)
def test_moe_unnormalised_softmax_matches_oracle(n, d, e, k):
    from moekit import SoftmaxRouter

    router = SoftmaxRouter(d, e, k, normalize=False, bias=True)
    layer = _layer(d, e, k, router=router, activation="relu")
    _check_parity(
        layer, torch.randn(n, d, dtype=torch.float64), lambda x: _oracle(layer, x, "softmax_full")
    )


@pytest.mark.parametrize("n,d,e", sorted({(n, d, e) for n, d, e, _ in GRID}))
def test_moe_switch_matches_oracle(n, d, e):
    layer = _layer(d, e, 1, router="switch", activation="relu", bias=True)
    _check_parity(
        layer, torch.randn(n, d, dtype=torch.float64), lambda x: _oracle(layer, x, "softmax_full")
    )


@pytest.mark.parametrize("n,d,e,k", GRID)
def test_moe_noisy_router_in_eval_matches_oracle(n, d, e, k):
    layer = _layer(d, e, k, router="noisy").eval()
    _check_parity(
        layer, torch.randn(n, d, dtype=torch.float64), lambda x: _oracle(layer, x, "softmax")
    )


@pytest.mark.parametrize("n,d,e,k", GRID)
def test_moe_sigmoid_router_matches_oracle(n, d, e, k):
    layer = _layer(d, e, k, router="sigmoid", activation="swiglu")
    layer.router.expert_bias.copy_(torch.randn(e) * 0.3)  # steers the choice, not the weights
    bias = layer.router.expert_bias.clone()
    x = torch.randn(n, d, dtype=torch.float64)
    _check_parity(layer, x, lambda x64: _oracle(layer, x64, "sigmoid", expert_bias=bias))


@pytest.mark.parametrize("capacity_factor", [0.3, 0.75, 1.25])
@pytest.mark.parametrize("n,d,e,k", GRID)
def test_moe_capacity_matches_oracle(n, d, e, k, capacity_factor):
    layer = _layer(d, e, k, capacity_factor=capacity_factor, activation="gelu")
    x = torch.randn(n, d, dtype=torch.float64)
    _check_parity(layer, x, lambda x64: _oracle(layer, x64, "softmax", capacity_factor))
    capacity = math.ceil(capacity_factor * n * k / e)
    assert int(layer.stats.tokens_per_expert.max()) <= capacity


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n,d,e,k", GRID)
def test_moe_expert_choice_matches_oracle(n, d, e, k, capacity_factor):
    layer = _layer(d, e, k, router="expert_choice", capacity_factor=capacity_factor)
    capacity = min(n, math.ceil(capacity_factor * n * k / e))

    def oracle(x64):
        gate, experts = gate_params(layer.router.gate), bank_params(layer.experts)
        out = ref.expert_choice_moe(x64, gate, experts, capacity)
        logits = torch.stack([gate.logits(x64[t]) for t in range(n)])
        aux = Z * torch.logsumexp(logits, -1).square().mean()  # no balancing loss: balanced
        leaves = [gate.weight, experts.w1, experts.w2]
        return out, aux, leaves

    _check_parity(layer, torch.randn(n, d, dtype=torch.float64), oracle)
    assert layer.stats.tokens_per_expert.tolist() == [capacity] * e


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 1, 2, 7), (7,)])
def test_moe_any_leading_shape(shape):
    layer = MoE(7, 4, 2, d_hidden=6)
    x = torch.randn(*shape)
    out, _ = layer(x)
    flat, _ = layer(x.reshape(-1, 7))
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, 7), flat)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("n,e,k", [(1, 1, 1), (33, 8, 2), (33, 3, 3)])
def test_moe_grouped_gemm_float32_matches_oracle(n, e, k, activation):
    from moekit import ExpertBank

    bank = ExpertBank(e, 16, 32, activation, bias=True, backend="grouped")
    layer = MoE(16, e, k, experts=bank, load_balance_coef=LB, z_loss_coef=Z)
    _check_parity(layer, torch.randn(n, 16), lambda x: _oracle(layer, x, "softmax"))


SMALL = [(1, 3, 1, 1), (1, 17, 8, 2), (2, 17, 8, 4), (1, 3, 3, 3), (4, 5, 8, 2)]


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("n,d,e,k", SMALL)
def test_moe_small_batch_inference_path_matches_oracle(n, d, e, k, activation, monkeypatch):
    """In eval mode with N*k <= E the layer gathers the chosen experts' weights (no plan)."""
    layer = _layer(d, e, k, activation=activation, bias=activation != "relu").eval()
    monkeypatch.setattr(layer, "plan", lambda *a: pytest.fail("the small path makes no plan"))
    _check_parity(
        layer, torch.randn(n, d, dtype=torch.float64), lambda x: _oracle(layer, x, "softmax")
    )
    assert int(layer.stats.tokens_per_expert.sum()) == n * k
    empty = layer(torch.randn(0, d, dtype=torch.float64)).output
    assert empty.shape == (0, d)


@pytest.mark.parametrize("router", ["noisy", "sigmoid", "switch"])
def test_moe_small_batch_path_equals_the_dispatch_path(router):
    layer = MoE(16, 8, 1 if router == "switch" else 2, 24, "swiglu", router=router).eval()
    x = torch.randn(3, 16)
    small = layer(x)
    plan_path = layer.experts.dispatch(x, layer.plan(layer.router.route(x), 3))
    torch.testing.assert_close(small.output, plan_path, atol=1e-5, rtol=1e-5)
    skipped = layer(x, aux_losses=False)
    assert skipped.aux_loss.item() == 0 and layer.aux_losses == {}
    torch.testing.assert_close(skipped.output, small.output)


# --- what the Hugging Face families need (issue 11): groups, scaling, norm_topk_prob, shared ---

GROUPED = [
    (n, e, g, kept, k)
    for n in (1, 7, 33)
    for e, g in ((4, 2), (8, 4), (8, 8), (6, 3))
    for kept in range(1, g + 1)
    for k in sorted({1, 2, kept * (e // g)})
    if k <= kept * (e // g)
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,e,g,kept,k", GROUPED)
def test_moe_group_limited_sigmoid_matches_oracle(n, e, g, kept, k, normalize):
    """DeepSeek-V3's routing: sigmoid scores + correction bias, top-k within the best groups,
    weights optionally renormalised, times the routed scaling factor."""
    layer = _layer(
        5,
        e,
        k,
        router="sigmoid",
        activation="swiglu",
        num_groups=g,
        top_k_groups=kept,
        normalize=normalize,
        scaling_factor=2.5,
    )
    layer.router.expert_bias.copy_(torch.randn(e) * 0.3)
    bias = layer.router.expert_bias.clone()
    options = {"groups": (g, kept), "normalize": normalize, "scale": 2.5}
    x = torch.randn(n, 5, dtype=torch.float64)
    _check_parity(layer, x, lambda x64: _oracle(layer, x64, "sigmoid", None, bias, **options))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("router,rule", [("softmax", "softmax"), ("sigmoid", "sigmoid")])
@pytest.mark.parametrize("n,d,e,k", [(1, 3, 1, 1), (7, 17, 3, 2), (33, 3, 8, 3)])
def test_moe_shared_experts_match_oracle(n, d, e, k, router, rule, gated):
    """Always-on experts (DeepSeek's n_shared_experts=2; Qwen2-MoE's sigmoid-gated one) add to
    the routed output of every token; their weights get gradients like the routed ones."""
    layer = _layer(
        d, e, k, router=router, activation="swiglu", num_shared_experts=2, shared_gate=gated
    )
    shared = layer.shared_experts
    extra = [shared.mlp.fc1.weight, shared.mlp.fc2.weight] + ([shared.gate.weight] if gated else [])

    def oracle(x64):
        out, aux, leaves = _oracle(layer, x64, rule)
        fc1, fc2 = (leaf64(w) for w in (shared.mlp.fc1.weight, shared.mlp.fc2.weight))
        gate = leaf64(shared.gate.weight) if gated else None
        rows = [ref.dense_mlp(x64[t], fc1, fc2, "swiglu", gate) for t in range(n)]
        return out + torch.stack(rows), aux, leaves + [fc1, fc2] + ([gate] if gated else [])

    x = torch.randn(n, d, dtype=torch.float64)
    check_parity(layer, x, _params(layer) + extra, oracle)
    assert shared.mlp.fc1.weight.shape == (2 * 2 * 5, d)  # 2 experts of h=5, gate | up


def test_moe_routing_options_are_checked():
    with pytest.raises(ValueError, match="num_groups=3 must divide num_experts=8"):
        MoE(4, 8, 2, router="sigmoid", num_groups=3)
    with pytest.raises(ValueError, match="top_k_groups=5 must be <= num_groups=4"):
        MoE(4, 8, 2, router="sigmoid", num_groups=4, top_k_groups=5)
    with pytest.raises(ValueError, match="top_k=5 must be <= top_k_groups"):
        MoE(4, 8, 5, router="sigmoid", num_groups=4, top_k_groups=2)
    with pytest.raises(ValueError, match="num_groups is not an option of router='softmax'"):
        MoE(4, 8, 2, router="softmax", num_groups=2)
    with pytest.raises(ValueError, match="scaling_factor=-1"):
        MoE(4, 8, 2, scaling_factor=-1.0)
    with pytest.raises(ValueError, match="num_shared_experts=0"):
        MoE(4, 8, 2, shared_gate=True)
