"""Auxiliary losses of a router: pure functions of (probs, indices) or logits.

load_balancing_loss  Switch (Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i, f over top-k pairs
router_z_loss        ST-MoE (Zoph et al. 2022, arXiv:2202.08906): mean logsumexp(logits)^2
squared_deviation_loss  seed 002: sum_i (share_i - 1/E)^2 of the summed probabilities
Each returns an unscaled float scalar; the layer multiplies by its coefficient (the alpha).
An empty batch gives 0, still connected to the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._counts import count_ids


def load_balancing_loss(probs: Tensor, indices: Tensor, counts: Tensor | None = None) -> Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i.

    f_i is the fraction of the N*k (token, slot) pairs routed to expert i (counted before any
    capacity drop, no gradient); P_i the mean router probability of expert i. Perfectly
    uniform routing gives 1.0; everything on one expert gives E.

    Args:
        probs: Router probabilities of shape [N, E].
        indices: Chosen experts of shape [N, k].
        counts: Pairs per expert [E] for f (default: counted from `indices`). Data-parallel
            ranks pass the counts summed over all ranks: then, with equal N per rank, the
            ranks' mean loss and mean gradient are those of the whole global batch.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    if counts is None:
        counts = count_ids(indices, num_experts)  # [E]
    fraction = counts.to(probs.dtype) / counts.sum().clamp_min(1)  # [E] f_i
    mean_prob = probs.mean(0)  # [E] P_i
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss mean_n logsumexp(logits_n)^2: keeps router logits small (ST-MoE).

    Args:
        logits: Router logits of shape [N, E].
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def squared_deviation_loss(probs: Tensor) -> Tensor:
    """Seed 002's balance loss: sum_i (share_i - 1/E)^2, share_i = sum_n probs[n, i] / sum.

    Args:
        probs: Router probabilities of shape [N, E].
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    per_expert = probs.sum(0)  # [E]
    share = per_expert / per_expert.sum()  # [E]
    return (share - 1.0 / num_experts).square().sum()
