"""Routers: token features -> which experts, with what weights.

x [N, d] -> logits [N, E] (fp32 or wider, whatever x's dtype) -> a `Routing`:
indices [N, k] (distinct experts per token), weights [N, k], probs [N, E], clean logits [N, E].
The expert-choice router returns an `ExpertChoice` (tokens per expert) instead.

Papers: noisy top-k (Shazeer et al. 2017, arXiv:1701.06538); Switch (Fedus et al. 2021,
arXiv:2101.03961); expert choice (Zhou et al. 2022, arXiv:2202.09368); sigmoid scores with
aux-loss-free balancing bias and group-limited routing (DeepSeek-V3, arXiv:2412.19437; Wang et
al. 2024, arXiv:2408.15664).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    check_capacity_factor,
    check_groups,
    check_input,
    check_non_negative,
    check_positive_int,
    check_probability,
    check_top_k,
    expert_capacity,
)
from ._counts import count_ids
from .losses import squared_deviation_loss


class Routing(NamedTuple):
    """What a token-choice router decided for N tokens."""

    indices: Tensor  # [N, k] int64 expert ids, distinct per token
    weights: Tensor  # [N, k] combine weights, differentiable (router dtype)
    probs: Tensor  # [N, E] router probabilities, the P of the balancing losses
    logits: Tensor  # [N, E] clean router logits (no noise), the input of the z-loss


class ExpertChoice(NamedTuple):
    """What an expert-choice router decided: each expert's C tokens."""

    token_index: Tensor  # [E, C] int64 token ids chosen by each expert
    weights: Tensor  # [E, C] combine weights (router probability of that token for that expert)
    probs: Tensor  # [N, E]
    logits: Tensor  # [N, E]


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in float32 or wider: a bf16 softmax skews the balance."""
    return torch.promote_types(dtype, torch.float32)


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """`layer(x)` in the router dtype, outside autocast."""
    dtype = router_dtype(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), layer.weight.to(dtype), bias)  # [N, E]


def softmax_top_k(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k experts of each row and their weights.

    Args:
        logits: Router logits of shape [N, E].
        top_k: Experts per token.
        normalize: True: softmax over the k chosen logits (weights sum to 1, Mixtral, makeMoE);
            False: the full softmax probability of each chosen expert (Switch, GShard).

    Returns:
        (weights [N, k], indices [N, k]).
    """
    top_logits, indices = torch.topk(logits, top_k, dim=-1)  # [N, k]
    if normalize:
        return F.softmax(top_logits, dim=-1), indices
    return F.softmax(logits, dim=-1).gather(-1, indices), indices


def group_limited_top_k(
    scores: Tensor,
    top_k: int,
    num_groups: int = 1,
    top_k_groups: int | None = None,
    *,
    best: int = 2,
    fill: float = float("-inf"),
) -> Tensor:
    """The top-k experts of each row, chosen among the best `top_k_groups` of `num_groups`
    equal groups of experts (DeepSeek-V3's node-limited routing).

    A group's score is the sum of its `best` best expert scores (DeepSeek-V3: two; V2: one,
    its max); the experts of the other groups are set to `fill` (-inf: masked out) before the
    top-k.

    Args:
        scores: Selection scores [N, E] (DeepSeek-V3: sigmoid + correction bias).
        top_k: Experts per row, at most top_k_groups * E / num_groups.
        num_groups: Groups G; E must be a multiple of G. 1 = plain top-k.
        top_k_groups: Groups kept per row (default: all).
        best: Experts summed into a group's score.
        fill: The score given to the experts of the groups not kept.

    Returns:
        indices [N, k] int64.
    """
    num_tokens, num_experts = scores.shape
    if num_groups == 1 or top_k_groups in (None, num_groups):
        return torch.topk(scores, top_k, dim=-1).indices  # [N, k]
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)  # [N, G, E/G]
    group_scores = grouped.topk(min(best, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
    keep_groups = torch.topk(group_scores, top_k_groups, dim=-1).indices  # [N, topk_groups]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    masked = grouped.masked_fill(~keep.unsqueeze(-1), fill)  # [N, G, E/G]
    return torch.topk(masked.view(num_tokens, num_experts), top_k, dim=-1).indices  # [N, k]


def sigmoid_routing(
    logits: Tensor,
    expert_bias: Tensor | None,
    top_k: int,
    num_groups: int = 1,
    top_k_groups: int | None = None,
    normalize: bool = True,
) -> Routing:
    """`SigmoidRouter`'s decision on clean logits [N, E]: choice by sigmoid + `expert_bias` [E]
    (group-limited), weights the unbiased scores of the chosen experts, renormalised over k
    when `normalize`; probs the scores normalised over E (the balancing loss's P)."""
    scores = torch.sigmoid(logits)  # [N, E]
    with torch.no_grad():
        biased = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        indices = group_limited_top_k(biased, top_k, num_groups, top_k_groups)  # [N, k]
    weights = scores.gather(-1, indices)  # [N, k] unbiased scores
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    probs = scores / scores.sum(-1, keepdim=True)  # [N, E]
    return Routing(indices, weights, probs, logits)


def top_k_gating(
    token_embeddings: Tensor, gating_network: nn.Module, k: int = 2
) -> tuple[Tensor, Tensor]:
    """Seed 001: the top-k experts of each token and their softmax weights.

    Args:
        token_embeddings: Tokens of shape [B, T, d] (any leading shape).
        gating_network: A module mapping d to E logits, e.g. ``nn.Linear(d, E)``.
        k: Experts per token, 1 <= k <= E.

    Returns:
        (weights [B*T, k] float32 summing to 1 per token, indices [B*T, k]).

    Raises:
        TypeError, ValueError: Non-floating or empty-shaped input, or k outside 1..E.
    """
    if not isinstance(token_embeddings, Tensor) or not token_embeddings.is_floating_point():
        raise TypeError("token_embeddings must be a floating-point torch.Tensor")
    if token_embeddings.dim() < 1:
        raise ValueError("token_embeddings must have shape [..., d], got a 0-dim tensor")
    x = token_embeddings.reshape(-1, token_embeddings.shape[-1])  # [N, d]
    logits = gating_network(x)  # [N, E]
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError("gating_network must map [N, d] to logits of shape [N, E]")
    check_top_k(k, logits.shape[-1], name="k")
    return softmax_top_k(logits.to(router_dtype(logits.dtype)), k, normalize=True)


class Router(nn.Module):
    """Base of the routers: a linear gate d -> E evaluated in float32 or wider.

    Subclasses implement `_route(x, training)`. `route(x)` is what the MoE layers call;
    `forward(x)` is `route(x)` with input validation and any leading shape.

    Args:
        d_model: Token width d.
        num_experts: Experts E.
        top_k: Experts per token k, 1 <= k <= E.
        bias: Whether the gate has a bias.
        jitter_eps: Multiplicative input jitter in training, x * U(1-eps, 1+eps) (Switch).
        scaling_factor: Multiplier on the combine weights (DeepSeek-V3's
            `routed_scaling_factor`; 1 = none).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        bias: bool = False,
        jitter_eps: float = 0.0,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        self.jitter_eps = check_probability("jitter_eps", jitter_eps)
        self.scaling_factor = check_non_negative("scaling_factor", scaling_factor)
        self.gate = nn.Linear(d_model, num_experts, bias=bias)

    def gate_logits(self, x: Tensor, training: bool) -> Tensor:
        """Clean logits [N, E] of tokens x [N, d], with jitter when training."""
        if training and self.jitter_eps > 0:
            eps = self.jitter_eps
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return _linear(x, self.gate)

    def route(self, x: Tensor) -> Routing | ExpertChoice:
        """Route tokens x [N, d]; noise and jitter only in training mode."""
        routing = self._route(x, self.training)
        if self.scaling_factor != 1.0:
            routing = routing._replace(weights=routing.weights * self.scaling_factor)
        return routing

    def _route(self, x: Tensor, training: bool) -> Routing | ExpertChoice:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Routing | ExpertChoice:
        check_input(x, self.d_model)
        return self.route(x.reshape(-1, self.d_model))


class SoftmaxRouter(Router):
    """Softmax over experts, top-k selection.

    Args:
        normalize: Renormalise the weights over the k chosen experts (Mixtral) or keep each
            chosen expert's full softmax probability (Switch).
        noise_std: Std of Gaussian noise added to the logits in training (seed 002); 0 = none.
        (others): see `Router`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        normalize: bool = True,
        noise_std: float = 0.0,
        bias: bool = False,
        jitter_eps: float = 0.0,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            top_k,
            bias=bias,
            jitter_eps=jitter_eps,
            scaling_factor=scaling_factor,
        )
        self.normalize = normalize
        self.noise_std = check_non_negative("noise_std", noise_std)

    def _route(self, x: Tensor, training: bool) -> Routing:
        logits = self.gate_logits(x, training)  # [N, E]
        routed = logits
        if training and self.noise_std > 0:
            routed = logits + torch.randn_like(logits) * self.noise_std
        weights, indices = softmax_top_k(routed, self.top_k, self.normalize)
        return Routing(indices, weights, F.softmax(routed, dim=-1), logits)


class SwitchRouter(SoftmaxRouter):
    """Switch Transformer routing: top-1, weight = the chosen expert's softmax probability,
    so the router gets a gradient through the expert output (Fedus et al. 2021)."""

    def __init__(
        self, d_model: int, num_experts: int, *, bias: bool = False, jitter_eps: float = 0.0
    ) -> None:
        super().__init__(d_model, num_experts, 1, normalize=False, bias=bias, jitter_eps=jitter_eps)


class NoisyRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, makeMoE).

    In training, logits + randn * softplus(W_noise x); in eval, the clean logits (deterministic).
    Weights are the softmax over the k chosen (noisy) logits; probs the softmax of the noisy
    logits that made the choice.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        bias: bool = False,
        jitter_eps: float = 0.0,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            top_k,
            bias=bias,
            jitter_eps=jitter_eps,
            scaling_factor=scaling_factor,
        )
        self.noise_gate = nn.Linear(d_model, num_experts, bias=bias)

    def _route(self, x: Tensor, training: bool) -> Routing:
        logits = self.gate_logits(x, training)  # [N, E]
        routed = logits
        if training:
            noise_scale = F.softplus(_linear(x, self.noise_gate))  # [N, E] learned scale
            routed = logits + torch.randn_like(logits) * noise_scale
        weights, indices = softmax_top_k(routed, self.top_k, normalize=True)
        return Routing(indices, weights, F.softmax(routed, dim=-1), logits)


class SigmoidRouter(Router):
    """Sigmoid scores with an aux-loss-free balancing bias and group-limited choice (DeepSeek-V3).

    Each expert's score is sigmoid(logit). Selection is top-k of ``score + expert_bias``, within
    the best `top_k_groups` of `num_groups` groups of experts when grouped
    (`group_limited_top_k`); the weights are the *unbiased* scores of the chosen experts
    (renormalised over k when `normalize`), times `scaling_factor`, so the bias steers which
    experts are chosen and never how much they count.

    The bias learns from the load, not from gradients. In training mode the router counts the
    tokens each expert receives; after each optimizer step the training loop calls
    `update_bias()` (or `update_router_biases(model)`), which applies

        expert_bias[i] += bias_update_rate * sign(mean_j(load_j) - load_i)

    (overloaded experts become less attractive, idle ones more) and resets the counts. Under
    torch.distributed the counts are summed over the process group first so every rank applies
    the same update. DeepSeek-V3 uses rate 1e-3 (0 freezes the bias, e.g. a loaded checkpoint's
    score-correction bias).

    Args:
        normalize: Renormalise the k chosen scores to sum to 1 (`norm_topk_prob`).
        bias_update_rate: The step size of the sign update above.
        num_groups: Groups of experts G (`n_group`); E must be a multiple of G.
        top_k_groups: Groups a token may choose from (`topk_group`; default all).
        (others): see `Router`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        normalize: bool = True,
        bias_update_rate: float = 1e-3,
        num_groups: int = 1,
        top_k_groups: int | None = None,
        bias: bool = False,
        jitter_eps: float = 0.0,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            top_k,
            bias=bias,
            jitter_eps=jitter_eps,
            scaling_factor=scaling_factor,
        )
        self.normalize = normalize
        self.bias_update_rate = check_non_negative("bias_update_rate", bias_update_rate)
        self.num_groups, self.top_k_groups = check_groups(num_groups, top_k_groups, num_experts)
        if top_k > self.top_k_groups * (num_experts // self.num_groups):
            raise ValueError(
                f"top_k={top_k} must be <= top_k_groups * num_experts / num_groups = "
                f"{self.top_k_groups * (num_experts // self.num_groups)}"
            )
        self.register_buffer("expert_bias", torch.zeros(num_experts))  # [E] saved with weights
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)  # [E]

    def _route(self, x: Tensor, training: bool) -> Routing:
        logits = self.gate_logits(x, training)  # [N, E]
        routing = sigmoid_routing(
            logits,
            self.expert_bias,
            self.top_k,
            self.num_groups,
            self.top_k_groups,
            self.normalize,
        )
        if training:
            self.expert_load += count_ids(routing.indices, self.num_experts).to(
                self.expert_load.dtype
            )
        return routing

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Apply the sign update from the load counted since the last call, then reset it."""
        load = self.expert_load.clone()  # [E]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()


def update_router_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Call `update_bias` on every `SigmoidRouter` in `model`; run it after optimizer.step()."""
    for module in model.modules():
        if isinstance(module, SigmoidRouter):
            module.update_bias(group)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    C = ceil(capacity_factor * N * top_k / E), clamped to N, so with capacity_factor=1 the
    experts do the same work as token-choice top-k. Load is balanced by construction; a token
    may be chosen by several experts or by none; equal probabilities go to the earlier token.
    The choice reads every token of the batch,
    so a causal language model leaks information across positions with it.

    Args:
        top_k: The average experts per token the capacity is sized for.
        capacity_factor: Multiplier on that capacity.
        (others): see `Router`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: float = 1.0,
        bias: bool = False,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, bias=bias, jitter_eps=jitter_eps)
        self.capacity_factor = check_capacity_factor(capacity_factor, allow_none=False)

    def _route(self, x: Tensor, training: bool) -> ExpertChoice:
        logits = self.gate_logits(x, training)  # [N, E]
        probs = F.softmax(logits, dim=-1)  # [N, E]
        n = x.shape[0]
        capacity = min(n, expert_capacity(n * self.top_k, self.num_experts, self.capacity_factor))
        # a stable sort, not topk: equal probabilities go to the earlier token, reproducibly
        weights, token_index = torch.sort(probs.t(), dim=-1, descending=True, stable=True)  # [E, N]
        return ExpertChoice(token_index[:, :capacity], weights[:, :capacity], probs, logits)


# --- the seeds' router names: thin presets with the seeds' arguments, attributes and returns ---


def _sparse_gates(routing: Routing, leading: torch.Size) -> tuple[Tensor, Tensor]:
    """Seed 003's returns: the sparse softmax [..., E] (zero off the top-k) and indices [..., k]."""
    num_experts, top_k = routing.probs.shape[-1], routing.indices.shape[-1]
    dense = torch.zeros_like(routing.probs).scatter(-1, routing.indices, routing.weights)
    return dense.reshape(*leading, num_experts), routing.indices.reshape(*leading, top_k)


class TopKRouter(SoftmaxRouter):
    """Seed 002's router: softmax top-k over a biased linear gate, gates renormalised over k,
    Gaussian logit noise (std `noise_std`=1e-2) when `training`.

    `forward(x [B, L, d], training=False) -> (gates [B, L, k], indices [B, L, k])`.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2) -> None:
        super().__init__(d_model, num_experts, k, normalize=True, noise_std=1e-2, bias=True)

    @property
    def k(self) -> int:
        return self.top_k

    @property
    def router(self) -> nn.Linear:
        """The gate (seed 002 calls its linear layer `router`)."""
        return self.gate

    def forward(self, x: Tensor, training: bool = False) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        check_input(x, self.d_model)
        routing = self._route(x.reshape(-1, self.d_model), training)
        shape = (*x.shape[:-1], self.top_k)
        return routing.weights.reshape(shape), routing.indices.reshape(shape)

    def compute_load_balancing_loss(self, logits: Tensor) -> Tensor:
        """Seed 002's loss on router logits [..., E]: squared deviation of expert shares."""
        probs = F.softmax(logits.reshape(-1, self.num_experts).float(), dim=-1)
        return squared_deviation_loss(probs)


class TopkRouter(SoftmaxRouter):
    """Seed 003's (makeMoE) top-k router: `.linear`, softmax over the top-k logits.

    `forward(x [B, T, d]) -> (router_output [B, T, E] zero off the top-k, indices [B, T, k])`.
    """

    def __init__(self, n_embed: int, num_experts: int, top_k: int) -> None:
        super().__init__(n_embed, num_experts, top_k, normalize=True, bias=True)

    @property
    def linear(self) -> nn.Linear:
        return self.gate

    def forward(self, mh_output: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        check_input(mh_output, self.d_model, name="mh_output")
        routing = self.route(mh_output.reshape(-1, self.d_model))
        return _sparse_gates(routing, mh_output.shape[:-1])


class NoisyTopkRouter(NoisyRouter):
    """Seed 003's (makeMoE) noisy top-k router: `.topkroute_linear`, `.noise_linear`.

    Noise ``randn * softplus(noise_linear(x))`` in training mode only (the seed adds it in eval
    too; deterministic evaluation is the point of eval mode).
    `forward(x [B, T, d]) -> (router_output [B, T, E] zero off the top-k, indices [B, T, k])`.
    """

    def __init__(self, n_embed: int, num_experts: int, top_k: int) -> None:
        super().__init__(n_embed, num_experts, top_k, bias=True)

    @property
    def topkroute_linear(self) -> nn.Linear:
        return self.gate

    @property
    def noise_linear(self) -> nn.Linear:
        return self.noise_gate

    def forward(self, mh_output: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        check_input(mh_output, self.d_model, name="mh_output")
        routing = self.route(mh_output.reshape(-1, self.d_model))
        return _sparse_gates(routing, mh_output.shape[:-1])
