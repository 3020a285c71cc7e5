"""Detached, cheap per-layer diagnostics of a routing decision.

tokens_per_expert  rows each expert computed (after capacity)
dropped_fraction   token-choice: pairs over capacity / (N*k); expert-choice: unrouted tokens / N
router_entropy     mean entropy (nats) of the router distribution per token; log(E) = uniform
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MoEStats(NamedTuple):
    tokens_per_expert: Tensor  # [E] int64
    dropped_fraction: Tensor  # [] float32
    router_entropy: Tensor  # [] float32


@torch.no_grad()
def routing_stats(
    probs: Tensor, group_sizes: Tensor, num_dropped: Tensor, num_candidates: int
) -> MoEStats:
    """Summarise one routing decision; nothing here carries a gradient.

    Args:
        probs: Router probabilities [N, E].
        group_sizes: Rows per expert [E].
        num_dropped: Dropped pairs (token-choice) or unrouted tokens (expert-choice), [].
        num_candidates: What `num_dropped` is a part of: N*k or N.
    """
    probs = probs.detach().float()
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [N]
    mean_entropy = entropy.mean() if entropy.numel() else entropy.new_zeros(())
    dropped = num_dropped.float() / max(num_candidates, 1)
    return MoEStats(group_sizes.detach().long(), dropped, mean_entropy)
