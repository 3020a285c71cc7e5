"""Auxiliary load-balancing losses of patched transformers models, from the routers' own
choices (the patched routers count them).

    switch_loss(logits, counts) -> Tensor          moekit's: the mean over MoE layers of
                                                   E * sum_e f_e * P_e (Switch Transformer)
    family_aux(model, out, mask) -> Tensor | None  the family's own, with its coefficient,
                                                   over the real tokens of a padded batch
    aux_loss_agreement(model) -> (theirs, ours)    transformers' aux loss and the same formula
                                                   with the choices the routers made
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .catalog import dummy_inputs
from .patch import patch_model
from .routers import Router

__all__ = ["aux_loss_agreement", "family_aux", "routers", "switch_loss"]


def routers(model: nn.Module) -> list[Router]:
    """The patched routers of a model, in module order (one per MoE layer)."""
    return [
        m.__dict__["forward"]
        for m in model.modules()
        if isinstance(m.__dict__.get("forward"), Router)
    ]


def switch_loss(logits: list[Tensor], counts: list[Tensor]) -> Tensor:
    """Mean over layers of E * sum_e f_e * P_e: f_e the (token, slot) pairs routed to e per
    token (the routers' own choices, `counts` [E] a layer), P_e the mean softmax probability of
    the layer's `logits` [N, E] (differentiable)."""
    losses = []
    for layer_logits, layer_counts in zip(logits, counts, strict=True):
        probs = F.softmax(layer_logits.float(), dim=-1)  # [N, E]
        share = layer_counts.to(probs) / probs.shape[0]  # [E]
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def family_aux(model: nn.Module, out, mask: Tensor) -> Tensor | None:
    """The family's auxiliary loss of a forward's `out` times its `router_aux_loss_coef`; over
    the real tokens of `mask` [b, T] (1: real) where the batch is padded and the family's
    module has `load_balancing_loss_func` (its own output averages over padding too)."""
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        return None
    getter = getattr(model, "get_base_model", None)  # the transformers model under a PeftModel
    base, config = getter() if getter is not None else model, model.config
    loss_fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    if not bool(mask.bool().all()) and loss_fn is not None:
        experts = getattr(base, "num_experts", None) or getattr(config, "num_local_experts", None)
        aux = loss_fn(out.router_logits, experts, config.num_experts_per_tok, mask)
    return (getattr(config, "router_aux_loss_coef", 0.0) or 0.0) * aux


@torch.no_grad()
def aux_loss_agreement(
    model: nn.Module, seed: int = 1, bias_std: float = 0.5
) -> tuple[float, float] | None:
    """(transformers' aux loss, the same formula with the routers' own choices) on a batch of
    `dummy_inputs`, or None where the model returns no aux loss. On a copy: its correction
    biases drawn N(0, bias_std) as a trained model's would be (at zero a sigmoid's top-k is a
    softmax's), its routers patched."""
    import copy

    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in [*model.named_buffers(), *model.named_parameters()]:
        if name.endswith(("correction_bias", "expert_bias")) and buffer.is_floating_point():
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * bias_std)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_model(model)
    found = routers(model)
    if not found:
        return None
    for router in found:
        router.counts = torch.zeros(0)
    try:
        out = model(**dummy_inputs(model, 3, 12, seed=seed), output_router_logits=True)
    except (TypeError, ValueError, IndexError):
        return None
    aux, logits = getattr(out, "aux_loss", None), getattr(out, "router_logits", None)
    if aux is None or not logits or len(logits) != len(found):
        return None
    counts = torch.stack([r.counts.float() for r in found]).sum(0)  # [E] all layers at once
    stacked = torch.cat([layer.reshape(-1, layer.shape[-1]).float() for layer in logits])
    if counts.numel() != stacked.shape[-1]:
        return None
    probs = F.softmax(stacked, dim=-1)  # [L*N, E]
    share = counts / probs.shape[0]
    ours = probs.shape[-1] * (share * probs.mean(0)).sum()
    return float(aux), float(ours)
