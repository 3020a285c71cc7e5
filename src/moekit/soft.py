"""Soft MoE (Puigcerver et al. 2023, arXiv:2308.00951), for any vectorised sequence.

x [B, n, d] -> logits [B, n, E, S] = x . phi
dispatch: softmax over the n tokens -> slot inputs [E, B, S, d] (each slot a mix of tokens)
experts:  the same `ExpertBank` as the sparse layers, E equal groups of B*S rows
combine:  softmax over all E*S slots -> out [B, n, d] (each token a mix of slot outputs)
No token is dropped and no balancing loss is needed. Every output mixes the whole sequence, so
a causal language model leaks future tokens through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_input, check_positive_int
from .experts import ExpertBank
from .routing import router_dtype


class SoftMoE(nn.Module):
    """Soft Mixture of Experts over sequences of any length.

    Args:
        d_model: Token width d.
        num_experts: Experts E.
        num_slots: Slots per expert S.
        d_hidden: Expert hidden width (default d_model, as seed 004's experts).
        activation: Expert activation: "relu", "gelu" or "swiglu".
        experts: A module mapping (rows [M, d], group_sizes [E]) -> [M, d]; default an
            `ExpertBank` from d_hidden/activation/bias/dropout.
        bias: Expert biases.
        dropout: Dropout on expert output rows in training.

    `phi` [d, E, S] is initialised N(0, 1/d) (LeCun normal, as the paper; seed 004 uses N(0, 1),
    whose logits grow with sqrt(d) and saturate the softmaxes).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        num_slots: int,
        d_hidden: int | None = None,
        activation: str = "gelu",
        *,
        experts: nn.Module | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.num_slots = check_positive_int("num_slots", num_slots)
        self.phi = nn.Parameter(torch.randn(d_model, num_experts, num_slots) * d_model**-0.5)
        if experts is None:
            d_hidden = d_model if d_hidden is None else d_hidden
            experts = ExpertBank(
                num_experts, d_model, d_hidden, activation, bias=bias, dropout=dropout
            )
        if getattr(experts, "num_experts", None) != num_experts:
            raise ValueError(f"experts must hold num_experts={num_experts} experts")
        self.experts = experts

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: tokens [B, n, d] (any leading batch shape, or [n, d]). Returns: same shape."""
        check_input(x, self.d_model, min_dim=2)
        n, d = x.shape[-2:]
        b = math.prod(x.shape[:-2])
        batch = x.reshape(b, n, d)  # [B, n, d]
        num_experts, num_slots = self.num_experts, self.num_slots
        dtype = router_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            logits = torch.einsum("bnd,des->bnes", batch.to(dtype), self.phi.to(dtype))
        # 1. dispatch: each slot is a convex mix of the tokens (softmax over n)
        dispatch = F.softmax(logits, dim=1).to(batch.dtype)  # [B, n, E, S]
        slots = torch.einsum("bnes,bnd->ebsd", dispatch, batch)  # [E, B, S, d]
        # 2. experts: E equal groups of B*S rows
        group_sizes = torch.full((num_experts,), b * num_slots, dtype=torch.long, device=x.device)
        rows = self.experts(slots.reshape(-1, d), group_sizes)  # [E*B*S, d]
        slot_out = rows.reshape(num_experts, b, num_slots, d).permute(1, 0, 2, 3)  # [B, E, S, d]
        # 3. combine: each token a convex mix of all E*S slot outputs
        combine = F.softmax(logits.reshape(b, n, num_experts * num_slots), dim=-1)  # [B, n, E*S]
        out = torch.bmm(combine.to(rows.dtype), slot_out.reshape(b, num_experts * num_slots, d))
        return out.reshape(x.shape).to(x.dtype)  # [..., n, d]
