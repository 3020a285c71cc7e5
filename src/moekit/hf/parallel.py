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

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.comm import process_group
from ..parallel.expert_parallel import ExpertParallel
from .blocks import Experts
from .experts import QUANT_SPEC
from .patch import experts_of, holds_experts, is_patched, router_of
from .stream import LOCAL, SHARD, stacked_names

__all__ = ["expert_parallel", "sharded_parameters"]


def _shard(experts: nn.Module, rank: int, local: int, num_experts: int) -> None:
    """Keep experts rank*local .. (rank+1)*local - 1 of each stacked tensor: the rows the
    streaming loader read for this rank (`hf.stream`), else a copy of the full tensor's."""
    first = rank * local
    loaded = experts.__dict__.get(SHARD)
    if loaded is not None and loaded[1] != loaded[2] and loaded[:2] != (first, local):
        raise ValueError(
            f"expert_parallel: the experts were loaded for experts {loaded[0]}.."
            f"{loaded[0] + loaded[1] - 1}, this rank holds {first}..{first + local - 1}"
        )
    spec = experts.__dict__.get(QUANT_SPEC, {})
    rows = experts.__dict__.pop(LOCAL, {})
    for name in stacked_names(experts):
        full = experts._parameters.get(name)
        if name in spec:  # quantised: the buffers hold the rows, the weight has no memory
            scheme, shape, dtype = spec[name]
            if shape[0] != local:  # quantised whole: this rank's rows of the buffers
                for part in ("qdata", "qscales"):
                    buffer = experts.get_buffer(f"{name}_{part}")
                    experts.register_buffer(f"{name}_{part}", buffer[first : first + local].clone())
                spec[name] = (scheme, (local, *shape[1:]), dtype)
            meta = experts.__dict__.get(name, full)
            experts._parameters.pop(name, None)
            experts.__dict__[name] = torch.empty(
                (local, *meta.shape[1:]), dtype=meta.dtype, device="meta"
            )
            continue
        part = rows.get(name)
        if part is None:
            part = full.detach()[first : first + local].clone()
        part = part.to(full.dtype)
        setattr(experts, name, nn.Parameter(part, requires_grad=full.requires_grad))
    experts.__dict__[SHARD] = (first, local, num_experts)


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
        _shard(experts, rank, num_experts // size, num_experts)
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
            for pname in stacked_names(experts):
                param = experts._parameters.get(pname)
                if param is None:  # quantised: buffers, not trained
                    continue
                found[names[id(param)]] = (
                    forward.parallel.first_expert,
                    forward.parallel.num_experts,
                )
    return found
