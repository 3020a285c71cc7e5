"""A transformers router's forward on moekit's routing, as its family rule describes it.

    route(router, rule, x, *args, input_ids=None, replay=None) -> (logits [N, E],
                              weights [N, k], indices [N, k])
    Router(router, rule)      the router's patched forward: `route`, returned in the shape the
                              family's block expects; routes replayed and recorded (`hf.replay`)

Logits, scores and weights in float32 or wider (`moekit.routing.router_dtype`), outside
autocast; the choice under no_grad (moekit's `group_limited_top_k`), the weights the gathered
scores, so the router's gradient is transformers'. A replay gives the choice instead (ids < 0:
the router's own for that token); the weights are still gathered from the live scores.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import group_limited_top_k, router_dtype, softmax_top_k
from .families import FamilyRule
from .forward import PatchedForward

__all__ = ["Router", "attribute", "flag", "route"]


def attribute(obj: object, path: str | None):
    """`obj.<path>` for a dotted path ("moe_statics.e_score_correction_bias"); an integer
    literal is itself; None -> None."""
    if path is None:
        return None
    if "." not in path:  # the common case, one getattr (a router call reads several)
        return int(path) if path.isdigit() else getattr(obj, path)
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def flag(obj: object, spec: bool | str) -> bool:
    """A rule's flag: a constant, an attribute ("norm_topk_prob"), an attribute's value
    ("topk_method=group_limited_greedy"), or any of several joined by "|"."""
    if isinstance(spec, bool):
        return spec
    for name, value in _terms(spec):
        got = attribute(obj, name)
        if (str(got) == value) if value else bool(got):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _terms(spec: str) -> tuple[tuple[str, str], ...]:
    """A flag's (attribute, value) terms, parsed once a spec (a router call reads several)."""
    return tuple((name, value) for name, _, value in (t.partition("=") for t in spec.split("|")))


def _scores(router: nn.Module, rule: FamilyRule, logits: Tensor) -> Tensor:
    """[N, E] routing scores from the logits."""
    kind = rule.score
    if kind.startswith("@"):  # the router's own: a score function, or a kind's name
        kind = attribute(router, kind[1:])
        if callable(kind):
            return kind(logits)
    if kind == "softmax":
        return F.softmax(logits, dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"{type(router).__name__}: unknown routing score {kind!r}")


def route(
    router: nn.Module,
    rule: FamilyRule,
    hidden_states: Tensor,
    *args: Tensor,
    input_ids: Tensor | None = None,
    replay: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The routing of `rule` for tokens [..., d]: (logits [N, E], weights [N, k], indices
    [N, k]), logits and weights in the router dtype. `replay` [N, k]: the experts to route
    by (a token's row of -1: its own choice)."""
    weight = attribute(router, rule.weight)  # [E, d]
    x = hidden_states.reshape(-1, weight.shape[-1])  # [N, d]
    dtype = router_dtype(x.dtype)
    bias = attribute(router, rule.bias)
    top_k = attribute(router, rule.top_k)
    off = torch.is_autocast_enabled(x.device.type)  # outside autocast, cheaply where it is off
    with torch.autocast(x.device.type, enabled=False) if off else contextlib.nullcontext():
        if rule.pre_norm is not None:
            x = attribute(router, rule.pre_norm)(x)
        for name in rule.input_scale:
            x = x * attribute(router, name)
        logits = F.linear(
            x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        )  # [N, E]
        if rule.logit_scale is not None:
            logits = logits * attribute(router, rule.logit_scale)
        cap = float(attribute(router, rule.softcap) or 0.0)
        if cap > 0:
            logits = torch.tanh(logits / cap) * cap
        scores = _scores(router, rule, logits)  # [N, E]
        if replay is None and _plain_top_k(router, rule):  # the top-k of the scores
            weights, indices = scores.topk(top_k, dim=-1)  # [N, k] (values: the gathered)
        else:

            def own() -> Tensor:
                return _choice(router, rule, logits, scores, top_k, args, input_ids)

            indices = own() if replay is None else replayed_ids(replay, own, logits.device)
            weights = scores.gather(-1, indices)  # [N, k]
        if flag(router, rule.normalize):
            total = weights.sum(-1, keepdim=True)
            if rule.norm_min is not None:
                total = total.clamp(min=float(attribute(router, rule.norm_min)))
            weights = weights / (total + rule.eps if rule.eps else total)
        if rule.scale == "1/top_k":
            weights = weights / top_k
        elif rule.scale is not None:
            weights = weights * attribute(router, rule.scale)
        if rule.expert_scale is not None:
            weights = weights * attribute(router, rule.expert_scale)[indices]
    return logits, weights, indices


def replayed_ids(replay: Tensor, own, device: torch.device) -> Tensor:
    """[N, k] the replayed experts on `device`, a token's row of -1 filled from `own()` (the
    router's own choice, computed only where some token has no replayed row)."""
    indices = replay.to(device)
    live = indices < 0
    return torch.where(live, own(), indices) if live.any() else indices


def _plain_top_k(router: nn.Module, rule: FamilyRule) -> bool:
    """Whether the choice is the top-k of the scores themselves (no table, bias or groups)."""
    return (
        rule.hash is None
        and rule.choose_on != "logits"
        and rule.choice_bias is None
        and not flag(router, rule.groups)
    )


def _choice(
    router: nn.Module,
    rule: FamilyRule,
    logits: Tensor,
    scores: Tensor,
    top_k: int,
    args: tuple[Tensor, ...],
    input_ids: Tensor | None,
) -> Tensor:
    """[N, k] the chosen experts (no gradient): a table lookup, or the top-k of scores (or
    logits) plus the correction bias, group-limited."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _choice(router, rule, logits, scores, top_k, args, input_ids)
    if rule.hash is not None:
        if input_ids is None:
            raise ValueError(f"{type(router).__name__} routes by token id: pass input_ids")
        return attribute(router, rule.hash)[input_ids.reshape(-1)].long()
    choice = logits if rule.choose_on == "logits" else scores
    bias = args[0] if rule.choice_bias == "arg" else attribute(router, rule.choice_bias)
    if bias is not None:
        choice = choice + bias.to(choice.dtype)
    if not flag(router, rule.groups):
        return group_limited_top_k(choice, top_k)
    return group_limited_top_k(
        choice,
        top_k,
        router.num_group,
        router.topk_group,
        best=rule.group_best,
        fill=rule.group_fill,
    )


class Router(PatchedForward):
    """A transformers router's patched forward: `route`, returned as the family's block
    reads it. A plain picklable object; the router is still called as a module, so
    transformers' output recorder still collects its logits for the auxiliary loss."""

    def __init__(self, router: nn.Module, rule: FamilyRule) -> None:
        self.router, self.rule = router, rule
        self.counts: Tensor | None = None  # [E] tokens routed to each expert, once set
        # [N] bool, set by a trainer around a forward: the real tokens (padding not counted)
        self.valid: Tensor | None = None
        self.replay: Tensor | None = None  # [N, k] ids to route by (`hf.replay`)
        self.recorded: list[Tensor] | None = None  # each call's [N, k] ids, while recording
        self.pending: deque[Tensor] = deque()  # replayed ids a recomputation will route by

    def replayed(self, rows: int) -> Tensor | None:
        """[rows, k] ids this call routes by: the replay's, or inside a backward (activation
        recomputation) the ids the forward it recomputes was routed by; None: its own."""
        if torch.compiler.is_compiling():  # traced: the replay as it stands (no bookkeeping)
            return self.replay
        if torch._C._current_graph_task_id() != -1:  # a recomputation in a backward
            return self.pending.popleft() if self.pending else self.replay
        if self.replay is None:
            self.pending.clear()  # a forward of its own: a replay's leftovers are stale
            return None
        if self.replay.shape[0] != rows:
            raise ValueError(
                f"replay_routing: the routes hold {self.replay.shape[0]} tokens, "
                f"{type(self.router).__name__} routes {rows} (the batch the routes were "
                "recorded for, [B, T, L, k])"
            )
        if torch.is_grad_enabled():
            self.pending.append(self.replay)
        return self.replay

    def record(self, indices: Tensor) -> None:
        """Keep this call's [N, k] ids while recording (not a recomputation's)."""
        if self.recorded is None:
            return
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            self.recorded.append(indices.detach() if indices.requires_grad else indices)

    def __call__(self, hidden_states: Tensor, *args: Tensor):
        router, rule = self.router, self.rule
        if rule.block == "switch":
            replay = self.replayed(hidden_states.numel() // hidden_states.shape[-1])
            mask, probs, logits, indices = _switch(router, rule, hidden_states, replay)
            self.record(indices)  # [N, 1] the choice, dropped tokens' too
            if self.counts is not None:
                flat = mask.reshape(-1, mask.shape[-1])  # [N, E]
                self._count((flat if self.valid is None else flat[self.valid]).sum(0))
            return mask, probs, logits
        if rule.block == "dbrx":  # the logits alone: the block routes and counts (`DbrxBlock`)
            return _jittered_logits(router, rule, hidden_states, "moe_jitter_eps")
        input_ids = args[0] if rule.hash is not None and args else None
        extra = args if rule.choice_bias == "arg" else ()
        replay = self.replayed(hidden_states.numel() // hidden_states.shape[-1])
        logits, weights, indices = route(
            router, rule, hidden_states, *extra, input_ids=input_ids, replay=replay
        )
        self.record(indices)
        if self.counts is not None:
            self._count_ids(indices, logits)
        if rule.block == "llama4":  # (scores [N, E]: the k weights, 0 elsewhere; logits)
            return torch.zeros_like(logits).scatter(1, indices, weights), logits
        return logits, weights, indices

    def _count_ids(self, indices: Tensor, logits: Tensor) -> None:
        if self.valid is not None and self.valid.numel() == indices.shape[0]:
            indices = indices[self.valid.to(indices.device)]  # [N', k] real tokens only
        ids = indices.reshape(-1)  # ids >= E: transformers' zero experts, not counted
        self._count(torch.bincount(ids[ids < logits.shape[-1]], minlength=logits.shape[-1]))

    def _count(self, per_expert: Tensor) -> None:
        """Routing statistics: while `counts` is a tensor (a trainer sets `torch.zeros(0)`)
        it accumulates each expert's tokens [E]: expert load, entropy, collapse."""
        if self.counts is not None:
            counts = per_expert.detach().to(self.counts.device, self.counts.dtype)
            self.counts = self.counts + counts if self.counts.numel() else counts


def _jittered_logits(router: nn.Module, rule: FamilyRule, hidden_states: Tensor, eps: str):
    """[N, E] router logits in the router dtype after transformers' multiplicative jitter, in
    place as transformers applies it (where x is the block's tensor the experts see it too)."""
    weight, bias = attribute(router, rule.weight), attribute(router, rule.bias)
    dtype = router_dtype(hidden_states.dtype)
    x = hidden_states.to(dtype)
    jitter = getattr(router, eps, None)
    if router.training and jitter:
        x *= torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(
            x.reshape(-1, weight.shape[-1]),
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
        )  # [N, E]


def _switch(
    router: nn.Module, rule: FamilyRule, hidden_states: Tensor, replay: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Switch Transformers' top-1 routing (moekit's `SwitchRouter`: the chosen expert's softmax
    probability) with its capacity: in each sequence an expert takes its first
    `expert_capacity` tokens by position, the rest are dropped (the residual carries them).
    Returns transformers' (dispatch mask [..., E] one-hot, probs [..., 1], logits [..., E]) and
    the chosen experts [N, 1]."""
    flat = _jittered_logits(router, rule, hidden_states, "jitter_noise")  # [N, E]
    logits = flat.reshape(*hidden_states.shape[:-1], -1)  # [B, S, E]
    weights, indices = softmax_top_k(flat, 1, normalize=False)  # [N, 1]
    if replay is not None:  # the replayed expert (a row of -1: its own), its live probability
        indices = replayed_ids(replay, lambda: indices, indices.device)
        weights = F.softmax(flat, dim=-1).gather(-1, indices)
    mask = F.one_hot(indices[:, 0], logits.shape[-1]).reshape(logits.shape)  # [B, S, E]
    position = torch.cumsum(mask, dim=-2)  # [B, S, E] 1-based within each sequence
    mask = mask * (position <= router.expert_capacity)
    probs = weights.reshape(*logits.shape[:-1], 1).to(hidden_states.dtype)
    return mask, probs, logits, indices
