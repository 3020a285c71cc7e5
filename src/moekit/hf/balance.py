"""Aux-loss-free balancing (DeepSeek-V3) for patched transformers routers.

correction_biases(model) -> {buffer name: (Router, bias [E])}
update_biases(biases, loads, rate)   bias_e += rate * sign(mean load - load_e)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .patch import holds_experts, router_of
from .routers import Router, attribute

__all__ = ["correction_biases", "update_biases"]


def correction_biases(model: nn.Module) -> dict[str, tuple[Router, Tensor]]:
    """{buffer name: (patched router, its correction bias [E])}: the rule's `choice_bias` on
    the router, or on the block where the block passes it in (`"arg"`)."""
    names = {id(t): n for n, t in model.named_buffers()}
    names |= {id(t): n for n, t in model.named_parameters()}
    found = {}
    for block in (m for m in model.modules() if holds_experts(m)):
        router, rule = router_of(block)
        if router is None or not isinstance(router.__dict__.get("forward"), Router):
            continue
        if rule.choice_bias == "arg":
            candidates = [
                getattr(block, n, None) for n in ("e_score_correction_bias", "expert_bias")
            ]
        else:
            candidates = [attribute(router, rule.choice_bias)]
        bias = next((c for c in candidates if isinstance(c, Tensor)), None)
        if bias is not None and id(bias) in names:
            found[names[id(bias)]] = (router.__dict__["forward"], bias)
    if not found:
        raise ValueError(
            "--router-bias-update: no router of this model chooses with a correction bias "
            "(DeepSeek-V3-style sigmoid routers do)"
        )
    return found


@torch.no_grad()
def update_biases(biases: list[Tensor], loads: list[Tensor], rate: float) -> None:
    """bias_e += rate * sign(mean load - load_e), each router's bias [E] with its step's token
    counts [E] (over the global batch)."""
    for bias, load in zip(biases, loads, strict=True):
        load = load.to(bias.device)
        if load.numel() == bias.numel():
            step = torch.sign(load.mean() - load).to(bias.dtype).view_as(bias)
            bias.add_(step, alpha=rate)
