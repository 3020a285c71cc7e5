"""moekit as a transformers experts backend: `experts_implementation="moekit"`.

transformers calls a backend as it calls its own: `(experts_module, hidden_states [T, d],
top_k_index [T, k], top_k_weights [T, k]) -> [T, d]`; the router and the rest of the block stay
transformers'. Here:

    plan    make_plan(top_k_index, top_k_weights): the T*k pairs sorted by expert
    fast    the module's activation is one of moekit's kernels' (`fast_activation`): the
            module's tensors as a bank's (`bank_weights`) through `bank_dispatch` (on CPU
            gather, experts and combine fused in one op; on accelerators grouped GEMMs,
            Triton on CUDA)
    general anything else (a class `_apply_gate` such as gpt-oss's clamped SwiGLU, interleaved
            gate/up, other activations, a post-expert norm): moekit's gather and grouped GEMMs
            around the module's own `_apply_gate` / `act_fn` / `post_expert_norm`, then
            moekit's combine
    decode  a few tokens with no gradient (a `generate` step: T * k <= `_DECODE_PAIRS`): no
            plan; each chosen expert's rows through views of its weights (`_decode`), the
            cost that of the experts used, not of all E

PEFT LoRA on the stacked expert weights (`LoraConfig(target_parameters=[...])`, TRL's
`SFTTrainer(peft_config=...)`) reaches the backend with no `patch_model`: PEFT's `ParamWrapper`
parametrizes the weights it targets as W + scaling * lhs @ rhs while its forward runs, formed
only when read; the backend reads W and the factors instead (`experts.peft_lora`) and adds
the low-rank terms per expert in the general path, as `blocks.LoraExperts` does after the
patch. Where PEFT forms W + delta itself (several active adapters) the backend runs on it.
`lora_path_calls(model)` counts the grouped passes that computed LoRA terms.

`register()` adds the backend to transformers' `ExpertsInterface` (its public `register`);
`import moekit.hf` calls it when transformers is installed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import DispatchPlan, make_plan
from ..experts import bank_dispatch, row_experts
from ..ops import combine, gather, grouped_linear, row_bias
from ..ops.grouped import grouped_mm_supported
from ..quant import quant_grouped_linear
from .experts import (
    Layout,
    bank_weights,
    fast_activation,
    layout_of,
    peft_lora,
    quantized,
    stored_weight,
    unsupported_weights,
)

__all__ = ["NAME", "experts_forward", "lora_path_calls", "register", "run_experts"]

NAME = "moekit"
_CALLS = "_moekit_lora_calls"  # an experts module's count of its `lora_path_calls`


def register() -> None:
    """Make `experts_implementation="moekit"` valid everywhere transformers takes a backend
    name (`from_pretrained`, `from_config`, `set_experts_implementation`)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, experts_forward)


def lora_path_calls(model: nn.Module) -> int:
    """How many times moekit's grouped pass computed PEFT LoRA terms for the experts of
    `model`: PEFT's wrapped experts on the backend, `patch_model`'s `LoraExperts`, expert
    parallel or not. Each experts module counts its own eager calls (calls traced by
    torch.compile are not counted: a changing count would recompile the graph), so a count
    that stays put says PEFT formed W + delta itself, or no adapter was active.

    Raises:
        TypeError: `model` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(m.__dict__.get(_CALLS, 0) for m in model.modules())


def experts_forward(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts of a transformers MoE block on moekit's plan and kernels.

    Args:
        module: A transformers experts module (stacked weights, the layout flags of
            `@use_experts_implementation`).
        hidden_states: Tokens [T, d].
        top_k_index: [T, k] the experts of each token (transformers' expert-parallel
            sentinels, ids >= E, add nothing).
        top_k_weights: [T, k] their combine weights.

    Returns:
        [T, d] in the dtype of `hidden_states`.
    """
    return _run(module, hidden_states, top_k_index, top_k_weights)


def _run(
    module: nn.Module, x: Tensor, indices: Tensor, weights: Tensor, lora: dict | None = None
) -> Tensor:
    layout = layout_of(module)
    _check_weights(module, layout)
    if x.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected hidden_states [T, d], top_k_index and top_k_weights [T, k]; got "
            f"{tuple(x.shape)}, {tuple(indices.shape)}, {tuple(weights.shape)}"
        )
    num_experts = stored_weight(module, "down_proj").shape[0]
    if getattr(module, "_is_expert_parallel", False):  # sentinels: weight 0, any expert
        weights = weights.masked_fill(indices >= num_experts, 0.0)
        indices = indices.clamp(max=num_experts - 1)
    if hasattr(module, "parametrizations"):  # inside PEFT's forward: its factors
        lora = {**peft_lora(module, layout), **(lora or {})}
    decoding = indices.numel() <= _DECODE_PAIRS and not torch.is_grad_enabled()
    if decoding and not lora and not torch.compiler.is_compiling():  # traced: the plan
        return _decode(module, layout, x, indices, weights)
    return run_experts(module, layout, x, make_plan(indices, weights, num_experts), lora=lora)


_DECODE_PAIRS = 32  # (token, expert) pairs a call at most for `_decode`
_LOOP_SEGMENTS = 8  # pairs a `_decode` call loops over in Python; more: F.grouped_mm


def _segments(chosen: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first, end) of each run of equal ids in the sorted `chosen`."""
    segments, start = [], 0
    for p in range(1, len(chosen) + 1):
        if p == len(chosen) or chosen[p] != chosen[start]:
            segments.append((chosen[start], start, p))
            start = p
    return segments


_CHECKED = "_moekit_checked"  # the weights `_check_weights` last found readable


def _check_weights(module: nn.Module, layout: Layout) -> None:
    """One line where moekit cannot read the module's expert weights; checked again only
    when the tensors the module holds change (a decode step calls it once a layer). Under a
    parametrization (PEFT's) every call, never reading the parametrized value (W + delta)."""
    key = None
    if not hasattr(module, "parametrizations"):
        key = tuple(
            (id(t), t.dtype, type(t)) if isinstance(t, Tensor) else None
            for t in (getattr(module, layout.up_name, None), getattr(module, "down_proj", None))
        )
        if module.__dict__.get(_CHECKED) == key:
            return
    reason = unsupported_weights(module, layout)
    if reason is not None:
        raise TypeError(f"{type(module).__name__} cannot run on moekit's experts backend: {reason}")
    if key is not None:
        module.__dict__[_CHECKED] = key


def _decode(module: nn.Module, layout: Layout, x: Tensor, indices: Tensor, weights: Tensor):
    """A few tokens x [T, d] (no gradient): the T k pairs sorted by expert, each chosen
    expert's rows through views of its weights (or its dequantised weight) into one buffer,
    the module's gate or activation, biases and post-expert norm over the buffer at once,
    weighted and summed into [T, d]. Up to `_LOOP_SEGMENTS` pairs a matmul per chosen expert
    (one host read: the ids); more, torch's grouped GEMM (its C++ loop over the experts)."""
    quant_up, quant_down = quantized(module, layout.up_name), quantized(module, "down_proj")
    plain = quant_up is None and quant_down is None
    views = _expert_views(module, layout) if plain else None
    dtype = views.w1.dtype if plain else quant_up.dtype
    top_k, one = indices.shape[1], x.shape[0] == 1  # one token: every pair its row
    ids, order = torch.sort(indices.reshape(-1))  # [S] pairs by expert
    token = order // top_k  # [S] each pair's token
    rows = x.to(dtype).expand(top_k, -1) if one else x.to(dtype)[token]  # [S, d]
    grouped = plain and views.grouped and ids.numel() > _LOOP_SEGMENTS
    if grouped:
        offsets = torch.bincount(ids, minlength=views.w1.shape[0]).cumsum(0).to(torch.int32)
        hidden = F.grouped_mm(rows, views.w1, offs=offsets)  # [S, width]
    else:
        segments = _segments(ids.tolist())
        ups = views.ups if plain else [quant_up.expert(e, dtype) for e, _, _ in segments]
        width = ups[0].shape[1]
        hidden = rows.new_empty(rows.shape[0], width)  # [S, width]
        for i, (e, a, b) in enumerate(segments):
            torch.mm(rows[a:b], ups[e] if plain else ups[i], out=hidden[a:b])
    if layout.has_bias:
        hidden = hidden + getattr(module, f"{layout.up_name}_bias")[ids]
    hidden = _gate(module, hidden) if layout.has_gate else module.act_fn(hidden)  # [S, h]
    if grouped:
        out = F.grouped_mm(hidden.contiguous(), views.w2, offs=offsets)  # [S, d]
    else:
        downs = views.downs if plain else [quant_down.expert(e, dtype) for e, _, _ in segments]
        out = rows.new_empty(rows.shape[0], x.shape[1])  # [S, d]
        for i, (e, a, b) in enumerate(segments):
            torch.mm(hidden[a:b], downs[e] if plain else downs[i], out=out[a:b])
    if layout.has_bias:
        out = out + module.down_proj_bias[ids]
    if layout.has_post_expert_norm:
        out = module.post_expert_norm(out)
    slot = weights.reshape(-1)[order].to(dtype)  # [S]
    if one:  # [1, S] @ [S, d]: the weighted sum in one GEMM
        return (slot[None] @ out).to(x.dtype)
    return torch.zeros_like(x, dtype=dtype).index_add_(0, token, out * slot[:, None]).to(x.dtype)


class _Views(NamedTuple):
    """An experts module's weights as `_decode` reads them, made once a set of tensors."""

    key: tuple
    w1: Tensor  # [E, d, width]
    w2: Tensor  # [E, h, d]
    ups: tuple[Tensor, ...]  # E views [d, width]
    downs: tuple[Tensor, ...]  # E views [h, d]
    grouped: bool  # F.grouped_mm takes them


_VIEWS = "_moekit_decode_views"


def _expert_views(module: nn.Module, layout: Layout) -> _Views:
    up, down = stored_weight(module, layout.up_name), stored_weight(module, "down_proj")
    key = (id(up), id(down), up.data_ptr(), down.data_ptr(), up.dtype, up.device)
    views = module.__dict__.get(_VIEWS)
    if views is None or views.key != key:
        bank = bank_weights(module, layout)
        grouped = grouped_mm_supported(bank.w1, bank.w1) and grouped_mm_supported(bank.w2, bank.w2)
        views = _Views(key, bank.w1, bank.w2, bank.w1.unbind(0), bank.w2.unbind(0), grouped)
        module.__dict__[_VIEWS] = views
    return views


def run_experts(
    module: nn.Module,
    layout: Layout,
    x: Tensor,
    plan: DispatchPlan,
    scale_input: bool = False,
    lora: dict | None = None,
) -> Tensor:
    """Tokens x [N, d] through the experts of a transformers module by `plan` -> [N, d] in
    x's dtype: moekit's fused kernels where they compute the module's activation, else the
    general path (`_general`). `scale_input`: the routing weight scales each expert's input,
    not its output (Llama 4). `lora`: {parameter name: (lhs, rhs, scaling)}, low-rank deltas
    of the stacked weights in their own layout (W + scaling * lhs @ rhs, PEFT's factors),
    computed per expert on its rows. The block patch calls it too."""
    if lora and not torch.compiler.is_compiling():  # `lora_path_calls`
        setattr(module, _CALLS, module.__dict__.get(_CALLS, 0) + 1)
    quant = quantized(module, layout.up_name) or quantized(module, "down_proj")
    activation = None if scale_input or lora or quant else fast_activation(module, layout)
    if activation is not None:
        weights = bank_weights(module, layout)
        out = bank_dispatch(weights, x, plan, activation, training=module.training)
    else:
        out = _general(module, layout, x, plan, scale_input, lora or {})
    return out.to(x.dtype)


def _gate(module: nn.Module, hidden: Tensor) -> Tensor:
    """The module's gate on [M, width] rows: its class's `_apply_gate`, else transformers'
    default ([gate | up] -> act_fn(gate) * up)."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(hidden)
    gate, up = hidden.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _low_rank(rows: Tensor, factors: tuple, transposed: bool, offsets: Tensor) -> Tensor:
    """rows [M, d_in] grouped by expert @ the delta scaling * lhs @ rhs of a weight stored
    [E, a, b] (a = d_in where `transposed`, else d_out): two rank-r grouped GEMMs, [M, r]
    in between; the delta itself is never formed."""
    lhs, rhs, scaling = factors  # [E, a, r], [E, r, b]
    first, second = (lhs, rhs) if transposed else (rhs.transpose(1, 2), lhs.transpose(1, 2))
    # the factors are views of PEFT's [r*E, in] and [out, r*E] weights: made contiguous (E*r*(a+b)
    # elements; the scaling folded into the second) for the grouped GEMMs
    first, second = (
        first.to(rows.dtype).contiguous(),
        (scaling * second).to(rows.dtype).contiguous(),
    )
    low = grouped_linear(rows, first, offsets)  # [M, r]
    return grouped_linear(low, second, offsets)  # [M, d_out]


def _linear(module: nn.Module, name: str, rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """rows @ the experts' weight `name` per segment: one grouped GEMM, or where the weight is
    stored quantised, each expert's dequantised in turn (`quant_grouped_linear`)."""
    quant = quantized(module, name)
    if quant is None:
        return grouped_linear(rows, weight, offsets)
    return quant_grouped_linear(rows, quant, offsets)


def _general(
    module: nn.Module,
    layout: Layout,
    x: Tensor,
    plan: DispatchPlan,
    scale_input: bool = False,
    lora: dict | None = None,
) -> Tensor:
    """gather (x the routing weight where it scales the input) -> up (+ bias, + LoRA) -> the
    module's gate or activation -> down (+ bias, + LoRA) -> the module's post-expert norm ->
    weighted combine; moekit's kernels, the module's functions."""
    lora = lora or {}
    # W, not W + delta, where PEFT's wrapper keeps the factors (their terms are in `lora`)
    up, down = stored_weight(module, layout.up_name), stored_weight(module, "down_proj")
    dtype = up.dtype
    w1 = up if layout.is_transposed else up.transpose(1, 2)  # [E, d, width]
    w2 = down if layout.is_transposed else down.transpose(1, 2)  # [E, h, d]
    offsets = torch.cumsum(plan.group_sizes, 0).to(torch.int32)  # [E]
    rows = gather(x.to(dtype), plan.token_index, plan.pair_index, plan.top_k)  # [M, d]
    slot_weight = plan.slot_weight.to(dtype)  # [M]
    if scale_input:
        rows, slot_weight = rows * slot_weight[:, None], torch.ones_like(slot_weight)
    hidden = _linear(module, layout.up_name, rows, w1, offsets)  # [M, width]
    if layout.up_name in lora:
        hidden = hidden + _low_rank(rows, lora[layout.up_name], layout.is_transposed, offsets)
    expert = None
    if layout.has_bias:
        expert = row_experts(plan.group_sizes, rows.shape[0])  # [M]
        hidden = hidden + row_bias(getattr(module, f"{layout.up_name}_bias"), expert)
    hidden = _gate(module, hidden) if layout.has_gate else module.act_fn(hidden)  # [M, h]
    out = _linear(module, "down_proj", hidden, w2, offsets)  # [M, d]
    if "down_proj" in lora:
        out = out + _low_rank(hidden, lora["down_proj"], layout.is_transposed, offsets)
    if layout.has_bias:
        out = out + row_bias(module.down_proj_bias, expert)
    if layout.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return combine(
        out, slot_weight.to(out.dtype), plan.token_index, x.shape[0], plan.pair_index, plan.top_k
    )  # [T, d]
