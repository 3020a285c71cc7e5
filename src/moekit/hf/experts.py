"""transformers' experts modules read as moekit expert banks, in any of their layouts.

A transformers experts class decorated with `@use_experts_implementation` keeps stacked
weights and says how with flags: `has_gate` (`gate_up_proj` [gate | up], or `up_proj` alone),
`is_concatenated` (gate | up side by side, or interleaved g0 u0 g1 u1 ...), `is_transposed`
([E, d_in, d_out] instead of [E, d_out, d_in]), `has_bias` (`*_proj_bias` [E, d_out]),
`has_post_expert_norm`; its `act_fn` and `_apply_gate` give the activation. Undecorated
classes with the same tensors (Llama 4's) read the same way with the flags given.

`bank_weights(module, layout)` gives the module's tensors as moekit's bank reads them
(`moekit.experts.BankWeights`: w1 [E, d, width], b1, w2 [E, h, d], b2), views of its own
parameters read at each call: gradients, loads and `.to()` reach them, and the kernels hand
back gradients in the parameters' layout (`ops/_layout.py`). No module is built per call, so
torch.compile and torch.export trace the backend whole.
`fast_activation(module)` says whether moekit's fused kernels compute the module's
activation exactly ("swiglu", "relu", "gelu") or the module's own functions must run (None).

While a PEFT LoRA `ParamWrapper`'s forward runs (`LoraConfig(target_parameters=...)`), the
weight it targets is parametrized (`torch.nn.utils.parametrize`) as W + scaling * lhs @ rhs,
formed only when the attribute is read: `peft_lora(module, layout)` gives the factors and
`stored_weight(module, name)` W, so the backend computes the low-rank terms per expert and
never forms the sum. `quantized(module, name)` gives a weight `hf.quantize` stored in 4 or 8
bits (the attribute itself is then a meta tensor of its shape and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..experts import BankWeights
from ..quant import QuantizedExperts

__all__ = [
    "Layout",
    "bank_weights",
    "fast_activation",
    "layout_of",
    "peft_lora",
    "quantized",
    "stored_weight",
    "unsupported_weights",
]


@dataclass(frozen=True)
class Layout:
    """How an experts module stores its weights (transformers' decorator flags)."""

    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    has_post_expert_norm: bool = False

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


def layout_of(module: nn.Module, **defaults: bool) -> Layout:
    """The module's flags, `defaults` (then the decorator's defaults) where it has none."""
    fields = Layout.__dataclass_fields__
    return Layout(
        **{n: bool(getattr(module, n, defaults.get(n, f.default))) for n, f in fields.items()}
    )


def _lora_proxy(module: nn.Module, name: str) -> nn.Module | None:
    """PEFT's parametrization of the module's weight `name` while a `ParamWrapper`'s forward
    runs, where it keeps the low-rank factors (`_LoraFactorsProxy`: one active adapter, no
    other parametrization under it); None for none or any other (PEFT's summed deltas of
    several adapters, another library's), whose value is the attribute as it reads."""
    if not parametrize.is_parametrized(module, name):
        return None
    try:
        from peft.tuners.lora.layer import _LoraFactorsProxy
    except ImportError:  # PEFT absent or changed: the attribute as it reads, PEFT's own sum
        return None
    chain = module.parametrizations[name]
    return chain[0] if len(chain) == 1 and type(chain[0]) is _LoraFactorsProxy else None


def stored_weight(module: nn.Module, name: str) -> Tensor | None:
    """The module's tensor `name` (None where it has none): W itself where `peft_lora` gives
    PEFT's factors for it (the parametrization's original), else the attribute as it reads."""
    if _lora_proxy(module, name) is not None:
        return module.parametrizations[name].original
    return getattr(module, name, None)


def peft_lora(module: nn.Module, layout: Layout) -> dict:
    """{parameter name: (lhs, rhs, scaling)}: PEFT's LoRA on the stacked up and down weights
    while its wrappers' forwards run, as factors of the weights' own layout [E, a, r] and
    [E, r, b] (delta = scaling * lhs @ rhs, `ParamWrapper.get_delta_factors`); empty when
    no wrapper's forward is running or PEFT formed W + delta itself (several adapters)."""
    lora = {}
    for name in (layout.up_name, "down_proj"):
        proxy = _lora_proxy(module, name)
        if proxy is not None:
            lora[name] = (proxy.lhs, proxy.rhs, proxy.scaling)
    return lora


QUANT_SPEC = "_moekit_quant"  # {weight name: (scheme, bank shape, dtype)}: `hf.quantize`


def quantized(module: nn.Module, name: str) -> QuantizedExperts | None:
    """The module's weight `name` as `hf.quantize.quantize_experts` stored it (in the bank
    layout [E, d_in, d_out]), or None for a plain weight."""
    spec = module.__dict__.get(QUANT_SPEC, {}).get(name)
    if spec is None:
        return None
    scheme, shape, dtype = spec
    data, scales = module.get_buffer(f"{name}_qdata"), module.get_buffer(f"{name}_qscales")
    return QuantizedExperts(scheme, data, scales, shape, dtype)


def _traced_types() -> tuple[type, ...]:
    """The tensor types torch.export and torch.compile trace with in place of a plain tensor."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return FakeTensor, FunctionalTensor


def quantised_reason(tensor: Tensor) -> str | None:
    """How a weight tensor looks quantised ("is torch.float8_e4m3fn", "is a Params4bit"), or
    None for plain floating-point values: a Tensor or Parameter of 16 bits or more, on any
    device (meta included), or the fake and functional tensors that torch.export and
    torch.compile trace with (never taken for a quantised subclass)."""
    if not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
        return f"is {tensor.dtype}"
    if type(tensor) not in (Tensor, nn.Parameter, *_traced_types()):
        return f"is a {type(tensor).__name__}"
    return None


def unsupported_weights(module: nn.Module, layout: Layout) -> str | None:
    """Why moekit cannot read the module's expert weights, or None."""
    names = [layout.up_name, "down_proj"]
    if layout.has_bias:
        names += [f"{layout.up_name}_bias", "down_proj_bias"]
    for name in names:
        tensor = stored_weight(module, name)
        if not isinstance(tensor, Tensor):
            return f"no tensor {name!r} (layout {layout})"
        reason = quantised_reason(tensor)
        if reason is not None:
            return f"{name} {reason}: quantised expert weights are not supported"
    up, down = stored_weight(module, layout.up_name), stored_weight(module, "down_proj")
    if up.dim() != 3 or down.dim() != 3:
        return f"expert weights of {up.dim()} and {down.dim()} dims, expected stacked 3-D"
    return None


def _is_silu(act: nn.Module) -> bool:
    return type(act) is nn.SiLU or (
        type(act).__name__ == "SiLUActivation" and "forward" not in act.__dict__
    )


def _is_gelu(act: nn.Module) -> bool:
    if type(act) is nn.GELU:
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def fast_activation(module: nn.Module, layout: Layout) -> str | None:
    """moekit's activation that equals the module's, or None where its own code must run (a
    class `_apply_gate`, interleaved gate/up, an activation moekit's kernels lack, a norm)."""
    if layout.has_post_expert_norm:
        return None
    act = getattr(module, "act_fn", None)
    if not isinstance(act, nn.Module):
        return None
    if layout.has_gate:
        from transformers.integrations.moe import _default_apply_gate

        default_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
        if layout.is_concatenated and default_gate is _default_apply_gate and _is_silu(act):
            return "swiglu"
        return None
    if type(act) is nn.ReLU:
        return "relu"
    return "gelu" if _is_gelu(act) else None


def bank_weights(experts: nn.Module, layout: Layout) -> BankWeights:
    """The module's expert tensors as moekit's bank reads them, read now: w1 [E, d, width] and
    w2 [E, h, d] (transposed) views of the up and down projections, b1 and b2 their biases.
    Views, not copies: gradients land in the module's parameters, in their layout
    (`ops/_layout.py`), and loads and `.to()` reach the next call."""

    def view(weight: Tensor) -> Tensor:
        return weight if layout.is_transposed else weight.transpose(1, 2)

    up = layout.up_name
    return BankWeights(
        view(getattr(experts, up)),  # [E, d, width]
        getattr(experts, f"{up}_bias") if layout.has_bias else None,
        view(experts.down_proj),  # [E, h, d]
        experts.down_proj_bias if layout.has_bias else None,
    )
