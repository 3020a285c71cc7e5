"""Data- and expert-parallel training of patched transformers models (`moekit finetune` under
torchrun): N ranks, expert-parallel groups of R consecutive ranks (`parallel.training.Topology`).

    Sharded(model, topo, fsdp=True)   shard the model in place
      .step_model                     what the training forward calls (the model, or its DDP)
      .finish_grads()                 after backward: the expert shards' gradients synced
      .grad_norm()                    the global gradient norm (equal on every rank)
      .no_sync(sync)                  a micro-batch's backward without the gradient reduction
      .state(optimizer) / .load(...)  the training state for torch.distributed.checkpoint
      .full_state()                   the model's whole state dict, gathered (rank 0 writes it)

R > 1   every patched block's experts sharded over the EP group (`hf.parallel.expert_parallel`:
        moekit's all-to-all dispatch) and replicated N/R times, with the LoRA factors of their
        adapters (PEFT's ParamWrapper: each rank its experts' factors); their gradients summed
        over the replicas and divided by N. They are left out of FSDP/DDP.
R = 1   no expert parallelism: the experts are parameters like the others; the LoRA factors on
        them (read by the experts' forward, their modules never called: FSDP2 could not gather
        them) stay whole on each rank, their gradients averaged over the N ranks after the
        backward (`finish_grads`).
dense   every other parameter (with R = 1 every parameter) sharded by FSDP2 (`fully_shard`
        per decoder layer, then the root) over all N ranks, or replicated by DDP; averaged
        gradients. LoRA factors of layers FSDP2 calls (attention) are dense parameters.

One process (`Topology.single`): nothing sharded, `step_model` is the model.

Checkpoints: each tensor as a DTensor of its global shape: FSDP2's as they are, an expert shard
Shard(0) over the EP group and Replicate over the replicas (a [N/R, R] mesh), so DCP writes each
piece once and reads it back at any N and R (or in one process: plain tensors). An experts'
LoRA factor is checkpointed with its experts on one dim (`AdapterShard.checkpointed`: lora_B
[out, r E] as [out r, E]) at every N and R, one process included.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..parallel import training as par
from .parallel import adapter_shards, expert_parallel, sharded_parameters

__all__ = ["Sharded", "adapter_factors", "decoder_layers", "training_state"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, FSDP2's units: the modules whose class transformers names
    in `_no_split_modules` (a decoder layer), else the modules of the largest ModuleList."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def adapter_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the LoRA factors PEFT keeps on wrapped parameters (`ParamWrapper`,
    LoRA on `target_parameters`: the stacked experts): read by the experts' forward, their
    own modules never called."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            for attr in ("lora_A", "lora_B"):
                for sub, param in getattr(module, attr).named_parameters():
                    if param.requires_grad:
                        found[f"{name}.{attr}.{sub}"] = param
    return found


def fsdp_units(model: nn.Module, ignored: set[nn.Parameter]) -> list[nn.Module]:
    """FSDP2's units below the root, innermost first: each decoder layer, and before it every
    module whose own parameters have another dtype than the rest of its layer (a router kept in
    float32 in a bfloat16 model: FSDP2 wants one dtype a unit)."""
    units = []
    for layer in decoder_layers(model):
        sizes: dict[torch.dtype, int] = {}
        for p in layer.parameters():
            if p not in ignored:
                sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        if len(sizes) > 1:
            main = max(sizes, key=sizes.get)
            units += [
                m
                for m in layer.modules()
                if any(p.dtype != main and p not in ignored for p in m.parameters(recurse=False))
            ]
        units.append(layer)
    return units


class Sharded:
    """`model` (patched, adapters added) sharded over `topo`'s ranks, in place; see the module
    docstring."""

    def __init__(self, model: nn.Module, topo: par.Topology, fsdp: bool = True) -> None:
        self.model, self.topo, self.fsdp = model, topo, fsdp
        self.experts: dict[str, tuple[int, int]] = {}  # {name: (first expert, E)} EP shards
        self.replicated: dict[str, nn.Parameter] = {}
        self.step_model = model
        self.adapters = adapter_shards(model)  # the experts' LoRA factors (checkpoint views)
        self.sharded: set[str] = set()  # names of the expert and LoRA factor shards
        if not topo.distributed:  # one process: nothing to shard
            return
        if topo.expert_parallel > 1:
            expert_parallel(model, topo.ep_group, data_group=topo.data_group)
            self.experts = sharded_parameters(model)
            self.adapters = adapter_shards(model)  # each rank its experts' factors
            self.sharded = set(self.experts) | set(self.adapters)
        params = dict(model.named_parameters())
        ignored = {params[name] for name in self.sharded}
        # PEFT reads these (ParamWrapper's factors), never calls their modules: FSDP2 could not
        # gather them, so they stay whole on every rank, their gradients averaged by us
        factors = adapter_factors(model) if fsdp else {}
        self.replicated = {n: p for n, p in factors.items() if n not in self.sharded}
        ignored |= set(self.replicated.values())
        device = topo.device.type
        self.data_mesh = _mesh([topo.data_group], device, topo.world_size)
        self.expert_mesh = None
        if self.sharded:
            groups = [g for g in (topo.replica_group, topo.ep_group) if g is not None]
            self.expert_mesh = _mesh(groups, device, topo.world_size, topo.expert_parallel)
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for unit in [*fsdp_units(model, ignored), model]:
                fully_shard(unit, mesh=self.data_mesh, ignored_params=ignored)
            self.step_model = model
        else:
            dense = [n for n, p in params.items() if p.requires_grad and n not in self.sharded]
            if dense:  # else nothing for DDP to reduce (LoRA on the experts alone)
                self.step_model = _ddp(model, topo, sorted(self.sharded))

    def finish_grads(self) -> None:
        """The expert and LoRA factor shards' gradients summed over their replicas, / N, the
        replicated adapter factors' averaged over the N ranks (FSDP2 and DDP average the others
        during the backward)."""
        if not self.topo.distributed:
            return
        params = dict(self.model.named_parameters())
        shards = [params[n].grad for n in sorted(self.sharded) if params[n].grad is not None]
        par.average_grads(shards, self.topo.replica_group, self.topo.world_size)
        grads = [p.grad for p in self.replicated.values() if p.grad is not None]
        par.average_grads(grads, self.topo.data_group, self.topo.world_size)

    def grad_norm(self) -> Tensor:
        """The L2 norm of the whole model's gradient, equal on every rank (after
        `finish_grads`): FSDP2's shards reduced as DTensors, expert shards over the EP group,
        the rest (replicated, synced) as they are."""
        from torch.distributed.tensor import DTensor

        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        sharded = [g for _, g in named if isinstance(g, DTensor)]
        experts = [g for n, g in named if n in self.sharded]
        rest = [g for n, g in named if n not in self.sharded and not isinstance(g, DTensor)]
        device = self.topo.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        if rest:
            total = total + torch.nn.utils.get_total_norm(rest, foreach=True).float().square()
        if sharded:
            norm = torch.nn.utils.get_total_norm(sharded)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            total = total + norm.float().square().to(device)
        if experts:
            squared = torch.nn.utils.get_total_norm(experts, foreach=True).float().square()
            torch.distributed.all_reduce(squared, group=self.topo.ep_group)
            total = total + squared
        return total.sqrt()

    def no_sync(self, sync: bool):
        """A context for one micro-batch's backward: gradient reduction waits for the last
        micro-batch of a step (DDP's no_sync, FSDP2's requires_gradient_sync)."""
        import contextlib

        if sync or not self.topo.distributed or self.step_model is self.model and not self.fsdp:
            return contextlib.nullcontext()
        if not self.fsdp:
            return self.step_model.no_sync()
        return _fsdp_no_sync(self.model)

    # --- checkpoints ----------------------------------------------------------------------
    def _global(self, name: str, t: Tensor) -> Tensor:
        """An expert or LoRA factor shard (or its optimizer state) as the DTensor of all E
        experts; an experts' LoRA factor in its checkpoint view (a view: loaded in place)."""
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        if name in self.adapters:
            adapter = self.adapters[name]
            view = adapter.checkpointed(t)
            if name not in self.sharded:
                return view
            return self._dtensor(view, adapter.dim, adapter.global_shape(t))
        if name not in self.experts:
            return t
        return self._dtensor(t, 0, (self.experts[name][1], *t.shape[1:]))

    def _dtensor(self, t: Tensor, dim: int, shape: tuple[int, ...]) -> Tensor:
        """This rank's piece `t` of a tensor of `shape` sharded on `dim` over the EP group,
        replicated over the replicas."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = self.expert_mesh
        placements = [Shard(dim)] if mesh.ndim == 1 else [Replicate(), Shard(dim)]
        stride = _contiguous_strides(shape)
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)

    def state(self, optimizer: torch.optim.Optimizer, names: set[str]) -> dict:
        return training_state(self.model, optimizer, names, self._global)

    def load(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        """After `dcp.load` filled `state` (from `state()`) in place: into the optimizer (the
        model's tensors were filled where they live)."""
        optim = dict(state["optimizer"])
        params = dict(self.model.named_parameters())
        optim["state"] = {
            n: {k: self._local(n, v, params[n]) if k != "step" else v for k, v in e.items()}
            for n, e in optim["state"].items()
        }
        set_optimizer_state_dict(self.model, optimizer, optim)

    def _local(self, name: str, t: Tensor, param: Tensor) -> Tensor:
        """`_global`'s inverse for an optimizer state tensor: this rank's, the param's shape."""
        if name in self.sharded:
            t = t.to_local()
        return t.view(param.shape) if name in self.adapters else t

    def full_state(self, trainable_only: bool = False) -> dict[str, Tensor] | None:
        """The model's state dict with every tensor whole, on the CPU (a collective: every
        rank calls it; rank 0 gets the tensors, the others an empty dict); `trainable_only`:
        without the frozen parameters (an adapter's run). One process: None (the model's own
        `save_pretrained` reads them)."""
        if not self.topo.distributed:
            return None
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
        )
        state = get_model_state_dict(self.model, options=options)
        for name in sorted(self.sharded):
            local = self.model.get_parameter(name)
            if local.requires_grad or not trainable_only:
                parts = par.gather_parts(local.detach(), self.topo.ep_group)
                if parts is not None:
                    adapter = self.adapters.get(name)
                    whole = adapter.whole(parts) if adapter else torch.cat(parts)
                    state[name] = whole.cpu()
        return state if self.topo.is_main else {}


class _fsdp_no_sync:
    """FSDP2: no reduce-scatter until the last micro-batch (set back after the backward)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc) -> None:
        self.model.set_requires_gradient_sync(True)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _mesh(groups: list, device: str, world: int, inner: int | None = None):
    from torch.distributed.device_mesh import DeviceMesh

    if len(groups) == 1:
        return DeviceMesh.from_group(groups[0], device)
    ranks = torch.arange(world).reshape(world // inner, inner)  # [replica, ep]
    return DeviceMesh.from_group(groups, device, mesh=ranks, mesh_dim_names=("replica", "ep"))


def _ddp(model: nn.Module, topo: par.Topology, ignored: list[str]) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [topo.device.index] if topo.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, process_group=topo.data_group)  # --dist-timeout


def training_state(model: nn.Module, optimizer, names: set[str], wrap=None) -> dict:
    """{"model": the tensors named `names`, "optimizer": its state by parameter name} as
    torch.distributed.state_dict gives them (FSDP2's DTensors; plain tensors in one process),
    expert shards made global by `wrap(name, tensor)`. The tensors are the live ones: DCP
    loads in place."""
    wrap = wrap or (lambda name, t: t)
    tensors = get_model_state_dict(model)
    missing = names - set(tensors)
    if missing:
        raise KeyError(f"not in the model's state dict: {sorted(missing)[:3]}")
    model_state = {n: wrap(n, tensors[n]) for n in sorted(names)}
    optim = get_optimizer_state_dict(model, optimizer)
    optim["state"] = {
        n: {k: wrap(n, v) for k, v in entry.items()} for n, entry in optim["state"].items()
    }
    return {"model": model_state, "optimizer": optim}
