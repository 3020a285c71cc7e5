"""Hypothesis strategies for routing decisions."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def routings(draw, max_tokens: int = 24, max_experts: int = 9):
    """(indices [N, k] distinct per row, weights [N, k], E): random token-choice routing.

    Weights are drawn from a small set so equal weights (the tie-breaking path) happen often.
    """
    num_experts = draw(st.integers(1, max_experts))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    skew = draw(st.sampled_from(["uniform", "one_expert", "few_experts"]))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew == "one_expert":
        scores[:, 0] += 10.0  # every token picks expert 0 first
    elif skew == "few_experts":
        scores[:, : max(1, num_experts // 3)] += 1.0
    indices = torch.topk(scores, top_k, dim=-1).indices  # [N, k] distinct
    levels = torch.tensor([0.1, 0.25, 0.5, 0.5, 1.0])
    weights = levels[torch.randint(0, len(levels), (num_tokens, top_k), generator=gen)]
    return indices, weights, num_experts
