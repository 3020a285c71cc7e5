"""Auxiliary losses and stats, on hand-worked distributions."""

from __future__ import annotations

import math

import torch

from moekit import MoE, load_balancing_loss, router_z_loss, routing_stats, squared_deviation_loss


def test_load_balancing_uniform_is_one_and_collapse_is_e():
    probs = torch.full((8, 4), 0.25)
    indices = torch.arange(8).remainder(4).reshape(8, 1)  # each expert gets 2 of 8
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(1.0))
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1.0
    torch.testing.assert_close(
        load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)), torch.tensor(4.0)
    )


def test_load_balancing_counts_all_top_k_pairs():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[0, 1], [1, 2]])
    # f = [1, 2, 1] / 4 ; P = [0.3, 0.45, 0.25]
    want = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(want))


def test_z_loss_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    want = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(want))


def test_squared_deviation_hand_worked():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(squared_deviation_loss(probs), torch.tensor(0.5))


def test_losses_of_empty_batch_are_zero_and_differentiable():
    probs = torch.zeros(0, 4, requires_grad=True)
    total = load_balancing_loss(probs, torch.zeros(0, 2, dtype=torch.long))
    total = total + router_z_loss(probs) + squared_deviation_loss(probs)
    assert float(total.detach()) == 0.0
    total.backward()


def test_routing_stats():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    stats = routing_stats(probs, torch.tensor([3, 1]), torch.tensor(1), 4)
    assert stats.tokens_per_expert.tolist() == [3, 1]
    torch.testing.assert_close(stats.dropped_fraction, torch.tensor(0.25))
    torch.testing.assert_close(stats.router_entropy, torch.tensor(math.log(2) / 2))


def test_layer_losses_and_stats_are_exposed_per_forward():
    layer = MoE(8, 4, 2, load_balance_coef=0.1, z_loss_coef=0.01)
    out, aux = layer(torch.randn(10, 8))
    assert set(layer.aux_losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(aux, sum(layer.aux_losses.values()))
    assert layer.stats.tokens_per_expert.sum() == 20
    assert not layer.stats.router_entropy.requires_grad
    no_aux = MoE(8, 4, 2, load_balance_coef=0.0)
    _, zero = no_aux(torch.randn(3, 8))
    assert float(zero) == 0.0 and no_aux.aux_losses == {}
