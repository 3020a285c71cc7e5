"""The seeds' layer names as thin presets over `MoE`, with the seeds' constructor arguments,
attribute names and return values.

seed 000  SimpleMoELayer(embedding_dim, num_experts, top_k) -> output
seed 002  MixtureOfExperts(d_model, d_ff, num_experts, k) -> (output, aux_loss)
          SwitchTransformer(d_model, num_experts, capacity_factor) -> output
          MixtralBlock(d_model, n_heads, num_experts, k) -> (x, aux_loss)
seed 003  SparseMoE(n_embed, num_experts, top_k, capacity_factor=None) -> output
Every preset also keeps `aux_losses`, `aux_loss` and `stats` after each forward (see `MoE`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int
from .experts import ExpertBank, ExpertList, MLPExpert
from .layers import MoE, MoEOutput
from .losses import squared_deviation_loss
from .routing import ExpertChoice, NoisyTopkRouter, Routing, SoftmaxRouter, SwitchRouter, TopKRouter


class SimpleMoELayer(MoE):
    """Seed 000: a biased linear `gating_network`, two-layer ReLU MLP experts (hidden 4d) as a
    module list, top-k dispatch, weights = softmax over the top-k logits.

    `experts` is an `nn.ModuleList`; each expert is callable on rows [n, d] and exposes `.weight`
    (its first layer's). `forward(x [B, T, d]) -> [B, T, d]`; the Switch load-balancing loss
    `alpha * E * sum_i f_i P_i` is `load_balancing_loss` after each forward.
    """

    def __init__(
        self, embedding_dim: int, num_experts: int, top_k: int = 2, *, alpha: float = 0.01
    ) -> None:
        check_positive_int("embedding_dim", embedding_dim)
        check_positive_int("num_experts", num_experts)
        router = SoftmaxRouter(embedding_dim, num_experts, top_k, normalize=True, bias=True)
        experts = ExpertList(
            MLPExpert(embedding_dim, 4 * embedding_dim, "relu") for _ in range(num_experts)
        )
        super().__init__(
            embedding_dim,
            num_experts,
            top_k,
            router=router,
            experts=experts,
            load_balance_coef=alpha,
        )

    @property
    def gating_network(self) -> nn.Linear:
        return self.router.gate

    @property
    def load_balancing_loss(self) -> Tensor | None:
        """alpha * E * sum_i f_i P_i of the last forward (with graph)."""
        return self.aux_losses.get("load_balance")

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x).output


class MixtureOfExperts(MoE):
    """Seed 002's Mixtral-style layer: `TopKRouter` (noise std 1e-2 in training, gates
    renormalised), ReLU experts with biases, hidden `d_ff`.

    `forward(x [B, L, d]) -> (output [B, L, d], aux_loss)`, aux_loss being the seed's squared
    deviation of the experts' probability shares from 1/E (unscaled, as in the seed). The seed
    applies its dropout to the expert's hidden layer; here it applies to the expert's output rows.
    """

    def __init__(
        self,
        d_model: int = 4096,
        d_ff: int = 14336,
        num_experts: int = 8,
        k: int = 2,
        *,
        dropout: float = 0.1,
    ) -> None:
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        router = TopKRouter(d_model, num_experts, k)
        experts = ExpertBank(num_experts, d_model, d_ff, "relu", bias=True, dropout=dropout)
        super().__init__(d_model, num_experts, k, router=router, experts=experts)

    @property
    def k(self) -> int:
        return self.top_k

    def compute_aux_losses(
        self, routing: Routing | ExpertChoice, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The seed's loss, of this rank's tokens also under expert parallelism (`reduce`)."""
        probs = F.softmax(routing.logits, dim=-1)  # [N, E] of the clean logits, as the seed
        return {"squared_deviation": squared_deviation_loss(probs)}


class SwitchTransformer(MoE):
    """Seed 002's Switch layer: top-1 routing with a capacity, ReLU experts (hidden 4d).

    Each expert keeps at most ceil(capacity_factor * N / E) tokens of the N in the batch; an
    over-full expert drops its tokens with the lowest router probability, and a dropped token's
    output is zero (the residual carries it). The expert output is scaled by the router
    probability (Switch paper), so the router learns; the seed leaves it unscaled and sizes the
    capacity from the sequence length alone. `forward(x [B, L, d]) -> [B, L, d]`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        *,
        dropout: float = 0.1,
        load_balance_coef: float = 0.01,
    ) -> None:
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        router = SwitchRouter(d_model, num_experts, bias=True)
        experts = ExpertBank(num_experts, d_model, 4 * d_model, "relu", bias=True, dropout=dropout)
        super().__init__(
            d_model,
            num_experts,
            1,
            router=router,
            experts=experts,
            capacity_factor=capacity_factor,
            load_balance_coef=load_balance_coef,
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x).output


class MixtralBlock(nn.Module):
    """Seed 002's transformer block: self-attention then a `MixtureOfExperts` FFN (d_ff = 4d),
    each with a residual followed by LayerNorm (post-norm, as the seed).

    `forward(x [B, L, d], attn_mask=None) -> (x [B, L, d], aux_loss)`; pass a causal
    `attn_mask` (see `nn.MultiheadAttention`) for a decoder.
    """

    def __init__(
        self, d_model: int = 4096, n_heads: int = 32, num_experts: int = 8, k: int = 2
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.moe = MixtureOfExperts(d_model, d_model * 4, num_experts, k)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> MoEOutput:
        attn_out, _ = self.attn(x, x, x, attn_mask=attn_mask, need_weights=False)
        x = self.ln1(x + attn_out)
        moe_out, aux_loss = self.moe(x)
        x = self.ln2(x + moe_out)
        return MoEOutput(x, aux_loss)


class SparseMoE(MoE):
    """Seed 003's (makeMoE) sparse MoE: `NoisyTopkRouter`, ReLU experts (hidden 4d, biases,
    output dropout), optional expert capacity (makeMoE part 2).

    `forward(x [B, T, d]) -> [B, T, d]`; `router` and `experts` as in the seed.
    """

    def __init__(
        self,
        n_embed: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        *,
        dropout: float = 0.1,
        init: str = "default",
        load_balance_coef: float = 0.01,
    ) -> None:
        check_positive_int("n_embed", n_embed)
        check_positive_int("num_experts", num_experts)
        router = NoisyTopkRouter(n_embed, num_experts, top_k)
        experts = ExpertBank(
            num_experts, n_embed, 4 * n_embed, "relu", bias=True, dropout=dropout, init=init
        )
        super().__init__(
            n_embed,
            num_experts,
            top_k,
            router=router,
            experts=experts,
            capacity_factor=capacity_factor,
            load_balance_coef=load_balance_coef,
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x).output
