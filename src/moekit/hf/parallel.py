"""Expert parallelism for patched transformers models: each of R ranks holds E/R experts of
every MoE block; moekit's all-to-all dispatch (`moekit.parallel.ExpertParallel`, the one the
`MoE` layers use) sends each routed row to its expert's rank and back.

    expert_parallel(model, group, data_group=None) -> int   blocks sharded

Call it on the same full model on every rank (same weights: load or seed alike) after
`patch_model`; rank r keeps experts r*E/R .. (r+1)*E/R - 1 of each block (a copy: the full
tensors are released). Routers, shared experts and every other parameter stay replicated:
average their gradients over the data-parallel ranks as for any data-parallel model. PEFT LoRA
adapters on the experts (`target_parameters`) stay whole and replicated too (E * r * (in + out)
numbers a weight): each rank computes the terms of its own experts, so their gradients are zero
outside its slice and averaging them over the ranks is right.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..parallel.comm import process_group
from ..parallel.expert_parallel import ExpertParallel
from .blocks import Experts
from .experts import layout_of
from .patch import experts_of, holds_experts, is_patched, router_of

__all__ = ["expert_parallel", "sharded_parameters"]


def _stacked(experts: nn.Module) -> list[str]:
    """The experts' parameters stacked over experts (dim 0 = E): weights and biases."""
    layout = layout_of(experts)
    names = [layout.up_name, "down_proj"]
    if layout.has_bias:
        names += [f"{layout.up_name}_bias", "down_proj_bias"]
    return names


def expert_parallel(
    model: nn.Module, group=None, *, data_group: dist.ProcessGroup | None = None
) -> int:
    """Shard the experts of every patched MoE block of `model` over `group`, in place.

    Args:
        model: A transformers model after `moekit.hf.patch_model`.
        group: A ProcessGroup, a 1-D DeviceMesh, or None (the default group).
        data_group: The ranks that see distinct tokens (statistics); None: the default group.

    Returns:
        The number of blocks sharded.

    Raises:
        ValueError: a block that holds experts but is not patched, one whose experts are not
            stacked on transformers' interface (Llama 4, DBRX, Switch), E not divisible by R,
            or a model with no MoE block: never a silent no-op.
    """
    group = process_group(group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = [m for m in model.modules() if holds_experts(m)]
    if not blocks:
        raise ValueError("expert_parallel: the model has no MoE block to shard")
    plans = []
    for block in blocks:
        name = type(block).__name__
        forward = experts_of(block).__dict__.get("forward") if is_patched(block) else None
        if not isinstance(forward, Experts):
            kind = router_of(block)[1]
            why = (
                "not patched (call moekit.hf.patch_model first)"
                if kind is None or not is_patched(block)
                else f"its experts are not stacked transformers experts (block {kind.block!r})"
            )
            raise ValueError(f"expert_parallel: {name} {why}")
        if forward.parallel is not None:
            raise ValueError(f"expert_parallel: {name} is already expert-parallel")
        num_experts = experts_of(block).down_proj.shape[0]
        if num_experts % size:
            raise ValueError(
                f"expert_parallel: {name} has {num_experts} experts, not divisible by the "
                f"expert-parallel group size R={size}"
            )
        plans.append((experts_of(block), forward, num_experts))
    for experts, forward, num_experts in plans:
        local = num_experts // size
        for pname in _stacked(experts):
            full = getattr(experts, pname)
            part = full.detach()[rank * local : (rank + 1) * local].clone()
            setattr(experts, pname, nn.Parameter(part, requires_grad=full.requires_grad))
        forward.parallel = ExpertParallel(group, data_group, num_experts)
    return len(plans)


def sharded_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (first expert, num_experts global)} of the sharded experts."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for block in (m for m in model.modules() if holds_experts(m) and is_patched(m)):
        experts = experts_of(block)
        forward = experts.__dict__.get("forward")
        if isinstance(forward, Experts) and forward.parallel is not None:
            for pname in _stacked(experts):
                param = getattr(experts, pname)
                found[names[id(param)]] = (
                    forward.parallel.first_expert,
                    forward.parallel.num_experts,
                )
    return found
