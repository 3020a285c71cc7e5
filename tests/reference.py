"""Slow, obviously-right float64 oracles: one token (or one expert, or one slot) at a time.

Nothing here is vectorised beyond a single row, and the choices (top-k, capacity drops) are
made with Python's `sorted` on plain floats, independently of the library's torch ops.
Everything is differentiable, so the oracle also gives the reference gradients.
Never imported by `src/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ExpertParams:
    """Stacked expert parameters in float64: w1 [E, d, h|2h], w2 [E, h, d], b1/b2 or None."""

    w1: Tensor
    w2: Tensor
    b1: Tensor | None
    b2: Tensor | None
    activation: str

    def apply(self, e: int, x: Tensor) -> Tensor:
        """Expert e on one token x [d] -> [d]."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        if self.activation == "relu":
            h = torch.relu(h)
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            half = h.shape[0] // 2
            gate, up = h[:half], h[half:]
            h = gate * torch.sigmoid(gate) * up
        y = h @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y


@dataclass
class GateParams:
    weight: Tensor  # [E, d]
    bias: Tensor | None  # [E]

    def logits(self, x: Tensor) -> Tensor:
        """One token x [d] -> [E]."""
        out = self.weight @ x
        return out + self.bias if self.bias is not None else out


def choose(
    logits: Tensor,
    rule: str,
    top_k: int,
    expert_bias: Tensor | None = None,
    *,
    groups: tuple[int, int] | None = None,
    normalize: bool = True,
    scale: float = 1.0,
):
    """One token's choice: a list of (expert, weight tensor) and its probability row [E].

    rules: "softmax" (weights = softmax over the chosen logits), "softmax_full" (weights = the
    full softmax probability), "sigmoid" (choice by sigmoid + bias, weights = the chosen scores,
    divided by their sum when `normalize`). `groups` = (G, kept groups): the choice is made
    among the experts of the kept groups, ranked by the sum of their two best keys (DeepSeek-V3).
    Weights are multiplied by `scale`.
    """
    num_experts = logits.shape[0]
    if rule == "sigmoid":
        scores = torch.sigmoid(logits)
        bias = [0.0] * num_experts if expert_bias is None else expert_bias.tolist()
        key = [scores[e].item() + bias[e] for e in range(num_experts)]
    else:
        probs = torch.softmax(logits, dim=0)
        key = logits.tolist()
    candidates = list(range(num_experts))
    if groups is not None:
        num_groups, kept = groups
        size = num_experts // num_groups
        members = [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]
        group_key = [sum(sorted((key[e] for e in m), reverse=True)[:2]) for m in members]
        best = sorted(range(num_groups), key=lambda g: -group_key[g])[:kept]
        candidates = [e for g in sorted(best) for e in members[g]]
    chosen = sorted(candidates, key=lambda e: -key[e])[:top_k]
    if rule == "softmax":
        exps = [torch.exp(logits[e] - logits[chosen[0]]) for e in chosen]
        total = sum(exps)
        return [(e, scale * w / total) for e, w in zip(chosen, exps, strict=True)], probs
    if rule == "softmax_full":
        return [(e, scale * probs[e]) for e in chosen], probs
    total = sum(scores[e] for e in chosen) if normalize else 1.0
    return [(e, scale * scores[e] / total) for e in chosen], scores / scores.sum()


def dense_mlp(x: Tensor, fc1: Tensor, fc2: Tensor, activation: str, gate: Tensor | None = None):
    """A shared expert on one token x [d]: fc1 [width, d] and fc2 [d, h] in nn.Linear layout,
    optionally scaled by sigmoid(gate @ x), gate [1, d]."""
    out = ExpertParams(fc1.t()[None], fc2.t()[None], None, None, activation).apply(0, x)
    return out if gate is None else torch.sigmoid(gate @ x) * out


def token_choice_moe(
    x: Tensor,
    gate: GateParams,
    experts: ExpertParams,
    rule: str,
    top_k: int,
    capacity_factor: float | None = None,
    expert_bias: Tensor | None = None,
    **choice,
):
    """Reference token-choice MoE on x [N, d]; `choice`: `choose`'s keyword options.

    Returns (out [N, d], probs [N, E], pairs): pairs is the list of kept (token, slot, expert).
    Capacity: each expert keeps its ceil(cf * N * k / E) heaviest pairs, ties to lower position.
    """
    num_tokens, d = x.shape
    num_experts = gate.weight.shape[0]
    choices, prob_rows = [], []
    for n in range(num_tokens):
        picked, probs = choose(gate.logits(x[n]), rule, top_k, expert_bias, **choice)
        choices.append(picked)
        prob_rows.append(probs)
    kept = {(n, j) for n in range(num_tokens) for j in range(top_k)}
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
        for e in range(num_experts):
            mine = [
                (n, j) for n in range(num_tokens) for j in range(top_k) if choices[n][j][0] == e
            ]
            mine.sort(key=lambda p: (-choices[p[0]][p[1]][1].item(), p[0] * top_k + p[1]))
            kept -= set(mine[capacity:])
    rows = []
    for n in range(num_tokens):
        acc = x.new_zeros(d)
        for j, (e, w) in enumerate(choices[n]):
            if (n, j) in kept:
                acc = acc + w * experts.apply(e, x[n])
        rows.append(acc)
    out = torch.stack(rows) if rows else x.new_zeros(0, d)
    probs = torch.stack(prob_rows) if prob_rows else x.new_zeros(0, num_experts)
    pairs = sorted((n, j, choices[n][j][0]) for (n, j) in kept)
    return out, probs, pairs, choices


def expert_choice_moe(x: Tensor, gate: GateParams, experts: ExpertParams, capacity: int):
    """Reference expert-choice MoE: expert e takes the `capacity` tokens of highest prob."""
    num_tokens, d = x.shape
    num_experts = gate.weight.shape[0]
    probs = [torch.softmax(gate.logits(x[n]), dim=0) for n in range(num_tokens)]
    out = [x.new_zeros(d) for _ in range(num_tokens)]
    for e in range(num_experts):
        ranked = sorted(range(num_tokens), key=lambda n: -probs[n][e].item())[:capacity]
        for n in ranked:
            out[n] = out[n] + probs[n][e] * experts.apply(e, x[n])
    return torch.stack(out) if out else x.new_zeros(0, d)


def load_balancing_loss(probs: Tensor, choices: list, num_experts: int) -> Tensor:
    """E * sum_i f_i P_i with f over all chosen (token, slot) pairs."""
    num_tokens = len(choices)
    if num_tokens == 0:
        return probs.sum() * 0.0
    top_k = len(choices[0])
    total = probs.new_zeros(())
    for i in range(num_experts):
        f_i = sum(1 for picked in choices for e, _ in picked if e == i) / (num_tokens * top_k)
        p_i = sum(probs[n][i] for n in range(num_tokens)) / num_tokens
        total = total + f_i * p_i
    return num_experts * total


def soft_moe(x: Tensor, phi: Tensor, experts: ExpertParams) -> Tensor:
    """Reference Soft MoE on x [B, n, d] with phi [d, E, S], one slot and one token at a time."""
    batch, n, d = x.shape
    _, num_experts, num_slots = phi.shape
    outs = []
    for b in range(batch):
        logits = [
            [[x[b, t] @ phi[:, e, s] for s in range(num_slots)] for e in range(num_experts)]
            for t in range(n)
        ]
        slot_out = {}
        for e in range(num_experts):
            for s in range(num_slots):
                column = torch.stack([logits[t][e][s] for t in range(n)])
                weights = torch.softmax(column, dim=0)
                slot_in = sum(weights[t] * x[b, t] for t in range(n))
                slot_out[e, s] = experts.apply(e, slot_in)
        rows = []
        for t in range(n):
            flat = torch.stack(
                [logits[t][e][s] for e in range(num_experts) for s in range(num_slots)]
            )
            weights = torch.softmax(flat, dim=0)
            keys = [(e, s) for e in range(num_experts) for s in range(num_slots)]
            rows.append(sum(weights[i] * slot_out[key] for i, key in enumerate(keys)))
        outs.append(torch.stack(rows))
    return torch.stack(outs)
