"""`moekit bench --expert-parallel R` (under torchrun): what the all-to-all costs in a step.

Every rank takes N/R tokens of the shape's global batch N and runs one forward+backward of the
expert-parallel layer (E/R experts each). Timed in the same run, interleaved:
  EP step       the layer's forward+backward on this rank's slice (shared experts, if any,
                after the exchange)
  all-to-all    the step's exchanges alone, replayed with the same splits: the counts, the rows
                out and back (forward), and their gradients (backward)
  overlap       with shared experts: the EP step with them run during the rows' exchange
                (`ExpertParallel.overlap` True; the default on NCCL, not on gloo)
  1 process     the full layer (every expert) on the whole global batch, in each process with
                the same threads: the step that EP splits over R ranks
  all cores     the same on rank 0 alone with every core's thread (the others wait): the
                process EP has to beat on this machine
Each time is the slowest rank's median: a step waits for its slowest rank.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..layers import MoE
from ..parallel import expert_parallel
from ..parallel.comm import exchange
from ..parallel.training import Topology
from .layer import LayerShape
from .timing import interleaved_medians


@dataclass
class EPResult:
    shape: LayerShape
    activation: str
    ranks: int
    step_ms: float
    exchange_ms: float
    single_ms: float
    all_cores_ms: float
    shared: int = 0  # shared experts of the layer
    overlap_ms: float | None = None  # the step with the shared experts during the exchange

    @property
    def share(self) -> float:
        return self.exchange_ms / self.step_ms

    @property
    def speedup(self) -> float:
        return self.single_ms / self.step_ms

    @property
    def vs_all_cores(self) -> float:
        return self.all_cores_ms / self.step_ms


def _exchange_replay(layer: MoE, x: Tensor):
    """The collectives of one forward+backward of `layer` on x, without the compute."""
    ep = layer.parallel
    with torch.no_grad():
        plan = layer.plan(layer.router.route(x), x.shape[0])
    send, recv = ep._exchange_counts(plan.group_sizes)
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    rows = x.new_empty(sum(send_splits), x.shape[1])
    received = x.new_empty(sum(recv_splits), x.shape[1])

    def replay() -> None:
        ep._exchange_counts(plan.group_sizes)
        exchange(rows, recv_splits, send_splits, ep.group)  # rows to their experts
        exchange(received, send_splits, recv_splits, ep.group)  # results back
        exchange(rows, recv_splits, send_splits, ep.group)  # gradients of the results
        exchange(received, send_splits, recv_splits, ep.group)  # gradients of the rows

    return replay


def _slowest(ms: float, topo: Topology) -> float:
    t = torch.tensor([ms], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=topo.data_group)
    return float(t)


def _on_rank_0_with_all_cores(fn, topo: Topology):
    """`fn` on rank 0 with a thread per core while the other ranks wait."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1

    def run() -> None:
        if topo.is_main:
            torch.set_num_threads(cores)
            try:
                fn()
            finally:
                torch.set_num_threads(threads)
        dist.barrier(group=topo.data_group)

    return run


def bench_expert_parallel(
    shape: LayerShape,
    activation: str,
    topo: Topology,
    *,
    rounds: int,
    warmup: int = 2,
    shared: int = 0,
) -> EPResult:
    """Time the EP step, its exchanges and the one-process step at one shape (float32);
    `shared` shared experts (of width h) in the layer: also the step with overlap."""
    ranks = topo.world_size
    if shape.tokens % ranks:
        raise ValueError(f"--tokens {shape.tokens} must be divisible by the ranks {ranks}")
    torch.manual_seed(0)  # the same full layer and batch on every rank
    full = MoE(
        shape.d_model,
        shape.num_experts,
        shape.top_k,
        shape.d_hidden,
        activation,
        num_shared_experts=shared,
    )
    full = full.to(topo.device)
    x = torch.randn(shape.tokens, shape.d_model, device=topo.device)
    grad = torch.randn_like(x)
    n = shape.tokens // ranks
    mine = slice(topo.rank * n, (topo.rank + 1) * n)
    ep = expert_parallel(copy.deepcopy(full), topo.ep_group, data_group=topo.data_group)
    x_ep, x_full = x[mine].clone().requires_grad_(), x.clone().requires_grad_()

    def step(layer: MoE, inputs: Tensor, upstream: Tensor, overlap: bool = False):
        def run() -> None:
            if layer.parallel is not None:
                layer.parallel.overlap = overlap
            layer.zero_grad(set_to_none=True)
            inputs.grad = None
            layer(inputs).output.backward(upstream)

        return run

    cases = {
        "ep": step(ep, x_ep, grad[mine]),
        "exchange": _exchange_replay(ep, x_ep.detach()),
        "single": step(full, x_full, grad),
        "all_cores": _on_rank_0_with_all_cores(step(full, x_full, grad), topo),
    }
    if shared:
        cases["overlap"] = step(ep, x_ep, grad[mine], overlap=True)
    times = interleaved_medians(cases, rounds=rounds, warmup=warmup, device=topo.device)
    slowest = {name: _slowest(ms, topo) for name, ms in times.items()}
    return EPResult(
        shape,
        activation,
        ranks,
        slowest["ep"],
        slowest["exchange"],
        slowest["single"],
        slowest["all_cores"],
        shared,
        slowest.get("overlap"),
    )
