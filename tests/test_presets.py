"""The seeds' layers against the float64 oracle, and the seeds' own checks plus behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import bank_params, check_parity, gate_params, leaf64
from moekit import (
    MixtralBlock,
    MixtureOfExperts,
    SimpleMoELayer,
    SparseMoE,
    SwitchTransformer,
    total_aux_loss,
)

# B, T, d, E, k: the layer grid (N = B*T in {1, 7, 33}, d in {3, 17}, E in {1, 3, 8}, k in 1..E)
SHAPES = [
    (1, n, d, e, k) for n in (1, 7, 33) for d in (3, 17) for e in (1, 3, 8) for k in range(1, e + 1)
]
SHAPES += [(2, 7, 17, 3, 2), (3, 11, 17, 8, 3)]  # a batch dimension too


def _bank_leaves(gate, experts):
    leaves = [gate.weight, gate.bias, experts.w1, experts.w2, experts.b1, experts.b2]
    return [t for t in leaves if t is not None]


@pytest.mark.parametrize("b,t,d,e,k", SHAPES)
def test_simple_moe_layer_matches_oracle(b, t, d, e, k):
    layer = SimpleMoELayer(d, e, k, alpha=0.05).double()
    experts = list(layer.experts)
    params = [layer.gating_network.weight, layer.gating_network.bias]
    params += [p for x in experts for p in (x.fc1.weight, x.fc1.bias, x.fc2.weight, x.fc2.bias)]

    def run(x):
        out = layer(x)
        return out, layer.load_balancing_loss

    def oracle(x64):
        gate = gate_params(layer.gating_network)
        leaves = [leaf64(p) for p in params[2:]]  # per expert: fc1.w, fc1.b, fc2.w, fc2.b
        w1, b1, w2, b2 = (leaves[i::4] for i in range(4))
        ex = ref.ExpertParams(
            torch.stack([w.t() for w in w1]),
            torch.stack([w.t() for w in w2]),
            torch.stack(b1),
            torch.stack(b2),
            "relu",
        )
        out, probs, _, choices = ref.token_choice_moe(x64.reshape(-1, d), gate, ex, "softmax", k)
        aux = 0.05 * ref.load_balancing_loss(probs, choices, e)
        return out.reshape(x64.shape), aux, [gate.weight, gate.bias, *leaves]

    check_parity(run, torch.randn(b, t, d, dtype=torch.float64), params, oracle)


def test_simple_moe_layer_seed_check_with_idle_experts():
    layer = SimpleMoELayer(32, 8, 2)
    with torch.no_grad():
        layer.gating_network.bias.copy_(torch.tensor([9.0, 9.0] + [-9.0] * 6))  # 6 idle experts
    layer(torch.randn(4, 16, 32)).sum().backward()
    assert layer.gating_network.weight.grad is not None
    for expert in layer.experts:
        assert expert.weight.grad is not None
    assert layer.stats.tokens_per_expert[2:].sum() == 0


@pytest.mark.parametrize("b,t,d,e,k", SHAPES)
def test_mixture_of_experts_matches_oracle(b, t, d, e, k):
    layer = MixtureOfExperts(d, 5, e, k).double().eval()  # eval: no noise, no dropout
    gate_mod, bank = layer.router.router, layer.experts

    def oracle(x64):
        gate, ex = gate_params(gate_mod), bank_params(bank)
        out, _, _, _ = ref.token_choice_moe(x64.reshape(-1, d), gate, ex, "softmax", k)
        probs = torch.stack([torch.softmax(gate.logits(row), 0) for row in x64.reshape(-1, d)])
        share = probs.sum(0) / probs.sum()
        aux = ((share - 1.0 / e) ** 2).sum()  # seed 002's compute_load_balancing_loss
        return out.reshape(x64.shape), aux, _bank_leaves(gate, ex)

    params = [gate_mod.weight, gate_mod.bias, bank.w1, bank.w2, bank.b1, bank.b2]
    check_parity(layer, torch.randn(b, t, d, dtype=torch.float64), params, oracle)


@pytest.mark.parametrize(
    "b,t,d,e,cf", [(2, 7, 17, 3, 1.25), (3, 11, 3, 8, 0.5), (1, 33, 17, 1, 1.0)]
)
def test_switch_transformer_matches_oracle(b, t, d, e, cf):
    layer = SwitchTransformer(d, e, capacity_factor=cf, load_balance_coef=0.02).double().eval()
    gate_mod, bank = layer.router.gate, layer.experts

    def run(x):
        return layer(x), layer.aux_loss

    def oracle(x64):
        gate, ex = gate_params(gate_mod), bank_params(bank)
        out, probs, _, choices = ref.token_choice_moe(
            x64.reshape(-1, d), gate, ex, "softmax_full", 1, capacity_factor=cf
        )
        aux = 0.02 * ref.load_balancing_loss(probs, choices, e)
        return out.reshape(x64.shape), aux, _bank_leaves(gate, ex)

    params = [gate_mod.weight, gate_mod.bias, bank.w1, bank.w2, bank.b1, bank.b2]
    check_parity(run, torch.randn(b, t, d, dtype=torch.float64), params, oracle)


def test_switch_transformer_drops_lowest_probability_first():
    layer = SwitchTransformer(4, 2, capacity_factor=0.5, dropout=0.0).eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        layer.router.gate.bias.zero_()
    # all four tokens prefer expert 0 (x[0] > 0), C = ceil(0.5 * 4 / 2) = 1: the most confident
    x = torch.tensor([[0.5, 1, 1, 1], [2.0, 1, 1, 1], [1.0, 1, 1, 1], [0.1, 1, 1, 1]])
    out = layer(x)
    assert (out.abs().sum(-1) > 0).tolist() == [False, True, False, False]
    assert float(layer.stats.dropped_fraction) == 0.75


@pytest.mark.parametrize("b,t,d,e,k", SHAPES)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_sparse_moe_matches_oracle(b, t, d, e, k, capacity_factor):
    layer = SparseMoE(d, e, k, capacity_factor, load_balance_coef=0.01).double().eval()
    gate_mod, bank = layer.router.topkroute_linear, layer.experts

    def run(x):
        return layer(x), layer.aux_loss

    def oracle(x64):
        gate, ex = gate_params(gate_mod), bank_params(bank)
        out, probs, _, choices = ref.token_choice_moe(
            x64.reshape(-1, d), gate, ex, "softmax", k, capacity_factor
        )
        aux = 0.01 * ref.load_balancing_loss(probs, choices, e)
        return out.reshape(x64.shape), aux, _bank_leaves(gate, ex)

    params = [gate_mod.weight, gate_mod.bias, bank.w1, bank.w2, bank.b1, bank.b2]
    check_parity(run, torch.randn(b, t, d, dtype=torch.float64), params, oracle)


def test_sparse_moe_training_routes_with_noise():
    layer = SparseMoE(16, 8, 2, dropout=0.0)
    x = torch.randn(4, 8, 16)
    torch.manual_seed(0)
    train_out = layer(x)
    layer.eval()
    assert not torch.allclose(train_out, layer(x))
    torch.testing.assert_close(layer(x), layer(x))


def test_mixtral_block_composes_attention_and_moe():
    block = MixtralBlock(d_model=32, n_heads=4, num_experts=4, k=2).eval()
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, aux = block(x)
    attn, _ = block.attn(x, x, x)
    h = block.ln1(x + attn)
    moe_out, moe_aux = block.moe(h)
    torch.testing.assert_close(y, block.ln2(h + moe_out))
    torch.testing.assert_close(aux, moe_aux)
    (y.sum() + aux).backward()
    assert all(p.grad is not None for p in block.parameters())
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)
    y_causal, _ = block(x, attn_mask=causal)
    y_prefix, _ = block(x[:, :4], attn_mask=causal[:4, :4])
    torch.testing.assert_close(y_causal[:, :4], y_prefix)


def test_total_aux_loss_sums_layers():
    blocks = torch.nn.ModuleList([SparseMoE(8, 4, 2), SwitchTransformer(8, 4)])
    x = torch.randn(2, 5, 8)
    blocks[1](blocks[0](x))
    total = total_aux_loss(blocks)
    torch.testing.assert_close(total, blocks[0].aux_loss + blocks[1].aux_loss)
    total.backward()
    assert blocks[0].router.topkroute_linear.weight.grad is not None
    assert F.mse_loss(total, total) == 0
