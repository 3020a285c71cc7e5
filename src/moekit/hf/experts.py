"""transformers' experts modules read as moekit expert banks, in any of their layouts.

A transformers experts class decorated with `@use_experts_implementation` keeps stacked
weights and says how with flags: `has_gate` (`gate_up_proj` [gate | up], or `up_proj` alone),
`is_concatenated` (gate | up side by side, or interleaved g0 u0 g1 u1 ...), `is_transposed`
([E, d_in, d_out] instead of [E, d_out, d_in]), `has_bias` (`*_proj_bias` [E, d_out]),
`has_post_expert_norm`; its `act_fn` and `_apply_gate` give the activation. Undecorated
classes with the same tensors (Llama 4's) read the same way with the flags given.

`HFExperts(module)` is an `ExpertBank` whose `w1` [E, d, width], `w2` [E, h, d], `b1`, `b2` are
views of the module's own parameters, read at each call: gradients, loads and `.to()` reach
them, and the kernels hand back gradients in the parameters' layout (`ops/_layout.py`).
`fast_activation(module)` says whether moekit's fused kernels compute the module's
activation exactly ("swiglu", "relu", "gelu") or the module's own functions must run (None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import ExpertBank, mode_of

__all__ = ["HFExperts", "Layout", "fast_activation", "layout_of", "unsupported_weights"]


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


def unsupported_weights(module: nn.Module, layout: Layout) -> str | None:
    """Why moekit cannot read the module's expert weights, or None."""
    names = [layout.up_name, "down_proj"]
    if layout.has_bias:
        names += [f"{layout.up_name}_bias", "down_proj_bias"]
    for name in names:
        tensor = getattr(module, name, None)
        if not isinstance(tensor, Tensor):
            return f"no tensor {name!r} (layout {layout})"
        if not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            return f"{name} is {tensor.dtype}: quantised expert weights are not supported"
        if type(tensor) not in (Tensor, nn.Parameter):
            return (
                f"{name} is a {type(tensor).__name__}: quantised expert weights are not supported"
            )
    up = getattr(module, layout.up_name)
    if up.dim() != 3 or module.down_proj.dim() != 3:
        return (
            f"expert weights of {up.dim()} and {module.down_proj.dim()} dims, expected stacked 3-D"
        )
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


class HFExperts(ExpertBank):
    """An `ExpertBank` over a transformers experts module's tensors, read in place at each
    call: w1 [E, d, width] and w2 [E, h, d] are (transposed) views of the up and down
    projections, b1 and b2 their biases. `activation` is moekit's name for the module's
    activation (`fast_activation`); the bank is the module's, in the module's mode."""

    def __init__(self, experts: nn.Module, layout: Layout, activation: str) -> None:
        nn.Module.__init__(self)
        self.__dict__["source"] = experts  # not a submodule: the transformers model owns it
        self.__dict__["layout"] = layout
        down = experts.down_proj
        self.num_experts = down.shape[0]
        self.d_model, self.d_hidden = (
            (down.shape[2], down.shape[1])
            if layout.is_transposed
            else (
                down.shape[1],
                down.shape[2],
            )
        )
        self.activation, self.dropout, self.backend = activation, 0.0, "auto"

    def _view(self, weight: Tensor) -> Tensor:
        return weight if self.layout.is_transposed else weight.transpose(1, 2)

    @property
    def w1(self) -> Tensor:
        return self._view(getattr(self.source, self.layout.up_name))  # [E, d, width]

    @property
    def w2(self) -> Tensor:
        return self._view(self.source.down_proj)  # [E, h, d]

    @property
    def b1(self) -> Tensor | None:
        return getattr(self.source, f"{self.layout.up_name}_bias") if self.layout.has_bias else None

    @property
    def b2(self) -> Tensor | None:
        return self.source.down_proj_bias if self.layout.has_bias else None

    training = mode_of("source")


def row_experts(group_sizes: Tensor, num_rows: int) -> Tensor:
    """[M] the expert of each row of rows grouped by expert (no host sync)."""
    ends = torch.cumsum(group_sizes, 0)  # [E]
    return torch.searchsorted(ends, torch.arange(num_rows, device=ends.device), right=True)
