"""The general MoE layer: router + plan + experts + combine.

x [..., d] -> flatten [N, d] -> router: Routing (indices [N, k], weights [N, k], probs [N, E])
-> plan: rows sorted by expert (group sizes [E], capacity drops) -> permute [M, d]
-> experts [M, d] -> unpermute: weighted index_add into [N, d] -> reshape [..., d].
After each forward the layer holds its auxiliary losses (`aux_losses`, `aux_loss`, with graph)
and detached statistics (`stats`); `total_aux_loss(model)` sums the losses over a model.
The layer knows nothing of process groups: `moekit.parallel.expert_parallel` sets `parallel`,
which moves the rows to their experts' ranks and back and sums counts over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ._checks import (
    check_capacity_factor,
    check_choice,
    check_input,
    check_non_negative,
    check_positive_int,
    check_top_k,
)
from ._counts import count_ids
from .dispatch import DispatchPlan, expert_choice_plan, make_plan, permute, unpermute
from .experts import ExpertBank, ExpertList, SharedExperts
from .losses import load_balancing_loss, router_z_loss
from .routing import (
    ExpertChoice,
    ExpertChoiceRouter,
    NoisyRouter,
    Router,
    Routing,
    SigmoidRouter,
    SoftmaxRouter,
    SwitchRouter,
)
from .stats import MoEStats, routing_stats

ROUTERS = ("softmax", "noisy", "switch", "sigmoid", "expert_choice")


class MoEOutput(NamedTuple):
    output: Tensor  # [..., d] same leading shape as the input
    aux_loss: Tensor  # [] the layer's scaled auxiliary losses, summed


class Parallel(Protocol):
    """What an MoE layer needs from a parallel runtime (see `moekit.parallel`)."""

    def dispatch(self, x: Tensor, plan: DispatchPlan, experts: nn.Module) -> Tensor:
        """Tokens x [N, d] -> [N, d] through experts that may live on other ranks."""

    def all_reduce(self, t: Tensor) -> Tensor:
        """`t` summed over the data-parallel ranks (no gradient)."""


def _build_router(
    name: str,
    d_model: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None,
    options: dict,
) -> Router:
    """A router by name; `options` are the MoE's routing arguments that were set (not None)."""
    check_choice("router", name, ROUTERS)
    allowed = {
        "softmax": ("normalize", "scaling_factor"),
        "noisy": ("scaling_factor",),
        "sigmoid": ("normalize", "scaling_factor", "num_groups", "top_k_groups"),
    }.get(name, ())
    for option in options:
        if option not in allowed:
            raise ValueError(f"{option} is not an option of router={name!r} (it takes {allowed})")
    if name == "switch":
        if top_k != 1:
            raise ValueError(f"top_k={top_k} must be 1 for router='switch'")
        return SwitchRouter(d_model, num_experts)
    if name == "expert_choice":
        return ExpertChoiceRouter(
            d_model, num_experts, top_k, capacity_factor=capacity_factor or 1.0
        )
    cls = {"softmax": SoftmaxRouter, "noisy": NoisyRouter, "sigmoid": SigmoidRouter}[name]
    return cls(d_model, num_experts, top_k, **options)


def _check_router(router: Router, d_model: int, num_experts: int, top_k: int) -> Router:
    if not isinstance(router, Router):
        raise TypeError(f"router must be one of {ROUTERS} or a moekit Router, got {router!r}")
    for name, want in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k)):
        if getattr(router, name) != want:
            raise ValueError(f"router.{name}={getattr(router, name)} must equal {name}={want}")
    return router


def _check_experts(experts: nn.Module | Sequence[nn.Module], num_experts: int) -> nn.Module:
    if isinstance(experts, (list, tuple)):
        experts = ExpertList(experts)
    if not isinstance(experts, nn.Module):
        raise TypeError(f"experts must be an nn.Module or a list of them, got {type(experts)}")
    got = getattr(experts, "num_experts", None)
    if got != num_experts:
        raise ValueError(f"experts holds num_experts={got}, expected num_experts={num_experts}")
    return experts


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer for inputs of any leading shape [..., d].

    Args:
        d_model: Token width d.
        num_experts: Experts E.
        top_k: Experts per token k, 1 <= k <= E.
        d_hidden: Expert hidden width h (default 4 * d_model).
        activation: Expert activation: "relu", "gelu" or "swiglu".
        router: "softmax" (top-k, weights renormalised over k), "noisy" (noisy top-k),
            "switch" (top-1, weight = probability), "sigmoid" (DeepSeek-V3 bias balancing),
            "expert_choice", or a built `Router`.
        experts: None (an `ExpertBank` from d_hidden/activation/bias/dropout/init), a module
            mapping (rows [M, d], group_sizes [E]) -> [M, d], or a list of E modules.
        capacity_factor: None = dropless; else each expert keeps at most
            ceil(capacity_factor * N * k / E) rows (expert choice: its capacity, default 1).
        bias: Expert biases.
        dropout: Dropout on expert output rows in training.
        init: Expert init, "default" or "kaiming".
        load_balance_coef: Coefficient (alpha) of the Switch load-balancing loss.
        z_loss_coef: Coefficient of the router z-loss.
        normalize: Renormalise the chosen weights over k ("softmax", "sigmoid"; HF's
            `norm_topk_prob`); None = the router's default (True).
        scaling_factor: Multiplier on the routed weights (DeepSeek-V3's `routed_scaling_factor`).
        num_groups, top_k_groups: Group-limited routing for router="sigmoid" (DeepSeek-V3's
            `n_group`, `topk_group`): each token picks its k experts within its best groups.
        num_shared_experts: Always-on experts added to every token's output (DeepSeek's
            `n_shared_experts`): one dense MLP of hidden width num_shared_experts *
            shared_d_hidden (default d_hidden), the experts' activation.
        shared_gate: Scale the shared output by sigmoid(x @ w), w [d, 1] (Qwen2-MoE).

    Raises:
        ValueError, TypeError: An argument out of range, named in the message.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        d_hidden: int | None = None,
        activation: str = "gelu",
        *,
        router: str | Router = "softmax",
        experts: nn.Module | Sequence[nn.Module] | None = None,
        capacity_factor: float | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        init: str = "default",
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        normalize: bool | None = None,
        scaling_factor: float | None = None,
        num_groups: int | None = None,
        top_k_groups: int | None = None,
        num_shared_experts: int = 0,
        shared_d_hidden: int | None = None,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.load_balance_coef = check_non_negative("load_balance_coef", load_balance_coef)
        self.z_loss_coef = check_non_negative("z_loss_coef", z_loss_coef)
        options = {
            "normalize": normalize,
            "scaling_factor": scaling_factor,
            "num_groups": num_groups,
            "top_k_groups": top_k_groups,
        }
        options = {name: value for name, value in options.items() if value is not None}
        if isinstance(router, str):
            router = _build_router(router, d_model, num_experts, top_k, capacity_factor, options)
        elif options:
            raise ValueError(
                f"{sorted(options)} configure a router given by name; set them on the built router"
            )
        self.router = _check_router(router, d_model, num_experts, top_k)
        d_hidden = 4 * d_model if d_hidden is None else d_hidden
        if experts is None:
            experts = ExpertBank(
                num_experts, d_model, d_hidden, activation, bias=bias, dropout=dropout, init=init
            )
        self.experts = _check_experts(experts, num_experts)
        self.shared_experts: SharedExperts | None = None
        if num_shared_experts or shared_gate:
            check_positive_int("num_shared_experts", num_shared_experts)
            width = num_shared_experts * (d_hidden if shared_d_hidden is None else shared_d_hidden)
            self.shared_experts = SharedExperts(
                d_model, width, activation, gate=shared_gate, bias=bias, dropout=dropout, init=init
            )
        self.aux_losses: dict[str, Tensor] = {}
        self.aux_loss: Tensor | None = None
        self._stats: MoEStats | None = None
        self._stats_inputs: tuple | None = None  # routing_stats' arguments, until read
        self.parallel: Parallel | None = None  # set by moekit.parallel.expert_parallel

    def __getstate__(self) -> dict:
        """What deepcopy and pickle copy: the last forward's losses detached (their graph stays
        with the original), so `copy.deepcopy` and `AveragedModel` work after a forward."""
        state = dict(super().__getstate__())
        state["aux_losses"] = {name: loss.detach() for name, loss in self.aux_losses.items()}
        state["aux_loss"] = None if self.aux_loss is None else self.aux_loss.detach()
        return state

    def plan(self, routing: Routing | ExpertChoice, num_tokens: int) -> DispatchPlan:
        """The dispatch plan of a routing decision."""
        if isinstance(routing, ExpertChoice):
            return expert_choice_plan(routing.token_index, routing.weights, num_tokens)
        return make_plan(routing.indices, routing.weights, self.num_experts, self.capacity_factor)

    def compute_aux_losses(
        self,
        routing: Routing | ExpertChoice,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The scaled auxiliary losses of one routing decision, by name.

        `reduce` sums the balancing loss's expert counts over data-parallel ranks.
        """
        losses = {}
        if self.load_balance_coef > 0 and isinstance(routing, Routing):
            counts = None
            if reduce is not None:
                counts = count_ids(routing.indices, self.num_experts)
                counts = reduce(counts)  # [E] pairs of every rank's tokens
            lb = load_balancing_loss(routing.probs, routing.indices, counts)
            losses["load_balance"] = self.load_balance_coef * lb
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * router_z_loss(routing.logits)
        return losses

    @property
    def stats(self) -> MoEStats | None:
        """Detached statistics of the last forward (`MoEStats`), computed when first read."""
        if self._stats is None and self._stats_inputs is not None:
            self._stats = routing_stats(*self._stats_inputs)
            self._stats_inputs = None
        return self._stats

    def _small_batch(self, routing: Routing | ExpertChoice, num_tokens: int) -> bool:
        """Whether to run the gathered-weights path: inference, dropless token choice on an
        `ExpertBank` in this process, and no more (token, slot) pairs than experts (then the
        gathered weights are no more than the bank's)."""
        return (
            not self.training
            and isinstance(routing, Routing)
            and self.capacity_factor is None
            and self.parallel is None
            and isinstance(self.experts, ExpertBank)
            and num_tokens * self.top_k <= self.num_experts
        )

    def forward(self, x: Tensor, *, aux_losses: bool = True) -> MoEOutput:
        """Route, compute and combine.

        Args:
            x: Tokens of shape [..., d_model] (e.g. [B, T, d]); floating, finite.
            aux_losses: False skips the auxiliary losses (`aux_loss` is then zero): decoding.

        Returns:
            MoEOutput(output [..., d_model], aux_loss []).
        """
        check_input(x, self.d_model)
        x_flat = x.reshape(-1, self.d_model)  # [N, d]
        num_tokens = x_flat.shape[0]
        routing = self.router.route(x_flat)
        shared = None  # the shared experts' output, when computed during the exchange
        if self._small_batch(routing, num_tokens):  # a few tokens: no sort, no host sync
            output = self.experts.gathered(x_flat, routing.indices, routing.weights)  # [N, d]
            group_sizes = count_ids(routing.indices, self.num_experts)
            num_dropped = group_sizes.new_zeros(())
        else:
            plan = self.plan(routing, num_tokens)
            if self.parallel is not None:  # experts on other ranks: exchange, compute, exchange
                if self.shared_experts is not None and self.parallel.overlap:
                    output, shared = self.parallel.dispatch(
                        x_flat, plan, self.experts, alongside=lambda: self.shared_experts(x_flat)
                    )  # [N, d] each: the shared experts ran while the rows travelled
                else:
                    output = self.parallel.dispatch(x_flat, plan, self.experts)  # [N, d]
            elif isinstance(self.experts, ExpertBank):  # gather, experts, combine in one op
                output = self.experts.dispatch(x_flat, plan)  # [N, d]
            else:
                rows = self.experts(permute(x_flat, plan), plan.group_sizes)  # [M, d]
                output = unpermute(rows, plan, num_tokens)  # [N, d]
            group_sizes, num_dropped = plan.group_sizes, plan.num_dropped
        if self.shared_experts is not None:  # always-on experts: every token, unweighted
            if shared is None:
                shared = self.shared_experts(x_flat)
            output = output + shared.to(output.dtype)
        output = output.reshape(x.shape).to(x.dtype)  # [..., d]

        reduce = None if self.parallel is None else self.parallel.all_reduce
        self.aux_losses = self.compute_aux_losses(routing, reduce) if aux_losses else {}
        zero = routing.logits.new_zeros(())
        self.aux_loss = sum(self.aux_losses.values(), zero)
        candidates = num_tokens if isinstance(routing, ExpertChoice) else num_tokens * self.top_k
        inputs = (routing.probs.detach(), group_sizes, num_dropped, candidates, reduce)
        self._stats, self._stats_inputs = None, inputs
        if reduce is not None:  # a collective: every rank computes them now
            self._stats = routing_stats(*inputs)
        return MoEOutput(output, self.aux_loss)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}"
        )


def total_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses of every MoE layer in `model` from its last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()
