"""The experts (and, where the block needs it, the block) of a patched transformers MoE block.

    Experts(experts)         stacked experts called as `experts(x [T, d], top_k_index [T, k],
                             top_k_weights [T, k])`: moekit's plan and kernels
    ModuleExperts(experts)   a dict or list of expert modules called with a one-hot dispatch
                             mask (Switch Transformers): moekit's plan, gather and combine
                             around each expert's own forward
    Llama4Block(block)       Llama 4's block, whose experts take every token with its routing
                             weight on the input: moekit's plan over the k chosen pairs only
    DbrxBlock(block)         DBRX's block: softmax top-k renormalised by a p-norm, experts
                             stored as gate / up / down [E*h, d] (not on the interface)

Each is a plain picklable object set as the module's `forward`; it reads the module's tensors
at each call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..dispatch import make_plan
from ..ops import combine, gather
from ..routing import softmax_top_k
from .backend import _linear, _run, run_experts
from .experts import layout_of

__all__ = ["DbrxBlock", "Experts", "Llama4Block", "ModuleExperts"]


class Experts:
    """A stacked experts module's forward on moekit (the experts backend's function)."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return _run(self.experts, hidden_states, top_k_index, top_k_weights)


class ModuleExperts:
    """Experts that are modules of their own (`expert_0`, ...), called with transformers'
    one-hot dispatch mask [N, 1, E] (dropped tokens all zero) and weights [N, 1]."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts

    def __call__(self, hidden_states: Tensor, dispatch_mask: Tensor, weights: Tensor) -> Tensor:
        modules = list(
            self.experts.values() if isinstance(self.experts, nn.ModuleDict) else self.experts
        )
        num_tokens, num_experts = hidden_states.shape[0], len(modules)
        mask = dispatch_mask.reshape(num_tokens, num_experts)  # [N, E]
        kept = mask.any(-1).nonzero().squeeze(-1)  # [N'] tokens an expert took
        indices = mask.index_select(0, kept).argmax(-1, keepdim=True)  # [N', 1]
        plan = make_plan(indices, weights.reshape(num_tokens, 1).index_select(0, kept), num_experts)
        x = hidden_states.index_select(0, kept)  # [N', d]
        rows = gather(x, plan.token_index, plan.pair_index, plan.top_k)  # [M, d]
        sizes = plan.group_sizes.tolist()  # one host read: the experts run one by one
        outs = [
            module(part)
            for module, part, size in zip(modules, rows.split(sizes), sizes, strict=True)
            if size
        ]
        out = torch.cat(outs) if outs else rows.new_zeros(0, hidden_states.shape[-1])
        routed = combine(
            out.to(hidden_states.dtype),
            plan.slot_weight.to(hidden_states.dtype),
            plan.token_index,
            x.shape[0],
            plan.pair_index,
            plan.top_k,
        )  # [N', d]
        return torch.zeros_like(hidden_states).index_copy(0, kept, routed)


def _own_experts(block: nn.Module) -> nn.Module:
    """The block's experts module itself: a PEFT wrapper adds its delta only inside its own
    forward, which these blocks do not call, so they refuse it rather than train nothing."""
    experts = block.experts
    if isinstance(getattr(experts, "base_layer", None), nn.Module):
        raise TypeError(
            f"{type(block).__name__}: PEFT adapters on its experts ({type(experts).__name__}) "
            "do not reach moekit's block; moekit.hf.unpatch_model(model) to train them"
        )
    return experts


class Llama4Block:
    """Llama 4's MoE block: sigmoid top-k weights scaling the chosen experts' inputs, plus the
    shared expert. transformers runs every expert on every token (weights 0 but for the
    chosen); moekit runs the k chosen pairs. Returns (hidden [N, d], router logits [N, E])."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.layout = layout_of(block.experts, is_transposed=True)

    def __call__(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        block = self.block
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, d]
        scores, logits = block.router(x)  # [N, E] the k weights, 0 elsewhere
        indices = torch.topk(logits, block.router.top_k, dim=-1).indices  # the router's choice
        plan = make_plan(indices, scores.gather(-1, indices), scores.shape[-1])
        experts = _own_experts(block)
        out = block.shared_expert(x) + run_experts(experts, self.layout, x, plan, True)
        return out, logits


class DbrxBlock:
    """DBRX's FFN: the router's logits, softmax top-k (moekit's `softmax_top_k`), the k
    weights renormalised by their `moe_normalize_expert_weights`-norm; experts w1 (gate), v1
    (up) and w2 (down, transposed) stored as [E*h, d]: moekit's gather, grouped GEMMs over
    views of them, the module's activation, moekit's combine."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, hidden_states: Tensor) -> Tensor:
        block = self.block
        mlp = _own_experts(block).mlp
        shape = hidden_states.shape
        logits = block.router(hidden_states)  # [N, E] fp32
        weights, indices = softmax_top_k(logits, block.top_k, normalize=False)  # [N, k]
        stats = block.router.__dict__.get("forward")
        if getattr(stats, "counts", None) is not None:
            stats._count_ids(indices, logits)
        p = block.moe_normalize_expert_weights
        if p is not None:
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        num_experts, d_model = logits.shape[-1], shape[-1]
        x = hidden_states.reshape(-1, d_model)  # [N, d]
        plan = make_plan(indices, weights, num_experts)
        gate = mlp.w1.view(num_experts, -1, d_model).transpose(1, 2)  # [E, d, h]
        up = mlp.v1.view(num_experts, -1, d_model).transpose(1, 2)  # [E, d, h]
        down = mlp.w2.view(num_experts, -1, d_model)  # [E, h, d]
        offsets = torch.cumsum(plan.group_sizes, 0).to(torch.int32)  # [E]
        rows = gather(x.to(gate.dtype), plan.token_index, plan.pair_index, plan.top_k)  # [M, d]
        hidden = mlp.activation_fn(_linear(rows, gate, plan.group_sizes, offsets)) * _linear(
            rows, up, plan.group_sizes, offsets
        )  # [M, h]
        out = _linear(hidden, down, plan.group_sizes, offsets)  # [M, d]
        routed = combine(
            out,
            plan.slot_weight.to(out.dtype),
            plan.token_index,
            x.shape[0],
            plan.pair_index,
            plan.top_k,
        )  # [N, d]
        return routed.to(hidden_states.dtype).reshape(shape)
