"""Expert parallelism for patched transformers models: each of R ranks holds E/R experts of
every MoE block; moekit's all-to-all dispatch (`moekit.parallel.ExpertParallel`, the one the
`MoE` layers use) sends each routed row to its expert's rank and back.

    expert_parallel(model, group, data_group=None) -> int   blocks sharded
    sharded_parameters(model) -> {name: (first expert, E)}  the expert shards
    adapter_shards(model) -> {name: AdapterShard}           PEFT's LoRA factors on experts
    with adapters_cut_as_made(peft): get_peft_model(...)    factors cut as each is made

Call it on the same full model on every rank (same weights: load or seed alike) after
`patch_model`; rank r keeps experts r*E/R .. (r+1)*E/R - 1 of each block (a copy: the full
tensors are released). Routers, shared experts and every other parameter stay replicated:
average their gradients over the data-parallel ranks as for any data-parallel model.

PEFT LoRA adapters on the experts (`target_parameters`: a `ParamWrapper`'s lora_A [r E, in],
expert-major, and lora_B [out, r E], expert-minor) are sharded alike: rank r keeps its
experts' factors, lora_A [r E/R, in] and lora_B [out, r E/R], and the wrapper's `num_experts`
becomes E/R, so PEFT's `get_delta_factors` gives this rank's experts' factors. Their
gradients are those of the expert shards: summed over the replicas of a shard, never over the
EP group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..parallel.comm import process_group
from ..parallel.expert_parallel import ExpertParallel
from .blocks import Experts
from .experts import QUANT_SPEC
from .patch import experts_of, holds_experts, is_patched, router_of
from .stream import LOCAL, SHARD, stacked_names

__all__ = [
    "AdapterShard",
    "adapter_shards",
    "adapters_cut_as_made",
    "expert_parallel",
    "sharded_parameters",
]


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
    for wrapper, experts in _adapter_wrappers(model):
        forward = experts.__dict__["forward"]
        if forward.parallel is not None:
            _shard_adapter(wrapper, forward.parallel.first_expert, forward.parallel.num_local)
    return len(plans)


def _wraps_experts(module: nn.Module) -> nn.Module | None:
    """The stacked experts module under a PEFT ParamWrapper of a 3-D weight, else None."""
    if type(module).__name__ != "ParamWrapper" or getattr(module, "_param_ndim", 2) != 3:
        return None
    inner = module
    while isinstance(getattr(inner, "base_layer", None), nn.Module):
        inner = inner.base_layer
    return inner


def _adapter_wrappers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(PEFT ParamWrapper, the experts module it wraps) of every LoRA on stacked experts."""
    found = []
    for module in model.modules():
        inner = _wraps_experts(module)
        if inner is not None and isinstance(inner.__dict__.get("forward"), Experts):
            found.append((module, inner))
    return found


@contextmanager
def adapters_cut_as_made(peft) -> Iterator[None]:
    """Within it, PEFT's LoRA factors on experts that the loader read for one rank only
    (`hf.stream`'s EP shard) are cut to that rank's experts as each ParamWrapper is made.

    PEFT draws each wrapper's whole factors (lora_A [r E, in] from the RNG, as one process
    does: the same values at any R); here they live one wrapper at a time, not the whole
    model's at once before `expert_parallel` cuts them (for Qwen3-30B-A3B at r=8, 1.2 GB of
    float32 on every rank)."""
    wrapper = peft.tuners.lora.layer.ParamWrapper
    made = wrapper.update_layer

    def update_layer(self, *args, **kwargs):
        made(self, *args, **kwargs)
        experts = _wraps_experts(self)
        loaded = None if experts is None else experts.__dict__.get(SHARD)
        if loaded is not None and loaded[2] == self.num_experts:  # (first, local, E)
            _shard_adapter(self, loaded[0], loaded[1])

    wrapper.update_layer = update_layer
    try:
        yield
    finally:
        wrapper.update_layer = made


def _shard_adapter(wrapper: nn.Module, first: int, local: int) -> None:
    """Keep the factors of experts first .. first+local-1 of each of the wrapper's adapters
    (an adapter added after sharding was sized by PEFT for the local experts already)."""
    num_experts = wrapper.num_experts
    if local == num_experts:
        return
    for name, lora_a in wrapper.lora_A.items():
        a = lora_a.weight  # [r E, in], expert-major
        rank = a.shape[0] // num_experts
        rows = a.detach()[first * rank : (first + local) * rank].clone()
        lora_a.weight = nn.Parameter(rows, requires_grad=a.requires_grad)
        b = wrapper.lora_B[name].weight  # [out, r E], expert-minor
        cols = b.detach().view(b.shape[0], rank, num_experts)[:, :, first : first + local]
        wrapper.lora_B[name].weight = nn.Parameter(
            cols.clone(memory_format=torch.contiguous_format).view(b.shape[0], rank * local),
            requires_grad=b.requires_grad,
        )
    wrapper.num_experts = local


class AdapterShard(NamedTuple):
    """A LoRA factor of stacked experts: lora_A [r e, in] (expert-major) or lora_B [out, r e]
    (expert-minor), holding experts first .. first+e-1 of E."""

    kind: str  # "A" | "B"
    rank: int  # r
    first: int
    num_experts: int  # E

    def checkpointed(self, t: Tensor) -> Tensor:
        """A view of the factor (or its optimizer state) with the experts on one dim, the
        same at any EP size: lora_A as it is ([r e, in], dim 0), lora_B [out r, e] (dim 1)."""
        return t if self.kind == "A" else t.view(-1, t.shape[1] // self.rank)

    @property
    def dim(self) -> int:
        return 0 if self.kind == "A" else 1

    def global_shape(self, t: Tensor) -> tuple[int, ...]:
        """The checkpointed view's shape over all E experts."""
        view = self.checkpointed(t)
        if self.kind == "A":
            return (self.rank * self.num_experts, view.shape[1])
        return (view.shape[0], self.num_experts)

    def whole(self, parts: list[Tensor]) -> Tensor:
        """Every rank's factor (in rank order) as one factor of all E experts, PEFT's layout."""
        if self.kind == "A":
            return torch.cat(parts)
        out = parts[0].shape[0]
        cols = [p.view(out, self.rank, -1) for p in parts]
        return torch.cat(cols, dim=2).reshape(out, self.rank * self.num_experts)


def adapter_shards(model: nn.Module) -> dict[str, AdapterShard]:
    """{parameter name: AdapterShard} of every PEFT LoRA factor on stacked experts, sharded
    or not (one process: first expert 0, all E)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for wrapper, experts in _adapter_wrappers(model):
        ep = experts.__dict__["forward"].parallel
        first, num_experts = (
            (0, wrapper.num_experts) if ep is None else (ep.first_expert, ep.num_experts)
        )
        for adapter, lora_a in wrapper.lora_A.items():
            a, b = lora_a.weight, wrapper.lora_B[adapter].weight
            rank = a.shape[0] // wrapper.num_experts
            found[names[id(a)]] = AdapterShard("A", rank, first, num_experts)
            found[names[id(b)]] = AdapterShard("B", rank, first, num_experts)
    return found


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
