"""Dropout whose mask costs one random 64-bit word per four elements.

`F.dropout` on CPU draws one Bernoulli sample per element through the generator, which on a
2-core machine cost more than the attention of the makeMoE model. Here one call to
`random_` fills 16 random bits per element and a comparison turns them into the keep mask, so
the drop probability is p rounded to a multiple of 1/65536. Same global generator (seeded and
checkpointed like any other draw); accelerators keep `F.dropout`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """(keep [shape] bool, scale 1/(1-p)): each element kept with probability 1-p (to 1/65536)."""
    if torch.compiler.is_compiling():  # compiled graphs draw their own random numbers anyway
        return torch.rand(shape, device=device) >= p, 1.0 / (1.0 - p)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    bits = words.random_(-(2**63), 2**63 - 1).view(torch.int16)[:numel]  # uniform int16
    threshold = round(p * 65536)  # drop when the 16 bits, read unsigned, fall below it
    return bits.view(shape) >= threshold - 32768, 65536 / (65536 - threshold)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p (to 1/65536) and scale the rest by 1/(1-p)."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return torch.where(keep, x * scale, 0.0)


class Dropout(nn.Module):
    """`nn.Dropout` through `dropout` above."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
