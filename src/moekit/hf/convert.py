"""A transformers MoE block's weights into a standalone moekit `MoE`, and back.

    moe_from_hf(block) -> MoE     the same routing, experts and shared experts (copied)
    moe_to_hf(layer, block)       and back (the round trip is exact)

For the blocks of `BLOCKS` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) whose experts
are SiLU-gated, concatenated [gate | up] and unbiased.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import ExpertBank
from ..layers import MoE
from .experts import fast_activation, layout_of
from .patch import router_of, unsupported

__all__ = ["moe_from_hf", "moe_to_hf"]

# the blocks moe_from_hf copies: their shared expert MLP and its sigmoid gate, if any
BLOCKS: dict[str, tuple[str | None, str | None]] = {
    "MixtralSparseMoeBlock": (None, None),
    "Qwen2MoeSparseMoeBlock": ("shared_expert", "shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": (None, None),
    "OlmoeSparseMoeBlock": (None, None),
    "DeepseekV3MoE": ("shared_experts", None),
}


def _check_block(block: nn.Module) -> tuple[str | None, str | None]:
    shared = BLOCKS.get(type(block).__name__)
    if shared is None:
        raise TypeError(
            f"block must be a transformers MoE block of {', '.join(BLOCKS)}, "
            f"got {type(block).__name__}"
        )
    _, rule = router_of(block)
    reason = unsupported(block, rule)
    layout = layout_of(block.experts)
    if reason is None and (
        fast_activation(block.experts, layout) != "swiglu"
        or layout.is_transposed
        or layout.has_bias
    ):
        reason = "moe_from_hf copies SiLU-gated, unbiased [gate | up] experts only"
    if reason is not None:
        raise ValueError(f"{type(block).__name__} cannot become a moekit MoE: {reason}")
    return shared


def _sigmoid(block: nn.Module) -> bool:
    return router_of(block)[1].score == "sigmoid"


def _shared_linears(block: nn.Module, shared: str) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    mlp = getattr(block, shared)
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def moe_from_hf(block: nn.Module, **kwargs) -> MoE:
    """A standalone moekit `MoE` with the weights of a transformers MoE block (copied).

    The layer computes what the block computes (same routing, experts and shared experts).
    `kwargs` go to `MoE` (e.g. `load_balance_coef`; default 0: transformers adds its
    auxiliary loss at the model level).
    """
    shared, shared_gate = _check_block(block)
    gate, experts = block.gate, block.experts
    num_experts, width, d_model = experts.gate_up_proj.shape
    options: dict = {"load_balance_coef": 0.0}
    if _sigmoid(block):
        options.update(
            router="sigmoid",
            num_groups=gate.num_group,
            top_k_groups=gate.topk_group,
            normalize=gate.norm_topk_prob,
            scaling_factor=float(gate.routed_scaling_factor),
        )
    else:
        options.update(router="softmax", normalize=getattr(gate, "norm_topk_prob", True))
    if shared is not None:
        gate_proj = _shared_linears(block, shared)[0]
        options.update(
            num_shared_experts=1,
            shared_d_hidden=gate_proj.out_features,
            shared_gate=shared_gate is not None,
        )
    options.update(kwargs)
    layer = MoE(d_model, num_experts, gate.top_k, width // 2, "swiglu", **options)
    layer.router.jitter_eps = float(getattr(block, "jitter_noise", 0.0))
    layer.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
    _copy(layer, block, shared, shared_gate, to_hf=False)
    return layer


def moe_to_hf(layer: MoE, block: nn.Module) -> None:
    """Copy a moekit `MoE`'s weights into a transformers MoE block of the same sizes."""
    shared, shared_gate = _check_block(block)
    if not isinstance(layer, MoE) or not isinstance(layer.experts, ExpertBank):
        raise TypeError("layer must be a moekit MoE with an ExpertBank (moe_from_hf builds one)")
    want = tuple(block.experts.gate_up_proj.shape)
    got = (layer.num_experts, 2 * layer.experts.d_hidden, layer.d_model)
    if got != want or layer.experts.activation != "swiglu":
        raise ValueError(f"layer has SwiGLU experts {got}, the block's gate_up_proj is {want}")
    if (shared is None) != (layer.shared_experts is None):
        raise ValueError("layer and block must both have shared experts or both have none")
    _copy(layer, block, shared, shared_gate, to_hf=True)


@torch.no_grad()
def _copy(
    layer: MoE, block: nn.Module, shared: str | None, shared_gate: str | None, to_hf: bool
) -> None:
    """The pairs (moekit tensor, transformers tensor), copied one way or the other."""
    pairs = [
        (layer.router.gate.weight, block.gate.weight),
        (layer.experts.w1, block.experts.gate_up_proj.transpose(1, 2)),
        (layer.experts.w2, block.experts.down_proj.transpose(1, 2)),
    ]
    if _sigmoid(block):
        pairs.append((layer.router.expert_bias, block.gate.e_score_correction_bias))
    if shared is not None:
        gate_proj, up_proj, down_proj = _shared_linears(block, shared)
        mlp = layer.shared_experts.mlp
        h = gate_proj.out_features
        pairs += [
            (mlp.fc1.weight[:h], gate_proj.weight),
            (mlp.fc1.weight[h:], up_proj.weight),
            (mlp.fc2.weight, down_proj.weight),
        ]
        if shared_gate is not None:
            pairs.append((layer.shared_experts.gate.weight, getattr(block, shared_gate).weight))
    for ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ValueError(f"shape mismatch: moekit {tuple(ours.shape)} vs {tuple(theirs.shape)}")
        (theirs if to_hf else ours).copy_(ours if to_hf else theirs)
