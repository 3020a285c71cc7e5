"""transformers' MoE models on moekit's engine: patch blocks in place, copy weights in and out.

Families (transformers >= 5, experts stored as `gate_up_proj` [E, 2h, d] and `down_proj`
[E, d, h], SiLU-gated): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3.

    patch_model(model) -> int     every supported block runs on moekit's routing, plan and
                                  experts, reading the model's own tensors in place
    unpatch_model(model) -> int   back to transformers' forwards
    moe_from_hf(block) -> MoE     a standalone moekit layer with copied weights
    moe_to_hf(layer, block)       and back (the round trip is exact)

What each family needs is core moekit: softmax top-k with or without renormalisation
(`norm_topk_prob`), sigmoid scores with a correction bias and group-limited choice scaled by
`routed_scaling_factor` (DeepSeek-V3), shared experts, gated (Qwen2-MoE) or not (DeepSeek-V3).

A patched block keeps its class, parameters and submodules: `state_dict`, `save_pretrained`,
optimizers and PEFT see nothing new. Its `forward` (and its router's) become instance
attributes, plain picklable objects; the router is still called as a module, so transformers'
output recorder still collects `router_logits` for the auxiliary loss.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import make_plan
from ..experts import ExpertBank, mode_of
from ..layers import MoE
from ..routing import router_dtype, sigmoid_routing, softmax_top_k

__all__ = ["patch_model", "unpatch_model", "moe_from_hf", "moe_to_hf", "is_patched"]


@dataclass(frozen=True)
class _Family:
    """How one transformers block class maps onto moekit."""

    router: str  # "softmax" | "sigmoid"
    shared: str | None  # attribute of the shared expert MLP, or None
    shared_gate: str | None  # attribute of its sigmoid gate (Linear d -> 1), or None


FAMILIES = {
    "MixtralSparseMoeBlock": _Family("softmax", None, None),
    "Qwen2MoeSparseMoeBlock": _Family("softmax", "shared_expert", "shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": _Family("softmax", None, None),
    "OlmoeSparseMoeBlock": _Family("softmax", None, None),
    "DeepseekV3MoE": _Family("sigmoid", "shared_experts", None),
}


def _family(block: nn.Module) -> _Family | None:
    return FAMILIES.get(type(block).__name__)


def _unsupported(block: nn.Module) -> str | None:
    """Why a block of a supported family cannot run on the engine, or None."""
    experts = block.experts
    config = getattr(experts, "config", None)
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        return f"hidden_act={act!r} (moekit's gated experts use SiLU)"
    for flag, want in (("has_bias", False), ("is_transposed", False), ("is_concatenated", True)):
        if getattr(experts, flag, want) != want:
            return f"experts.{flag}={not want}"
    if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        return "experts without gate_up_proj / down_proj tensors"
    return None


def _looks_like_moe(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("MoeBlock", "MoE", "SparseMoe")) or (
        hasattr(module, "experts") and hasattr(module, "gate") and not isinstance(module, MoE)
    )


class HFExperts(ExpertBank):
    """An `ExpertBank` over a transformers experts module's tensors, read in place at each
    call: w1 = gate_up_proj^T [E, d, 2h], w2 = down_proj^T [E, h, d] (views, no copies), so
    gradients, device moves and loaded weights reach the model's own parameters."""

    b1 = None
    b2 = None

    def __init__(self, experts: nn.Module) -> None:
        nn.Module.__init__(self)
        self.__dict__["source"] = experts  # not a submodule: the transformers model owns it
        num_experts, width, d_model = experts.gate_up_proj.shape
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, width // 2
        self.activation, self.dropout, self.backend = "swiglu", 0.0, "auto"

    @property
    def w1(self) -> Tensor:
        return self.source.gate_up_proj.transpose(1, 2)  # [E, d, 2h]

    @property
    def w2(self) -> Tensor:
        return self.source.down_proj.transpose(1, 2)  # [E, h, d]

    training = mode_of("source")


class _Router:
    """A transformers router's forward on moekit's routing: (router_logits, weights [N, k],
    indices [N, k]) as transformers returns them."""

    def __init__(self, gate: nn.Module, family: _Family) -> None:
        self.gate, self.family = gate, family

    def __call__(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gate = self.gate
        x = hidden_states.reshape(-1, gate.weight.shape[-1])  # [N, d]
        dtype = router_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), gate.weight.to(dtype))  # [N, E]
        if self.family.router == "sigmoid":  # DeepSeek-V3
            routing = sigmoid_routing(
                logits,
                gate.e_score_correction_bias,
                gate.top_k,
                gate.num_group,
                gate.topk_group,
                gate.norm_topk_prob,
            )
            weights = routing.weights * gate.routed_scaling_factor
            return logits, weights, routing.indices
        normalize = getattr(gate, "norm_topk_prob", True)  # Mixtral always renormalises
        weights, indices = softmax_top_k(logits, gate.top_k, normalize)
        return logits.to(x.dtype), weights.to(x.dtype), indices


class _Block:
    """A transformers MoE block's forward on moekit's plan and experts."""

    def __init__(self, block: nn.Module, family: _Family) -> None:
        self.block, self.family = block, family
        self.experts = HFExperts(block.experts)

    def __call__(self, hidden_states: Tensor) -> Tensor:
        block = self.block
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, d]
        jitter = getattr(block, "jitter_noise", 0.0)  # Mixtral's multiplicative input noise
        if block.training and jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        _, weights, indices = block.gate(x)  # a module call: transformers records the logits
        plan = make_plan(indices, weights, self.experts.num_experts)
        out = self.experts.dispatch(x, plan).to(x.dtype)  # [N, d]
        if self.family.shared is not None:
            shared = getattr(block, self.family.shared)(x)  # [N, d]
            if self.family.shared_gate is not None:
                shared = torch.sigmoid(getattr(block, self.family.shared_gate)(x)) * shared
            out = out + shared
        return out.reshape(shape)


def is_patched(block: nn.Module) -> bool:
    """Whether `block` runs on moekit (`patch_model`)."""
    return isinstance(block.__dict__.get("forward"), _Block)


def patch_model(model: nn.Module) -> int:
    """Run every MoE block of a transformers model on moekit's engine, in place.

    Blocks of the families Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 get moekit's
    routing (the same choice and weights), dispatch plan and fused experts; their parameters,
    buffers and submodules stay as they are. Other MoE-looking blocks are left alone, with one
    warning naming their class. Patching twice is a no-op.

    Args:
        model: A `torch.nn.Module`, typically a transformers `PreTrainedModel`.

    Returns:
        The number of blocks this call patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patched, skipped = 0, {}
    for module in model.modules():
        family = _family(module)
        if family is None:
            if _looks_like_moe(module) and not isinstance(module, nn.ModuleList):
                skipped.setdefault(type(module).__name__, "not a supported family")
            continue
        if is_patched(module):
            continue
        reason = _unsupported(module)
        if reason is not None:
            skipped.setdefault(type(module).__name__, reason)
            continue
        module.gate.forward = _Router(module.gate, family)
        module.forward = _Block(module, family)
        patched += 1
    for name, reason in skipped.items():
        warnings.warn(
            f"moekit.hf.patch_model left {name} blocks as they are: {reason}; supported: "
            f"{', '.join(FAMILIES)}",
            stacklevel=2,
        )
    return patched


def unpatch_model(model: nn.Module) -> int:
    """Undo `patch_model`: the blocks run transformers' own forwards again. Returns how many."""
    count = 0
    for module in model.modules():
        if is_patched(module):
            del module.forward
            module.gate.__dict__.pop("forward", None)
            count += 1
    return count


def _check_block(block: nn.Module) -> _Family:
    family = _family(block)
    if family is None:
        raise TypeError(
            f"block must be a transformers MoE block of {', '.join(FAMILIES)}, "
            f"got {type(block).__name__}"
        )
    reason = _unsupported(block)
    if reason is not None:
        raise ValueError(f"{type(block).__name__} cannot run on moekit: {reason}")
    return family


def _shared_linears(block: nn.Module, family: _Family) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    mlp = getattr(block, family.shared)
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def moe_from_hf(block: nn.Module, **kwargs) -> MoE:
    """A standalone moekit `MoE` with the weights of a transformers MoE block (copied).

    The layer computes what the block computes (same routing, experts and shared experts).
    `kwargs` go to `MoE` (e.g. `load_balance_coef`; default 0: transformers adds its
    auxiliary loss at the model level).
    """
    family = _check_block(block)
    gate, experts = block.gate, block.experts
    num_experts, width, d_model = experts.gate_up_proj.shape
    options: dict = {"load_balance_coef": 0.0}
    if family.router == "sigmoid":
        options.update(
            router="sigmoid",
            num_groups=gate.num_group,
            top_k_groups=gate.topk_group,
            normalize=gate.norm_topk_prob,
            scaling_factor=float(gate.routed_scaling_factor),
        )
    else:
        options.update(router="softmax", normalize=getattr(gate, "norm_topk_prob", True))
    if family.shared is not None:
        gate_proj = _shared_linears(block, family)[0]
        options.update(
            num_shared_experts=1,
            shared_d_hidden=gate_proj.out_features,
            shared_gate=family.shared_gate is not None,
        )
    options.update(kwargs)
    layer = MoE(d_model, num_experts, gate.top_k, width // 2, "swiglu", **options)
    layer.router.jitter_eps = float(getattr(block, "jitter_noise", 0.0))
    layer.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
    _copy(layer, block, family, to_hf=False)
    return layer


def moe_to_hf(layer: MoE, block: nn.Module) -> None:
    """Copy a moekit `MoE`'s weights into a transformers MoE block of the same sizes."""
    family = _check_block(block)
    if not isinstance(layer, MoE) or not isinstance(layer.experts, ExpertBank):
        raise TypeError("layer must be a moekit MoE with an ExpertBank (moe_from_hf builds one)")
    want = tuple(block.experts.gate_up_proj.shape)
    got = (layer.num_experts, 2 * layer.experts.d_hidden, layer.d_model)
    if got != want or layer.experts.activation != "swiglu":
        raise ValueError(f"layer has SwiGLU experts {got}, the block's gate_up_proj is {want}")
    if (family.shared is None) != (layer.shared_experts is None):
        raise ValueError("layer and block must both have shared experts or both have none")
    _copy(layer, block, family, to_hf=True)


@torch.no_grad()
def _copy(layer: MoE, block: nn.Module, family: _Family, to_hf: bool) -> None:
    """The pairs (moekit tensor, transformers tensor), copied one way or the other."""
    pairs = [
        (layer.router.gate.weight, block.gate.weight),
        (layer.experts.w1, block.experts.gate_up_proj.transpose(1, 2)),
        (layer.experts.w2, block.experts.down_proj.transpose(1, 2)),
    ]
    if family.router == "sigmoid":
        pairs.append((layer.router.expert_bias, block.gate.e_score_correction_bias))
    if family.shared is not None:
        gate_proj, up_proj, down_proj = _shared_linears(block, family)
        mlp = layer.shared_experts.mlp
        h = gate_proj.out_features
        pairs += [
            (mlp.fc1.weight[:h], gate_proj.weight),
            (mlp.fc1.weight[h:], up_proj.weight),
            (mlp.fc2.weight, down_proj.weight),
        ]
        if family.shared_gate is not None:
            shared_gate = getattr(block, family.shared_gate)
            pairs.append((layer.shared_experts.gate.weight, shared_gate.weight))
    for ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ValueError(f"shape mismatch: moekit {tuple(ours.shape)} vs {tuple(theirs.shape)}")
        (theirs if to_hf else ours).copy_(ours if to_hf else theirs)
