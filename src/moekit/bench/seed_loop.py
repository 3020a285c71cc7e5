"""The seeds' MoE design, the slow baseline of the layer benchmark.

Written from seeds 002 and 003 (makeMoE's `SparseMoE`): a softmax top-k router, then a Python
loop over the experts, each with a boolean mask over all N tokens, a gather of the masked rows,
the expert, and a masked accumulate into the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SeedExpert(nn.Module):
    """nn.Linear experts: ReLU/GELU MLP or SwiGLU (gate and up side by side)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.fc1 = nn.Linear(d_model, width, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return self.fc2(h)


class SeedLoopMoE(nn.Module):
    """x [N, d] -> [N, d]; makeMoE's loop with a Mixtral router (weights renormalised over k)."""

    def __init__(
        self, d_model: int, d_hidden: int, num_experts: int, top_k: int, activation: str
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            SeedExpert(d_model, d_hidden, activation) for _ in range(num_experts)
        )

    def forward(self, x: Tensor) -> Tensor:
        logits = self.gate(x)  # [N, E]
        top_logits, indices = logits.topk(self.top_k, dim=-1)  # [N, k]
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, indices, top_logits)
        gating = F.softmax(sparse, dim=-1)  # [N, E], zero off the top k
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = (indices == i).any(dim=-1)  # [N]
            if mask.any():
                y = expert(x[mask]) * gating[mask, i].unsqueeze(1)
                out[mask] += y
        return out
