"""What a data- and expert-parallel training loop needs beyond the layer.

N ranks (torchrun), expert-parallel groups of R consecutive ranks, N/R replicas of each expert:
  init_distributed      the process group (gloo on CPU, NCCL on GPU, a timeout) and the groups
  end_distributed       every group destroyed, its threads joined, before Python shuts down
  sync_expert_grads     expert gradients summed over the ranks holding the same experts, / N
                        (dense gradients are DDP's: averaged over all N ranks)
  grad_norm             the global gradient norm (expert shards counted once)
  full_state_dict, full_optimizer_state, expert_rows
                        the single-process checkpoint layout: experts gathered onto rank 0 to be
                        saved; each rank reads only its shard's rows when loading
                        (`Checkpoint.optimizer_slices`), so a checkpoint moves between R's
"""

from __future__ import annotations

import datetime
import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

from .comm import init_process_group
from .expert_parallel import sharded_parameters


@dataclass(frozen=True)
class Topology:
    """This process's place among the ranks of a run; one process is a topology of size 1
    (`Topology.single`: no groups, every collective below a no-op)."""

    rank: int
    world_size: int  # N
    expert_parallel: int  # R
    device: torch.device
    ep_group: ProcessGroup | None  # the R consecutive ranks that share out the experts
    replica_group: ProcessGroup | None  # ranks holding the same experts (None when N == R)
    data_group: ProcessGroup | None  # all N ranks, for counts and losses (its own communicator)
    # all N ranks on gloo with the I/O timeout: waiting while rank 0 writes (tracking,
    # checkpoints, the final model), small objects (RNG states)
    control_group: ProcessGroup | None = None

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Topology:
        """One process: rank 0 of 1."""
        return cls(0, 1, 1, torch.device(device), None, None, None, None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wait(self) -> None:
        """Wait for every rank, under the I/O timeout: after work one rank does alone (rank
        0's MLflow setup, a checkpoint's manifest) that may take longer than --dist-timeout,
        which bounds the steps' collectives."""
        if self.distributed:
            dist.barrier(group=self.control_group)


BUCKET_BYTES = 32 * 2**20  # the most `average_grads` flattens at once
IO_TIMEOUT_S = 1800.0  # the least time rank 0 gets for what it writes alone (Topology.wait)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda where torch sees a GPU, else cpu; "cuda" without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
            "use --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def defer_to_rank_0(grace_s: float = 10.0) -> None:
    """Before a process reports an error in its input (a flag, a file, a topology): on a rank
    other than 0 of a torchrun job, wait `grace_s`. Every rank checks the input alike and
    fails alike: rank 0 reports at once, and torchrun, seeing it fail, stops the other ranks
    while they wait, so the line is there once. A rank still running after the wait failed
    on its own, and reports it."""
    if os.environ.get("RANK", "0") != "0":
        time.sleep(grace_s)


def init_distributed(
    expert_parallel: int, device: str, timeout_s: float, command: str = "train"
) -> Topology:
    """Join the torchrun job this process belongs to; `Topology.single` for one process.

    Args:
        expert_parallel: R, the expert-parallel group size; divides the number of ranks.
        device: "auto", "cpu" or "cuda" (each rank uses its LOCAL_RANK GPU, with NCCL; one
            process: the first GPU).
        timeout_s: Process-group timeout of the steps' collectives: one waiting longer (a
            peer died or hung) raises instead of hanging. Waits for rank 0's I/O
            (`Topology.wait`) get max(timeout_s, IO_TIMEOUT_S); a dead peer fails them at once.

    Raises:
        ValueError: R > 1 without torchrun, or R not dividing the number of ranks.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = resolve_device(device).type == "cuda"
    if world_size == 1:
        if expert_parallel != 1:
            raise ValueError(
                f"--expert-parallel {expert_parallel} needs {expert_parallel} or more processes: "
                f"launch with torchrun --nproc-per-node {expert_parallel} -m moekit {command} ..."
            )
        return Topology.single("cuda" if use_cuda else "cpu")
    if expert_parallel < 1 or world_size % expert_parallel:
        raise ValueError(
            f"--expert-parallel {expert_parallel} must divide the number of processes {world_size}"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    io_timeout = datetime.timedelta(seconds=max(timeout_s, IO_TIMEOUT_S))
    if not dist.is_initialized():  # ranks join as they start: the I/O timeout, not the steps'
        init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=io_timeout,
            device_id=dev if use_cuda else None,
        )
    rank = dist.get_rank()
    r = expert_parallel
    # new groups take the default timeout (30 min), not the world's: pass it to each
    ep_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(start, start + r)) for start in range(0, world_size, r)], timeout=timeout
    )
    replica_group = None
    if world_size > r:
        replica_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(i, world_size, r)) for i in range(r)], timeout=timeout
        )
    data_group = dist.new_group(list(range(world_size)), timeout=timeout)
    control = dist.new_group(list(range(world_size)), timeout=io_timeout, backend="gloo")
    return Topology(rank, world_size, r, dev, ep_group, replica_group, data_group, control)


def end_distributed() -> None:
    """Destroy every process group, each freed now (its threads joined) rather than when Python
    shuts down: a gloo thread still releasing a finished collective's tensors then aborts the
    process after a run that succeeded. The caller drops its own references (the model, the
    `Topology`) first; ones in reference cycles, a finished run's, are collected here."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed of its own for each rank's dropout and routing noise (and step, on a reshard)."""
    return seed * 1_000_003 + 7919 * (rank + 1) + step


def sync_expert_grads(
    model: nn.Module, topo: Topology, sharded: dict[str, tuple[int, int]] | None = None
) -> None:
    """Sum each expert shard's gradient over its replicas and divide by N, in one collective.
    `sharded`: {name: (first expert, E)} of the shards (default: the model's MoE layers')."""
    if not topo.distributed:
        return
    sharded = sharded_parameters(model) if sharded is None else sharded
    params = dict(model.named_parameters())
    grads = [params[name].grad for name in sharded if params[name].grad is not None]
    average_grads(grads, topo.replica_group, topo.world_size)


def average_grads(grads: list[Tensor], group: ProcessGroup | None, divisor: int) -> None:
    """grads <- (their sum over `group`; None: this rank alone) / divisor, in place: a
    collective a bucket of at most `BUCKET_BYTES` (flattened), so a step's extra memory is one
    bucket, not a copy of every gradient (an nf4 rank's 120 MB of expert LoRA gradients)."""
    if not grads:
        return
    if group is None:
        torch._foreach_div_(grads, divisor)
        return
    for bucket in _buckets(grads, BUCKET_BYTES):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat /= divisor
        for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            grad.copy_(synced)


def _buckets(tensors: list[Tensor], limit: int) -> list[list[Tensor]]:
    """`tensors` in order, cut into runs of one dtype and at most `limit` bytes (a tensor
    larger than that alone)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or size + nbytes > limit or buckets[-1][0].dtype != t.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


def all_reduce_sum(tensors: list[Tensor], group: ProcessGroup | None) -> list[Tensor]:
    """Each tensor (as float32, or float64 where one is) summed over `group`'s ranks, in one
    collective (new tensors; None: one process, copies)."""
    if not tensors:
        return []
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    tensors = [t.to(dtype) for t in tensors]
    if group is None:  # one process
        return [t.clone() for t in tensors]
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    return list(_unflatten_dense_tensors(flat, tensors))


def rank_failure(topo: Topology, step: int, err: Exception, timeout_s: float, out) -> RuntimeError:
    """The one line a rank exits with when a step fails under torchrun."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return RuntimeError(
        f"rank {topo.rank} of {topo.world_size}, step {step}: {first} (a collective that fails, "
        f"or waits past --dist-timeout {timeout_s:g} s, means another rank died or hung; "
        f"--resume continues from the newest complete checkpoint in {out})"
    )


def grad_norm(model: nn.Module, topo: Topology) -> Tensor:
    """The L2 norm of the whole model's gradient, equal on every rank (after the syncs)."""
    if not topo.distributed:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    sharded = sharded_parameters(model)
    dense, experts = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (experts if name in sharded else dense).append(param.grad)
    sq = [torch.nn.utils.get_total_norm(g, foreach=True).float().square() for g in (dense, experts)]
    expert_sq = sq[1].clone()
    dist.all_reduce(expert_sq, group=topo.ep_group)  # each shard counted once
    return (sq[0] + expert_sq).sqrt()


def gather_experts(t: Tensor, group: ProcessGroup) -> Tensor | None:
    """An expert shard [e, ...] -> every expert [E, ...] on the group's first rank (None on the
    others: only the writer holds the whole)."""
    parts = gather_parts(t, group)
    return None if parts is None else torch.cat(parts)  # [E, ...] in expert order


def gather_parts(t: Tensor, group: ProcessGroup) -> list[Tensor] | None:
    """Every rank's `t` (alike in shape), in rank order, on the group's first rank; None on
    the others."""
    first = dist.get_global_rank(group, 0)
    if dist.get_rank() != first:
        dist.gather(t.contiguous(), None, dst=first, group=group)
        return None
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.gather(t.contiguous(), parts, dst=first, group=group)
    return parts


def full_state_dict(model: nn.Module, topo: Topology) -> dict[str, Tensor]:
    """The model's state dict in the single-process layout on rank 0 of each EP group (global
    rank 0 writes it); elsewhere the experts stay shards. A collective over the EP group."""
    state = {name: t.detach() for name, t in model.state_dict().items()}
    for name in sharded_parameters(model):
        whole = gather_experts(state[name], topo.ep_group)
        state[name] = state[name] if whole is None else whole
    return state


def optimizer_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters an optimizer over `model.parameters()` (trainable) indexes."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, topo: Topology):
    """The optimizer's state dict in the single-process layout on rank 0 of each EP group, as
    `full_state_dict`: per-expert state (Adam's moments) gathered, scalars (the step) as they
    are."""
    state = optimizer.state_dict()
    names = optimizer_param_names(model)
    sharded = sharded_parameters(model)
    gathered = {}
    for index, entry in state["state"].items():
        if names[index] in sharded:
            entry = {key: _gathered(v, topo.ep_group) for key, v in entry.items()}
        gathered[index] = entry
    return {"state": gathered, "param_groups": state["param_groups"]}


def _gathered(v: object, group: ProcessGroup) -> object:
    if not _per_expert(v):
        return v
    whole = gather_experts(v, group)
    return v if whole is None else whole


def expert_rows(model: nn.Module) -> dict[int, slice]:
    """{optimizer index: this rank's rows of the single-process layout} for the expert shards:
    what `Checkpoint.optimizer_slices` reads."""
    params = dict(model.named_parameters())
    sharded = sharded_parameters(model)
    return {
        index: slice(sharded[name][0], sharded[name][0] + params[name].shape[0])
        for index, name in enumerate(optimizer_param_names(model))
        if name in sharded
    }


def _per_expert(v: object) -> bool:
    return isinstance(v, Tensor) and v.dim() > 0


def all_gather_objects(obj: object, topo: Topology) -> list:
    """`obj` of every rank, in rank order (pickled; for small things such as RNG states)."""
    if not topo.distributed:
        return [obj]
    out = [None] * topo.world_size
    dist.all_gather_object(out, obj, group=topo.control_group)
    return out


def all_reduce_mean(t: Tensor, topo: Topology) -> Tensor:
    """The mean of `t` over all ranks (a new tensor, no gradient)."""
    t = t.detach().clone()
    if not topo.distributed:
        return t
    dist.all_reduce(t, group=topo.data_group)
    return t / topo.world_size
