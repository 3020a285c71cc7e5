"""Routing replay for reinforcement learning (R3): record each token's top-k experts in every
MoE layer during a rollout, then route the training forward by them, the weights still
computed from the live router logits so the routers keep their gradient.

    with record_routing(model) as rec:     any forward or `generate` (patched on entry)
        ...
    rec.routes                    -> [B, T, L, k] int64: the batch's tokens (a generate's
                                     prompt and each generated token), the model's MoE layers
                                     in order, each token's top-k expert ids
    rec.per_sequence(mask=None)   -> [[length, L, k], ...]  vLLM's per-sequence layout
    with replay_routing(model, routes):    routes [B, T, L, k]; a token's -1 row: its own
        ...                                choice; the next forwards (their backward and any
                                           activation recomputation) route by the ids
    routing_overlap(model_a, model_b, batch) -> [L] mean fraction of each token's top-k
                                     experts that both models chose
    router_mismatch(a, b, mask=None) -> float  fraction of (token, layer) pairs whose
                                     top-k sets differ
    RolloutRoutes()               routes of rollouts by their tokens: `.add(tokens, routes)`
                                     a sequence's, `.batch(input_ids, attention_mask)` a
                                     training batch's [B, T, L, k] (-1 where unknown)
    rec.generated(prompts, completions) -> [[p + c, L, k], ...]  a left-padded `generate`'s
                                     routes, each sequence's real tokens
    from_vllm(routed_experts)     -> [B, T, L, k]  vLLM's per-sequence `routed_experts`,
                                     right-padded with -1
    from_sglang(data, layers, top_k) -> [T, L, k]  SGLang's base64 int32 routes

Replay reaches the patched router of every MoE layer (`routers.Router.replayed`): the family's
own rule then computes the weights from the live logits for the given ids (softmax over all
experts gathered and renormalised where the family renormalises, sigmoid scores with the
correction bias used for selection only, scaling factors; group limits do not apply to
replayed ids). A recomputation in the backward (gradient checkpointing) routes by the ids its
forward was routed by, inside the context or after it. Recording inside a replay records what
was replayed.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .aux import routers
from .patch import holds_experts, is_patched, patch_model, router_of
from .routers import Router, attribute

__all__ = [
    "Recording",
    "RolloutRoutes",
    "from_sglang",
    "from_vllm",
    "record_routing",
    "replay_routing",
    "router_mismatch",
    "routing_overlap",
]


def _moe_routers(model: nn.Module) -> list[Router]:
    """The patched routers of `model`'s MoE layers in order, patching it first where needed."""
    blocks = [m for m in model.modules() if holds_experts(m)]
    if any(not is_patched(b) for b in blocks if router_of(b)[0] is not None):
        patch_model(model)
    found = routers(model)
    if not found:
        raise ValueError(
            "record_routing / replay_routing: the model has no MoE block moekit routes "
            "(moekit.hf.patch_model covers the families in moekit.hf.RULES)"
        )
    return found


def _blocks(model: nn.Module, layers: list[Router]) -> list[nn.Module]:
    """The MoE block of each router, in the same order (by the patched forwards, not class
    names: FSDP2 renames the classes it wraps)."""
    owner = {}
    for block in model.modules():
        if holds_experts(block):
            for module in block.modules():
                forward = module.__dict__.get("forward")
                if isinstance(forward, Router):
                    owner.setdefault(id(forward), block)
    return [owner[id(r)] for r in layers]


class Recording:
    """What `record_routing` saw: each layer's ids per call and each call's batch shape."""

    def __init__(self, layers: list[Router]) -> None:
        self.layers = layers
        self.calls: list[list[Tensor]] = [[] for _ in layers]  # [L][calls] ids [N, k]
        self.shapes: list[list[tuple[int, ...]]] = [[] for _ in layers]  # (B, t) a call

    @property
    def routes(self) -> Tensor:
        """[B, T, L, k] int64: every call's tokens side by side along T (a generate's prefill
        then each decoding step)."""
        per_layer = []
        for l, (calls, shapes) in enumerate(zip(self.calls, self.shapes, strict=True)):
            if not calls:
                raise ValueError(f"record_routing: MoE layer {l} routed no token")
            parts = []
            if len(calls) != len(shapes):
                raise ValueError(
                    f"record_routing: MoE layer {l} routed in {len(calls)} of the "
                    f"{len(shapes)} forwards recorded"
                )
            for ids, shape in zip(calls, shapes, strict=True):
                batch = shape[0] if len(shape) == 2 else 1
                if ids.shape[0] != math.prod(shape):
                    raise ValueError(
                        f"record_routing: MoE layer {l} routed {ids.shape[0]} of its block's "
                        f"{math.prod(shape)} tokens (a family that routes some tokens apart, "
                        "such as a multimodal model's): no route for every token"
                    )
                parts.append(ids.reshape(batch, -1, ids.shape[-1]))
            if len({p.shape[0] for p in parts}) > 1:
                raise ValueError(
                    "record_routing: forwards of different batch sizes "
                    f"({sorted({p.shape[0] for p in parts})}) cannot be put side by side"
                )
            per_layer.append(torch.cat(parts, dim=1))  # [B, T, k]
        return torch.stack(per_layer, dim=2).long().cpu()  # [B, T, L, k]

    def generated(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[Tensor]:
        """The routes of a `generate` over left-padded prompts: each sequence's real tokens,
        its prompt then its completion [p + c, L, k]. The last generated token was never fed
        back (its row -1: routed live on replay; no log-probability depends on it)."""
        routes = self.routes  # [B, P + C - 1, L, k]
        width = self.shapes[0][0][-1] if self.shapes[0] and len(self.shapes[0][0]) == 2 else 0
        if len(prompts) != routes.shape[0] or len(completions) != routes.shape[0]:
            raise ValueError(
                f"generated: {len(prompts)} prompts and {len(completions)} completions for "
                f"{routes.shape[0]} recorded sequences"
            )
        found = []
        for row, prompt, completion in zip(routes, prompts, completions, strict=True):
            p, c = len(prompt), len(completion)
            seq = torch.full((p + c, *row.shape[1:]), -1, dtype=row.dtype)
            seq[:p] = row[width - p : width]
            done = min(c, row.shape[0] - width)
            seq[p : p + done] = row[width : width + done]
            found.append(seq)
        return found

    def per_sequence(self, mask: Tensor | None = None) -> list[Tensor]:
        """vLLM's layout: one [length, L, k] a sequence, its tokens where `mask` [B, T] is
        true (default: all)."""
        routes = self.routes
        if mask is None:
            return list(routes)
        mask = mask.bool().cpu()
        if mask.shape != routes.shape[:2]:
            raise ValueError(
                f"mask must be [B, T] = {list(routes.shape[:2])}, got {list(mask.shape)}"
            )
        return [r[m] for r, m in zip(routes, mask, strict=True)]


def _shape_hooks(model: nn.Module, layers: list[Router], rec: Recording) -> list:
    """Hooks that note each forward's batch shape (B, t) for every layer: one on the decoder
    where it holds every MoE block (a decode step pays one hook, not one a layer), else one on
    each block."""
    blocks = _blocks(model, layers)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, nn.Module) and set(map(id, blocks)) <= set(map(id, decoder.modules())):

        def batch(module, args, kwargs):
            x = kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            x = args[0] if x is None and args else x
            if isinstance(x, Tensor) and torch._C._current_graph_task_id() == -1:
                shape = tuple(x.shape[:2])
                for shapes in rec.shapes:
                    shapes.append(shape)

        return [decoder.register_forward_pre_hook(batch, with_kwargs=True)]
    handles = []
    for l, block in enumerate(blocks):

        def shape(module, args, kwargs, l=l):
            if torch._C._current_graph_task_id() == -1:  # not a recomputation
                x = args[0] if args else next(iter(kwargs.values()))
                rec.shapes[l].append(tuple(x.shape[:-1]))

        handles.append(block.register_forward_pre_hook(shape, with_kwargs=True))
    return handles


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[Recording]:
    """Record the top-k expert ids of every MoE layer for every token the model routes inside
    the context (`Recording.routes`); outputs unchanged."""
    layers = _moe_routers(model)
    rec = Recording(layers)
    handles = _shape_hooks(model, layers, rec)
    previous = [r.recorded for r in layers]
    for r, calls in zip(layers, rec.calls, strict=True):
        r.recorded = calls
    try:
        yield rec
    finally:
        for r, before in zip(layers, previous, strict=True):
            r.recorded = before
        for handle in handles:
            handle.remove()


def _check_routes(routes: Tensor, layers: list[Router], blocks: list[nn.Module]) -> Tensor:
    if not isinstance(routes, Tensor) or routes.dim() != 4:
        shape = list(routes.shape) if isinstance(routes, Tensor) else type(routes).__name__
        raise ValueError(f"routes must be a [B, T, L, k] integer tensor, got {shape}")
    if routes.dtype.is_floating_point or routes.dtype == torch.bool:
        raise ValueError(f"routes must hold integer expert ids, got {routes.dtype}")
    if routes.shape[2] != len(layers):
        raise ValueError(
            f"routes hold {routes.shape[2]} MoE layers (dim 2), the model has {len(layers)}"
        )
    for l, (router, block) in enumerate(zip(layers, blocks, strict=True)):
        experts = attribute(router.router, router.rule.weight).shape[0]
        top_k = _top_k(router, block)
        ids = routes[:, :, l]
        if ids.shape[-1] != top_k:
            raise ValueError(
                f"routes hold {ids.shape[-1]} experts a token, layer {l} routes {top_k}"
            )
        if ids.numel() and (ids.max() >= experts or ids.min() < -1):
            bad = ids[(ids >= experts) | (ids < -1)][0].item()
            raise ValueError(
                f"routes: expert id {bad} in layer {l}, which has {experts} experts "
                "(ids 0..E-1, or -1 for a token's own choice)"
            )
    return routes.long()


def _top_k(router: Router, block: nn.Module) -> int:
    """The experts a token of this layer is routed to."""
    rule = router.rule
    if rule.block == "switch":
        return 1
    if rule.block == "dbrx":  # the block chooses (`blocks.DbrxBlock`)
        return int(block.top_k)
    return int(attribute(router.router, rule.top_k))


@contextlib.contextmanager
def replay_routing(model: nn.Module, routes: Tensor) -> Iterator[None]:
    """Route every token of the forwards inside the context by `routes` [B, T, L, k] (the
    batch's tokens in the order the model sees them, -1 rows: the router's own choice); see
    the module docstring."""
    layers = _moe_routers(model)
    routes = _check_routes(routes, layers, _blocks(model, layers))
    previous = [r.replay for r in layers]
    for l, router in enumerate(layers):
        router.pending.clear()
        router.replay = routes[:, :, l].reshape(-1, routes.shape[-1])  # [B T, k]
    try:
        yield
    finally:
        for router, before in zip(layers, previous, strict=True):
            router.replay = before


class RolloutRoutes:
    """Routes of rollouts kept by their tokens, for the training batches that hold them."""

    def __init__(self) -> None:
        self.routes: dict[tuple[int, ...], Tensor] = {}

    def add(self, tokens: Sequence[int], routes: Tensor) -> None:
        """A sequence's real tokens [n] and their routes [n, L, k]."""
        if routes.dim() != 3 or routes.shape[0] != len(tokens):
            raise ValueError(
                f"RolloutRoutes.add: {len(tokens)} tokens, routes {list(routes.shape)} "
                "(expected [tokens, L, k])"
            )
        self.routes[tuple(int(t) for t in tokens)] = routes

    def batch(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T, L, k] a batch's routes: each row's real tokens (mask 1, any padding) by
        the sequence they make; -1 for a sequence not kept, and for padding."""
        if not self.routes:
            raise ValueError("RolloutRoutes.batch: no rollout was added")
        like = next(iter(self.routes.values()))
        out = torch.full((*input_ids.shape, *like.shape[1:]), -1, dtype=like.dtype)
        for b, (ids, mask) in enumerate(
            zip(input_ids.cpu(), attention_mask.bool().cpu(), strict=True)
        ):
            found = self.routes.get(tuple(ids[mask].tolist()))
            if found is not None:
                out[b, mask] = found
        return out

    def clear(self) -> None:
        self.routes.clear()


def router_mismatch(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """The fraction of (token, layer) pairs whose top-k expert sets differ between two
    routes [B, T, L, k] (tokens where `mask` [B, T] is true)."""
    if a.shape != b.shape:
        raise ValueError(f"routes of shapes {list(a.shape)} and {list(b.shape)}")
    differ = (a.sort(-1).values != b.sort(-1).values).any(-1)  # [B, T, L]
    if mask is not None:
        differ = differ[mask.bool().to(differ.device)]
    return differ.float().mean().item() if differ.numel() else 0.0


def _overlap(a: Tensor, b: Tensor) -> Tensor:
    """[B, T, L] the fraction of a's k experts that b chose too."""
    return (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1)


@torch.no_grad()
def routing_overlap(
    model_a: nn.Module, model_b: nn.Module | None, batch: dict, mask: Tensor | None = None
) -> Tensor:
    """[L] for each MoE layer the mean over tokens (where `mask` [B, T], default the batch's
    attention mask, is true) of the fraction of each token's top-k experts in `model_a` that
    `model_b` also chose on `batch` (the model's keyword arguments). `model_b` None: model_a
    with its PEFT adapters disabled (the base model, no second copy)."""
    with record_routing(model_a) as rec_a:
        model_a(**batch)
    if model_b is None:
        with model_a.disable_adapter(), record_routing(model_a) as rec_b:
            model_a(**batch)
    else:
        with record_routing(model_b) as rec_b:
            model_b(**batch)
    a, b = rec_a.routes, rec_b.routes
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"the models routed {list(a.shape)} and {list(b.shape)}")
    mask = batch.get("attention_mask") if mask is None else mask
    overlap = _overlap(a, b)  # [B, T, L]
    if mask is not None:
        overlap = overlap[mask.bool().cpu()]  # [tokens, L]
    return overlap.reshape(-1, a.shape[2]).mean(0)


def from_vllm(routed_experts: Sequence) -> Tensor:
    """vLLM's per-sequence `routed_experts` (arrays [length, L, k]) -> [B, T, L, k], each
    sequence right-padded with -1 to the longest."""
    seqs = [torch.as_tensor(np.asarray(r)).long() for r in routed_experts]
    if not seqs:
        raise ValueError("from_vllm: no sequence")
    for i, s in enumerate(seqs):
        if s.dim() != 3 or s.shape[1:] != seqs[0].shape[1:]:
            raise ValueError(
                f"from_vllm: sequence {i} is {list(s.shape)}, expected [length, L, k] "
                f"like sequence 0's {list(seqs[0].shape)}"
            )
    out = torch.full((len(seqs), max(s.shape[0] for s in seqs), *seqs[0].shape[1:]), -1)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def from_sglang(data: str | bytes, layers: int, top_k: int) -> Tensor:
    """SGLang's routes, base64 of int32 [tokens, L, k] -> [tokens, L, k] int64."""
    raw = base64.b64decode(data)
    if len(raw) % (4 * layers * top_k):
        raise ValueError(
            f"from_sglang: {len(raw)} bytes is not a whole number of tokens of {layers} layers "
            f"x {top_k} int32 ids"
        )
    ids = np.frombuffer(raw, dtype="<i4").reshape(-1, layers, top_k)
    return torch.from_numpy(ids.astype(np.int64))
