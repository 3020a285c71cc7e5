"""The experts (and, where the block needs it, the block) of a patched transformers MoE block.

    Experts(experts)         stacked experts called as `experts(x [T, d], top_k_index [T, k],
                             top_k_weights [T, k])`: moekit's plan and kernels
    LoraExperts(wrapper)     the same under PEFT LoRA adapters: the low-rank terms per expert in
                             the grouped pass, no W + BA for the whole stack
    ModuleExperts(experts)   a dict or list of expert modules called with a one-hot dispatch
                             mask (Switch Transformers): moekit's plan, gather and combine
                             around each expert's own forward
    Llama4Block(block)       Llama 4's block, whose experts take every token with its routing
                             weight on the input: moekit's plan over the k chosen pairs only
    DbrxBlock(block)         DBRX's block: softmax top-k renormalised by a p-norm, experts
                             stored as gate / up / down [E*h, d] (not on the interface)

Each is a plain picklable object set as the module's `forward`; it reads the module's tensors
at each call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..dispatch import make_plan
from ..ops import combine, gather, grouped_linear
from ..routing import softmax_top_k
from .backend import _run, run_experts
from .experts import layout_of
from .forward import PatchedForward
from .routers import replayed_ids

__all__ = ["DbrxBlock", "Experts", "Llama4Block", "LoraExperts", "ModuleExperts"]


class Experts(PatchedForward):
    """A stacked experts module's forward on moekit (the experts backend's function); under
    expert parallelism (`hf.parallel.expert_parallel`: `parallel` set, the module holding this
    rank's experts only) moekit's all-to-all dispatch sends each row to its expert's rank.
    `lora` ({parameter name: (lhs, rhs, scaling)}, every expert's factors: `LoraExperts`)
    adds the adapters' low-rank terms; under expert parallelism this rank's experts' (the
    adapters sharded with the experts, `hf.parallel`, or sliced here from whole ones)."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        self.parallel = None  # a moekit.parallel.ExpertParallel, once sharded

    def __call__(
        self,
        hidden_states: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        lora: dict | None = None,
    ) -> Tensor:
        ep = self.parallel
        if ep is None:
            return _run(self.experts, hidden_states, top_k_index, top_k_weights, lora=lora)
        plan = make_plan(top_k_index, top_k_weights, ep.num_experts)  # global ids
        mine = slice(ep.first_expert, ep.first_expert + ep.num_local)
        lora = {  # factors of all E experts (whole adapters): this rank's; else sharded alike
            name: (lhs[mine], rhs[mine], s) if lhs.shape[0] == ep.num_experts else (lhs, rhs, s)
            for name, (lhs, rhs, s) in (lora or {}).items()
        }
        local = _LocalExperts(self.experts, lora)
        return ep.dispatch(hidden_states, plan, local).to(hidden_states.dtype)


class _LocalExperts:
    """This rank's experts as `ExpertParallel.dispatch` calls them: `dispatch(rows, plan)`
    over the rows it received (moekit's kernels or the module's own gate, plus any LoRA
    terms), `w1` for the compute dtype."""

    def __init__(self, experts: nn.Module, lora: dict | None = None) -> None:
        self.experts, self.layout, self.lora = experts, layout_of(experts), lora

    @property
    def w1(self) -> Tensor:
        return getattr(self.experts, self.layout.up_name)

    def dispatch(self, rows: Tensor, plan) -> Tensor:
        return run_experts(self.experts, self.layout, rows, plan, lora=self.lora)


class LoraExperts(PatchedForward):
    """PEFT LoRA adapters (`target_parameters`) on a stacked experts module, computed inside
    moekit's grouped pass: per expert, on the rows routed to it, x @ W_e plus
    scaling * (x @ A_e) @ B_e, two rank-r grouped GEMMs; never W + BA for the whole expert
    stack, which PEFT's own forward builds (and its backward a gradient of that size).

    Set as the forward of the outermost PEFT `ParamWrapper` around the experts (one wrapper
    a targeted parameter, nested), it takes what PEFT's forward takes: where PEFT's state or
    arguments are ones this path does not compute (several active adapters, DoRA, a LoRA
    bias, `adapter_names` for mixed adapter batches), PEFT's own forward runs and gives
    PEFT's result or PEFT's error."""

    def __init__(self, wrapper: nn.Module) -> None:
        self.wrapper = wrapper

    def __call__(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if kwargs.get("adapter_names") is not None:  # mixed adapter batches: PEFT's own forward
            return type(self.wrapper).forward(self.wrapper, hidden_states, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        return self._grouped(hidden_states, *args, **kwargs)

    def _grouped(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        lora, module = {}, self.wrapper
        while isinstance(getattr(module, "base_layer", None), nn.Module):
            factors = _lora_factors(module)
            if factors is False:
                if _sharded(self.wrapper):
                    raise ValueError(
                        "expert parallelism runs plain LoRA on the experts (one active adapter, "
                        "no DoRA, no LoRA bias): PEFT's own forward would add all E experts' "
                        "deltas to this rank's shard"
                    )
                return type(self.wrapper).forward(
                    self.wrapper, hidden_states, top_k_index, top_k_weights
                )
            if factors is not None:
                lora[module.parameter_name] = factors
            module = module.base_layer
        forward = module.__dict__.get("forward")
        if isinstance(forward, Experts):  # expert-parallel or not
            return forward(hidden_states, top_k_index, top_k_weights, lora=lora)
        return _run(module, hidden_states, top_k_index, top_k_weights, lora=lora)


def _sharded(wrapper: nn.Module) -> bool:
    """Whether the experts inside PEFT's wrappers are expert-parallel shards."""
    module = wrapper
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    forward = module.__dict__.get("forward")
    return isinstance(forward, Experts) and forward.parallel is not None


def _lora_factors(wrapper: nn.Module):
    """PEFT's (lhs, rhs, scaling) of a ParamWrapper's one active adapter; None where no LoRA
    applies (disabled, merged, none active), False where this path cannot compute it."""
    if getattr(wrapper, "disable_adapters", False) or getattr(wrapper, "merged", False):
        return None
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    if (
        len(active) > 1
        or wrapper.num_experts == 1
        or wrapper.use_dora.get(active[0], False)
        or wrapper.lora_bias.get(active[0], False)
    ):
        return False
    return wrapper.get_delta_factors(active[0])


class ModuleExperts(PatchedForward):
    """Experts that are modules of their own (`expert_0`, ...), called with transformers'
    one-hot dispatch mask [N, 1, E] (dropped tokens all zero) and weights [N, 1]."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts

    def __call__(self, hidden_states: Tensor, dispatch_mask: Tensor, weights: Tensor) -> Tensor:
        modules = list(
            self.experts.values() if isinstance(self.experts, nn.ModuleDict) else self.experts
        )
        num_tokens, num_experts = hidden_states.shape[0], len(modules)
        mask = dispatch_mask.reshape(num_tokens, num_experts)  # [N, E]
        kept = mask.any(-1).nonzero().squeeze(-1)  # [N'] tokens an expert took
        indices = mask.index_select(0, kept).argmax(-1, keepdim=True)  # [N', 1]
        plan = make_plan(indices, weights.reshape(num_tokens, 1).index_select(0, kept), num_experts)
        x = hidden_states.index_select(0, kept)  # [N', d]
        rows = gather(x, plan.token_index, plan.pair_index, plan.top_k)  # [M, d]
        sizes = plan.group_sizes.tolist()  # one host read: the experts run one by one
        outs = [
            module(part)
            for module, part, size in zip(modules, rows.split(sizes), sizes, strict=True)
            if size
        ]
        out = torch.cat(outs) if outs else rows.new_zeros(0, hidden_states.shape[-1])
        routed = combine(
            out.to(hidden_states.dtype),
            plan.slot_weight.to(hidden_states.dtype),
            plan.token_index,
            x.shape[0],
            plan.pair_index,
            plan.top_k,
        )  # [N', d]
        return torch.zeros_like(hidden_states).index_copy(0, kept, routed)


def _own_experts(block: nn.Module) -> nn.Module:
    """The block's experts module itself: a PEFT wrapper adds its delta only inside its own
    forward, which these blocks do not call, so they refuse it rather than train nothing."""
    experts = block.experts
    if isinstance(getattr(experts, "base_layer", None), nn.Module):
        raise TypeError(
            f"{type(block).__name__}: PEFT adapters on its experts ({type(experts).__name__}) "
            "do not reach moekit's block; moekit.hf.unpatch_model(model) to train them"
        )
    return experts


class Llama4Block(PatchedForward):
    """Llama 4's MoE block: sigmoid top-k weights scaling the chosen experts' inputs, plus the
    shared expert. transformers runs every expert on every token (weights 0 but for the
    chosen); moekit runs the k chosen pairs. Returns (hidden [N, d], router logits [N, E])."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.layout = layout_of(block.experts, is_transposed=True)

    def __call__(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        block = self.block
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, d]
        scores, logits = block.router(x)  # [N, E] the k weights, 0 elsewhere
        indices = torch.topk(logits, block.router.top_k, dim=-1).indices  # the router's choice
        plan = make_plan(indices, scores.gather(-1, indices), scores.shape[-1])
        experts = _own_experts(block)
        out = block.shared_expert(x) + run_experts(experts, self.layout, x, plan, True)
        return out, logits


class DbrxBlock(PatchedForward):
    """DBRX's FFN: the router's logits, softmax top-k (moekit's `softmax_top_k`), the k
    weights renormalised by their `moe_normalize_expert_weights`-norm; experts w1 (gate), v1
    (up) and w2 (down, transposed) stored as [E*h, d]: moekit's gather, grouped GEMMs over
    views of them, the module's activation, moekit's combine."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, hidden_states: Tensor) -> Tensor:
        block = self.block
        mlp = _own_experts(block).mlp
        shape = hidden_states.shape
        logits = block.router(hidden_states)  # [N, E] fp32
        stats = block.router.__dict__.get("forward")  # the patched router
        replay = stats.replayed(logits.shape[0])  # [N, k] (`hf.replay`) or None
        if replay is None:
            weights, indices = softmax_top_k(logits, block.top_k, normalize=False)  # [N, k]
        else:
            probs = torch.softmax(logits, dim=-1)  # [N, E]
            indices = replayed_ids(
                replay, lambda: probs.topk(block.top_k, dim=-1).indices, logits.device
            )
            weights = probs.gather(-1, indices)
        stats.record(indices)
        if stats.counts is not None:
            stats._count_ids(indices, logits)
        p = block.moe_normalize_expert_weights
        if p is not None:
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        num_experts, d_model = logits.shape[-1], shape[-1]
        x = hidden_states.reshape(-1, d_model)  # [N, d]
        plan = make_plan(indices, weights, num_experts)
        gate = mlp.w1.view(num_experts, -1, d_model).transpose(1, 2)  # [E, d, h]
        up = mlp.v1.view(num_experts, -1, d_model).transpose(1, 2)  # [E, d, h]
        down = mlp.w2.view(num_experts, -1, d_model)  # [E, h, d]
        offsets = torch.cumsum(plan.group_sizes, 0).to(torch.int32)  # [E]
        rows = gather(x.to(gate.dtype), plan.token_index, plan.pair_index, plan.top_k)  # [M, d]
        hidden = mlp.activation_fn(grouped_linear(rows, gate, offsets)) * grouped_linear(
            rows, up, offsets
        )  # [M, h]
        out = grouped_linear(hidden, down, offsets)  # [M, d]
        routed = combine(
            out,
            plan.slot_weight.to(out.dtype),
            plan.token_index,
            x.shape[0],
            plan.pair_index,
            plan.top_k,
        )  # [N, d]
        return routed.to(hidden_states.dtype).reshape(shape)
