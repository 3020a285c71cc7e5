"""Routers. Oracles: `reference.choose` (per-token Python sort) and the seeds' own formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from conftest import gate_params
from moekit import (
    ExpertChoiceRouter,
    MoE,
    NoisyRouter,
    NoisyTopkRouter,
    SigmoidRouter,
    SoftmaxRouter,
    SwitchRouter,
    TopKRouter,
    TopkRouter,
    top_k_gating,
    update_router_biases,
)


@pytest.mark.parametrize("normalize,rule", [(True, "softmax"), (False, "softmax_full")])
@pytest.mark.parametrize("e,k", [(1, 1), (3, 2), (8, 3), (8, 8)])
def test_softmax_router_matches_oracle(normalize, rule, e, k):
    router = SoftmaxRouter(17, e, k, normalize=normalize, bias=True).double()
    x = torch.randn(7, 17, dtype=torch.float64)
    routing = router(x)
    gate = gate_params(router.gate)
    for n in range(7):
        picked, probs = ref.choose(gate.logits(x[n]), rule, k)
        assert routing.indices[n].tolist() == [p[0] for p in picked]
        torch.testing.assert_close(routing.weights[n], torch.stack([p[1] for p in picked]).detach())
        torch.testing.assert_close(routing.probs[n], probs.detach())


def test_top_k_gating_is_seed_001():
    tokens = torch.randn(10, 32, 128)
    gating = torch.nn.Linear(128, 8)
    weights, indices = top_k_gating(tokens, gating, 2)
    logits = gating(tokens.reshape(-1, 128))
    top, top_idx = torch.topk(logits, 2, dim=-1)
    assert torch.equal(indices, top_idx)
    torch.testing.assert_close(weights, F.softmax(top, dim=-1))
    with pytest.raises(ValueError, match="k=9"):
        top_k_gating(tokens, gating, 9)


def test_router_logits_in_float32_for_bf16_input():
    router = SoftmaxRouter(16, 4, 2).to(torch.bfloat16)
    routing = router(torch.randn(5, 16, dtype=torch.bfloat16))
    assert routing.logits.dtype == routing.probs.dtype == routing.weights.dtype == torch.float32


def test_noisy_router_eval_is_deterministic_and_training_adds_scaled_noise():
    router = NoisyRouter(16, 8, 2)
    x = torch.randn(50, 16)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.weights, second.weights)
    clean = router.gate(x)
    torch.testing.assert_close(first.weights, F.softmax(clean.topk(2).values, dim=-1))
    router.train()
    torch.manual_seed(5)
    noisy = router(x)
    torch.manual_seed(5)
    want_logits = clean + torch.randn(clean.shape) * F.softplus(router.noise_gate(x))
    torch.testing.assert_close(noisy.weights, F.softmax(want_logits.topk(2).values, dim=-1))
    torch.testing.assert_close(noisy.logits, clean)  # Routing.logits stay clean (z-loss input)
    assert not torch.equal(noisy.indices, first.indices)


def test_switch_router_weight_is_probability():
    router = SwitchRouter(8, 4)
    routing = router(torch.randn(9, 8))
    assert routing.indices.shape == (9, 1)
    torch.testing.assert_close(routing.weights[:, 0], routing.probs.max(-1).values)


def test_jitter_only_in_training():
    router = SoftmaxRouter(8, 4, 2, jitter_eps=0.5)
    x = torch.randn(20, 8)
    router.eval()
    torch.testing.assert_close(router(x).logits, router.gate(x))
    router.train()
    assert not torch.allclose(router(x).logits, router.gate(x))


def test_sigmoid_bias_steers_choice_not_weights():
    router = SigmoidRouter(8, 4, 2)
    x = torch.randn(30, 8)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))  # forces experts 2 and 3
    routing = router(x)
    assert sorted(set(routing.indices.flatten().tolist())) == [2, 3]
    scores = torch.sigmoid(router.gate(x))[:, [2, 3]]
    torch.testing.assert_close(
        routing.weights.sort(-1).values, (scores / scores.sum(-1, keepdim=True)).sort(-1).values
    )


def test_sigmoid_bias_update_rule():
    router = SigmoidRouter(8, 4, 1, bias_update_rate=0.1)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # everything to expert 3
    router.train()
    router(torch.randn(12, 8))
    assert router.expert_load.tolist() == [0, 0, 0, 12]
    update_router_biases(MoE(8, 4, 1, router=router))
    # mean load 3: overloaded expert 3 goes down by the rate, idle ones go up
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.1, 0.1, 0.1, 1.9]))
    assert router.expert_load.sum() == 0
    router.eval()
    router(torch.randn(12, 8))
    assert router.expert_load.sum() == 0  # eval does not count


def test_sigmoid_bias_balances_a_skewed_router():
    torch.manual_seed(1)
    router = SigmoidRouter(16, 8, 2, bias_update_rate=0.05)
    with torch.no_grad():
        router.gate.bias = None
        router.gate.weight[0] += 1.0  # expert 0 favoured
    x = torch.randn(256, 16).abs()
    before = torch.bincount(router(x).indices.flatten(), minlength=8).max()
    for _ in range(60):
        router(x)
        router.update_bias()
    after = torch.bincount(router(x).indices.flatten(), minlength=8).max()
    assert after < before


@pytest.mark.parametrize("n,cf", [(0, 1.0), (1, 1.0), (9, 0.5), (9, 5.0)])
def test_expert_choice_capacity(n, cf):
    router = ExpertChoiceRouter(8, 4, 2, capacity_factor=cf)
    choice = router(torch.randn(n, 8))
    capacity = min(n, math.ceil(cf * n * 2 / 4))
    assert choice.token_index.shape == (4, capacity)
    for e in range(4):
        top = choice.probs[:, e].sort(descending=True).values[:capacity]
        torch.testing.assert_close(choice.weights[e], top)


def test_seed_002_topk_router():
    router = TopKRouter(16, num_experts=8, k=2)
    assert router.k == 2 and router.router is router.gate and router.router.bias is not None
    x = torch.randn(2, 5, 16)
    gates, indices = router(x, training=False)
    assert gates.shape == indices.shape == (2, 5, 2)
    probs = F.softmax(router.router(x), dim=-1)
    top, top_idx = probs.topk(2, dim=-1)
    assert torch.equal(indices, top_idx)
    torch.testing.assert_close(gates, top / top.sum(-1, keepdim=True))
    noisy, _ = router(x, training=True)
    assert not torch.equal(noisy, gates)
    loss = router.compute_load_balancing_loss(router.router(x))
    share = probs.sum((0, 1)) / probs.sum()
    torch.testing.assert_close(loss, ((share - 1 / 8) ** 2).sum())


@pytest.mark.parametrize("cls", [TopkRouter, NoisyTopkRouter])
def test_seed_003_routers_sparse_softmax(cls):
    router = cls(16, 8, 2).eval()
    x = torch.randn(2, 4, 16)
    gating_output, indices = router(x)
    linear = router.linear if cls is TopkRouter else router.topkroute_linear
    logits = linear(x)
    top, idx = logits.topk(2, dim=-1)
    sparse = torch.full_like(logits, float("-inf")).scatter(-1, idx, top)
    torch.testing.assert_close(gating_output, F.softmax(sparse, dim=-1))  # the seed's formula
    assert torch.equal(indices, idx)
    if cls is NoisyTopkRouter:
        assert router.noise_linear is router.noise_gate


@given(
    st.sampled_from(["softmax", "softmax_raw", "noisy", "switch", "sigmoid"]),
    st.integers(0, 40),
    st.integers(1, 9),
    st.data(),
    st.booleans(),
)
def test_router_properties(kind, num_tokens, num_experts, data, training):
    """Each token gets k distinct valid experts; weights are finite and non-negative, and sum to
    1 where the router normalises; probs rows are distributions."""
    top_k = 1 if kind == "switch" else data.draw(st.integers(1, num_experts))
    router = {
        "softmax": lambda: SoftmaxRouter(6, num_experts, top_k, noise_std=0.5, jitter_eps=0.1),
        "softmax_raw": lambda: SoftmaxRouter(6, num_experts, top_k, normalize=False),
        "noisy": lambda: NoisyRouter(6, num_experts, top_k),
        "switch": lambda: SwitchRouter(6, num_experts),
        "sigmoid": lambda: SigmoidRouter(6, num_experts, top_k),
    }[kind]()
    router.train(training)
    routing = router(torch.randn(num_tokens, 6) * 3)
    assert routing.indices.shape == routing.weights.shape == (num_tokens, top_k)
    for row in routing.indices.tolist():
        assert len(set(row)) == top_k and all(0 <= e < num_experts for e in row)
    assert torch.isfinite(routing.weights).all() and (routing.weights >= 0).all()
    if kind not in ("softmax_raw", "switch"):
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(num_tokens))
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(num_tokens))


@given(st.integers(0, 30), st.sampled_from([(4, 2), (8, 4), (8, 8), (6, 3), (6, 1)]), st.data())
def test_group_limited_choice_stays_in_the_best_groups(num_tokens, experts_groups, data):
    """Each token's k experts lie in at most top_k_groups groups, and those groups are the ones
    with the largest sums of their two best biased scores."""
    num_experts, num_groups = experts_groups
    size = num_experts // num_groups
    kept = data.draw(st.integers(1, num_groups))
    top_k = data.draw(st.integers(1, kept * size))
    router = SigmoidRouter(6, num_experts, top_k, num_groups=num_groups, top_k_groups=kept)
    router.expert_bias.copy_(torch.randn(num_experts))
    routing = router(torch.randn(num_tokens, 6))
    scores = torch.sigmoid(routing.logits) + router.expert_bias
    group_keys = scores.view(num_tokens, num_groups, size).topk(min(2, size), -1).values.sum(-1)
    best = group_keys.topk(kept, -1).indices
    for n in range(num_tokens):
        groups = {e // size for e in routing.indices[n].tolist()}
        assert groups <= set(best[n].tolist())
        assert len(set(routing.indices[n].tolist())) == top_k


def test_group_limited_top_k_by_a_group_best_and_a_fill():
    """DeepSeek-V2's groups are scored by their best expert; a fill of 0 (not -inf) lets the
    experts of the other groups beat negative kept scores, as transformers' copies compute."""
    from moekit.routing import group_limited_top_k

    scores = torch.tensor(
        [[0.9, 0.0, 0.5, 0.45]]
    )  # groups {0, 1}: best 0.9 | 0.5; top-2 0.9 | 0.95
    assert group_limited_top_k(scores, 1, 2, 1).tolist() == [[2]]  # two best: group 1
    assert group_limited_top_k(scores, 1, 2, 1, best=1).tolist() == [[0]]  # its max: group 0
    negative = torch.tensor([[-0.1, -0.2, -0.9, -0.8]])  # group 0 kept, both its scores < 0
    assert set(group_limited_top_k(negative, 2, 2, 1).tolist()[0]) == {0, 1}
    assert group_limited_top_k(negative, 2, 2, 1, fill=0.0).tolist()[0][0] in (2, 3)


def test_scaling_factor_multiplies_the_weights():
    x = torch.randn(9, 6)
    plain = SigmoidRouter(6, 8, 2)
    scaled = SigmoidRouter(6, 8, 2, scaling_factor=2.5)
    scaled.load_state_dict(plain.state_dict())
    a, b = plain(x), scaled(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.weights, 2.5 * a.weights)
    torch.testing.assert_close(b.probs, a.probs)  # the balancing loss sees the same probs
