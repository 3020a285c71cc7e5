"""Detached, cheap per-layer diagnostics of a routing decision.

tokens_per_expert  rows each expert computed (after capacity)
dropped_fraction   token-choice: pairs over capacity / (N*k); expert-choice: unrouted tokens / N
router_entropy     mean entropy (nats) of the router distribution per token; log(E) = uniform
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class MoEStats(NamedTuple):
    tokens_per_expert: Tensor  # [E] int64
    dropped_fraction: Tensor  # [] float32
    router_entropy: Tensor  # [] float32


@torch.no_grad()
def routing_stats(
    probs: Tensor,
    group_sizes: Tensor,
    num_dropped: Tensor,
    num_candidates: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> MoEStats:
    """Summarise one routing decision; nothing here carries a gradient.

    Args:
        probs: Router probabilities [N, E].
        group_sizes: Rows per expert [E].
        num_dropped: Dropped pairs (token-choice) or unrouted tokens (expert-choice), [].
        num_candidates: What `num_dropped` is a part of: N*k or N.
        reduce: Sums a vector over data-parallel ranks (expert parallelism); the statistics
            are then those of all ranks' tokens together.
    """
    probs = probs.detach().float()
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [N]
    if reduce is not None:  # one collective: sizes [E], then dropped, candidates, entropy, N
        tail = [num_dropped, num_candidates, entropy.sum(), entropy.numel()]
        device = group_sizes.device
        tail = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in tail])
        packed = reduce(torch.cat([group_sizes.double(), tail]))  # [E + 4]
        num_experts = group_sizes.numel()
        dropped, candidates, entropy_sum, tokens = packed[num_experts:].unbind()
        return MoEStats(
            packed[:num_experts].round().long(),
            (dropped / candidates.clamp_min(1)).float(),
            (entropy_sum / tokens.clamp_min(1)).float(),
        )
    mean_entropy = entropy.mean() if entropy.numel() else entropy.new_zeros(())
    dropped = num_dropped.float() / max(num_candidates, 1)
    return MoEStats(group_sizes.detach().long(), dropped, mean_entropy)
