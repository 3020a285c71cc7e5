"""Patch transformers' MoE blocks in place to run on moekit: routing, plan, experts.

    patch_model(model, strict=False) -> int   every block of a family in `families.RULES`
    unpatch_model(model) -> int               back to transformers' forwards
    is_patched(block)

A patched block keeps its class, parameters and submodules: `state_dict`, `save_pretrained`,
optimizers and PEFT see nothing new. Its `forward` (and its router's) become instance
attributes, plain picklable objects; the router is still called as a module, so transformers'
output recorder still collects `router_logits` for the auxiliary loss. The experts run by
`backend.run_experts` (moekit's fused kernels, or its grouped GEMMs around the module's own
gate function), reading the module's tensors at each call.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import make_plan
from ..layers import MoE
from ..routing import router_dtype, sigmoid_routing, softmax_top_k
from .backend import run_experts
from .experts import layout_of, unsupported_weights
from .families import RULES, FamilyRule

__all__ = ["is_patched", "patch_model", "rule_for", "unpatch_model", "unsupported"]

_MOE_NAME = re.compile(r"(MoE|SparseMoe|SparseMoeBlock|MoeBlock)$")


def rule_for(block: nn.Module) -> FamilyRule | None:
    """The family rule of a block's class, or None."""
    return RULES.get(type(block).__name__)


def _normalize(router: nn.Module, rule: FamilyRule) -> bool:
    if isinstance(rule.normalize, bool):
        return rule.normalize
    return bool(getattr(router, rule.normalize))


def unsupported(block: nn.Module, rule: FamilyRule) -> str | None:
    """Why a block of a family in the table cannot run on moekit, or None."""
    experts, router = getattr(block, "experts", None), getattr(block, rule.router_attr, None)
    if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
        return f"no experts / {rule.router_attr} submodules"
    reason = unsupported_weights(experts, layout_of(experts))
    if reason is not None:
        return reason
    if rule.router_bias and getattr(router, "bias", None) is None:
        return "its router has no bias"
    return None


def holds_experts(module: nn.Module) -> bool:
    """Whether a module is an MoE block: it has an `experts` submodule, or its class says MoE.
    The experts modules themselves (and lists of experts) are not blocks."""
    if isinstance(module, (nn.ModuleList, MoE)) or hasattr(module, "has_gate"):
        return False
    return isinstance(getattr(module, "experts", None), nn.Module) or bool(
        _MOE_NAME.search(type(module).__name__)
    )


class _Router:
    """A transformers router's forward on moekit's routing: (router_logits, weights [N, k],
    indices [N, k]) as transformers returns them."""

    def __init__(self, gate: nn.Module, rule: FamilyRule) -> None:
        self.gate, self.rule = gate, rule

    def __call__(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gate, rule = self.gate, self.rule
        x = hidden_states.reshape(-1, gate.weight.shape[-1])  # [N, d]
        dtype = router_dtype(x.dtype)
        bias = gate.bias.to(dtype) if rule.router_bias else None
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), gate.weight.to(dtype), bias)  # [N, E] fp32
        normalize = _normalize(gate, rule)
        if rule.router == "sigmoid":  # DeepSeek-V3
            routing = sigmoid_routing(
                logits,
                gate.e_score_correction_bias,
                gate.top_k,
                gate.num_group,
                gate.topk_group,
                normalize,
            )
            weights = routing.weights * gate.routed_scaling_factor
            return logits, weights, routing.indices
        weights, indices = softmax_top_k(logits, gate.top_k, normalize)
        return logits.to(x.dtype), weights.to(x.dtype), indices


class _Block:
    """A transformers MoE block's forward on moekit's plan and experts."""

    def __init__(self, block: nn.Module, rule: FamilyRule) -> None:
        self.block, self.rule = block, rule
        self.layout = layout_of(block.experts)

    def __call__(self, hidden_states: Tensor):
        block, rule = self.block, self.rule
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, d]
        jitter = getattr(block, rule.jitter, 0.0) if rule.jitter else 0.0
        if block.training and jitter > 0:  # Mixtral's multiplicative input noise
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        router = getattr(block, rule.router_attr)
        _, weights, indices = router(x)  # a module call: transformers records the logits
        plan = make_plan(indices, weights, block.experts.down_proj.shape[0])
        out = run_experts(block.experts, self.layout, x, plan)  # [N, d]
        if rule.shared is not None:
            shared = getattr(block, rule.shared)(x)  # [N, d]
            if rule.shared_gate is not None:
                shared = torch.sigmoid(getattr(block, rule.shared_gate)(x)) * shared
            out = out + shared
        out = out.reshape(shape)
        return (out, weights) if rule.returns == "hidden, scores" else out


def is_patched(block: nn.Module) -> bool:
    """Whether `block` runs on moekit (`patch_model`)."""
    return isinstance(block.__dict__.get("forward"), _Block)


def patch_model(model: nn.Module, strict: bool = False) -> int:
    """Run every MoE block of a transformers model on moekit's engine, in place.

    Blocks whose class has a rule in `moekit.hf.families.RULES` get moekit's routing (the
    same choice and weights), dispatch plan and experts; their parameters, buffers and
    submodules stay as they are. Every other module that holds experts is left alone and
    named, with its reason, in one warning. Patching twice is a no-op.

    Args:
        model: A `torch.nn.Module`, typically a transformers `PreTrainedModel`.
        strict: Raise instead of warning when a block that holds experts is left alone.

    Returns:
        The number of blocks this call patched.

    Raises:
        TypeError: `model` is not a module.
        ValueError: `strict` and some block could not be patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patched, skipped = 0, {}
    for module in model.modules():
        rule = rule_for(module)
        if rule is None:
            if holds_experts(module):
                skipped.setdefault(type(module).__name__, _no_rule_reason(module))
            continue
        if is_patched(module):
            continue
        reason = unsupported(module, rule)
        if reason is not None:
            skipped.setdefault(type(module).__name__, reason)
            continue
        router = getattr(module, rule.router_attr)
        router.forward = _Router(router, rule)
        module.forward = _Block(module, rule)
        patched += 1
    if skipped:
        lines = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        message = f"moekit.hf.patch_model left these MoE blocks as they are: {lines}"
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return patched


def _no_rule_reason(module: nn.Module) -> str:
    experts = getattr(module, "experts", None)
    if isinstance(experts, nn.Module) and hasattr(experts, "has_gate"):
        return (
            "no family rule for its router (its experts run on moekit with "
            'experts_implementation="moekit")'
        )
    return "no family rule, and its experts are not on transformers' ExpertsInterface"


def unpatch_model(model: nn.Module) -> int:
    """Undo `patch_model`: the blocks run transformers' own forwards again. Returns how many."""
    count = 0
    for module in model.modules():
        if is_patched(module):
            rule = module.forward.rule
            del module.forward
            getattr(module, rule.router_attr).__dict__.pop("forward", None)
            count += 1
    return count
