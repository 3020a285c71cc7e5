"""The Hugging Face peer of the layer benchmark: transformers' `MixtralSparseMoeBlock`.

Built from a `MixtralConfig` of the shape with `experts_implementation="grouped_mm"` (its
fastest stock path) and moekit's weights copied in, so both layers compute the same function:
Mixtral's router is moekit's "softmax" router (softmax, top-k, renormalised, no bias) and its
experts are SwiGLU with gate | up concatenated, as `ExpertBank` stores them (transposed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._extras import require
from ..experts import ExpertBank
from ..layers import MoE
from ..routing import SoftmaxRouter


def available() -> bool:
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except ImportError:
        return False
    return True


class HFMixtralPeer(nn.Module):
    """`MixtralSparseMoeBlock` on [N, d] tokens, returning [N, d]."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x.unsqueeze(0)).squeeze(0)


def mixtral_peer(moe: MoE, implementation: str = "grouped_mm") -> HFMixtralPeer:
    """transformers' Mixtral block holding `moe`'s weights (a SwiGLU `ExpertBank` without
    biases behind a normalised "softmax" router without bias)."""
    require("transformers", "hf", "The benchmark's Hugging Face peer")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    bank, router = moe.experts, moe.router
    if not (isinstance(bank, ExpertBank) and bank.activation == "swiglu" and bank.b1 is None):
        raise ValueError("the Mixtral peer needs a SwiGLU ExpertBank without biases")
    if not isinstance(router, SoftmaxRouter) or router.gate.bias is not None:
        raise ValueError("the Mixtral peer needs moekit's softmax router without bias")
    config = MixtralConfig(
        hidden_size=bank.d_model,
        intermediate_size=bank.d_hidden,
        num_local_experts=bank.num_experts,
        num_experts_per_tok=moe.top_k,
        hidden_act="silu",
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).to(device=bank.w1.device, dtype=bank.w1.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(router.gate.weight)  # [E, d]
        block.experts.gate_up_proj.copy_(bank.w1.transpose(1, 2))  # [E, 2h, d]
        block.experts.down_proj.copy_(bank.w2.transpose(1, 2))  # [E, d, h]
    return HFMixtralPeer(block)
