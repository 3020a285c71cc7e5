"""Frozen expert weights of a transformers MoE model stored in 4 or 8 bits (`moekit.quant`).

    quantize_experts(model, "nf4" | "int8") -> QuantReport
    quantized(module, name) -> QuantizedExperts | None    what the backend reads

Each stacked experts module moekit runs (the experts backend or `patch_model`'s) gets its up
and down projections replaced by their quantised form: buffers `<name>_qdata` and
`<name>_qscales` (moved by `.to()`, in the state dict), the weight itself left as a meta
tensor of its shape and dtype (no memory; PEFT reads its dtype), so the stack in the compute
dtype is gone. The grouped pass dequantises one expert at a time (`quant_grouped_linear`);
the expert LoRA of `moekit finetune` adds its terms on top, and the frozen weights get no
gradient. Attention, routers and other dense weights stay in the compute dtype.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from ..quant import SCHEMES, QuantizedExperts
from .experts import QUANT_SPEC, layout_of, quantized, stored_weight
from .patch import experts_of, holds_experts

__all__ = [
    "QuantReport",
    "quantize_experts",
    "quantized",
    "stored_scheme",
]  # `quantized`: from hf.experts

log = logging.getLogger(__name__)


class QuantReport(NamedTuple):
    modules: int  # experts modules quantised
    weights: list[str]  # the weight names quantised, e.g. "gate_up_proj"
    bytes_before: int
    bytes_after: int


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """The stacked experts modules of the model's MoE blocks (under any PEFT wrapper)."""
    found = []
    for block in (m for m in model.modules() if holds_experts(m)):
        experts = experts_of(block)
        if experts is not None and experts not in found:
            found.append(experts)
    return found


def _quantizable(experts: nn.Module) -> str | None:
    """Why moekit's grouped pass cannot run this experts module quantised, or None."""
    layout = layout_of(experts)
    for name in (layout.up_name, "down_proj"):
        weight = stored_weight(experts, name)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            return f"{type(experts).__name__} keeps no stacked 3-D {name}"
    return None


def stored_scheme(model: nn.Module) -> str | None:
    """The scheme of expert weights the model holds quantised as they were read ("mxfp4" for
    gpt-oss's checkpoints, or what `load_model(quantize=...)` made), or None."""
    for experts in _experts_modules(model):
        for scheme, _, _ in experts.__dict__.get(QUANT_SPEC, {}).values():
            return scheme
    return None


@torch.no_grad()
def quantize_experts(model: nn.Module, scheme: str) -> QuantReport:
    """Store the experts' up and down projections of every MoE block in `scheme`, in place.

    Raises:
        ValueError: An unknown scheme, or a model whose experts moekit's grouped pass does not
            run (modules of experts, DBRX's flat weights, no MoE block), in one line.
    """
    if scheme not in SCHEMES and scheme != stored_scheme(model):
        raise ValueError(f"--quantize-experts must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    modules = _experts_modules(model)
    if not modules:
        raise ValueError(
            f"--quantize-experts: {type(model).__name__} has no MoE experts moekit runs"
        )
    reasons = [r for m in modules if (r := _quantizable(m)) is not None]
    if reasons:
        raise ValueError(
            f"--quantize-experts: the experts of {type(model).__name__} are not on moekit's "
            f"grouped pass ({reasons[0]}); fine-tune it without quantised experts"
        )
    before = after = 0
    names: list[str] = []
    for experts in modules:
        layout = layout_of(experts)
        spec = experts.__dict__.setdefault(QUANT_SPEC, {})
        for name in (layout.up_name, "down_proj"):
            if name in spec:  # quantised as it loaded (`hf.load`): its stand-in to meta
                stand_in = experts._parameters.pop(name, None)
                if stand_in is not None:
                    experts.__dict__[name] = torch.empty(
                        stand_in.shape, dtype=stand_in.dtype, device="meta"
                    )
                quant = quantized(experts, name)
                before += quant.shape[0] * quant.shape[1] * quant.shape[2] * quant.dtype.itemsize
                after += quant.nbytes()
                names += [name] if name not in names else []
                continue
            weight = stored_weight(experts, name)
            bank = weight if layout.is_transposed else weight.transpose(1, 2)  # [E, d_in, d_out]
            quant = QuantizedExperts.quantize(bank, scheme)
            before += weight.numel() * weight.element_size()
            after += quant.nbytes()
            del experts._parameters[name]
            experts.register_buffer(f"{name}_qdata", quant.data)
            experts.register_buffer(f"{name}_qscales", quant.scales)
            # the weight's shape and dtype without its memory (PEFT reads its dtype)
            experts.__dict__[name] = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
            spec[name] = (scheme, quant.shape, quant.dtype)
            if name not in names:
                names.append(name)
    log.warning(
        "quantised to %s: the experts' %s in %d MoE blocks (%.1f MB -> %.1f MB); attention, "
        "routers and the other dense weights stay %s",
        scheme,
        ", ".join(names),
        len(modules),
        before / 2**20,
        after / 2**20,
        next((p.dtype for p in model.parameters()), "as they were"),
    )
    return QuantReport(len(modules), names, before, after)
