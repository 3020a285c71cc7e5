"""Argument validation (and the capacity arithmetic) shared by the public constructors and forwards.

Every failure is a `ValueError` or `TypeError` whose message names the argument, what was
expected and what was received, e.g. ``top_k=9 must be <= num_experts=8``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_positive_int(name: str, value: object) -> int:
    """`value` must be an int >= 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name}={value} must be a positive int (>= 1)")
    return value


def check_top_k(top_k: object, num_experts: int, name: str = "top_k") -> int:
    """`top_k` must be an int in 1..num_experts."""
    check_positive_int(name, top_k)
    if top_k > num_experts:
        raise ValueError(f"{name}={top_k} must be <= num_experts={num_experts}")
    return top_k


def check_groups(num_groups: object, top_k_groups: object, num_experts: int) -> tuple[int, int]:
    """Group-limited routing: G divides E, and 1 <= top_k_groups <= G (None = all G)."""
    check_positive_int("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts}")
    if top_k_groups is None:
        return num_groups, num_groups
    check_positive_int("top_k_groups", top_k_groups)
    if top_k_groups > num_groups:
        raise ValueError(f"top_k_groups={top_k_groups} must be <= num_groups={num_groups}")
    return num_groups, top_k_groups


def check_capacity_factor(capacity_factor: object, *, allow_none: bool = True) -> float | None:
    """`capacity_factor` must be None (dropless) or a finite number > 0."""
    if capacity_factor is None and allow_none:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(
            f"capacity_factor must be a float > 0 or None, got {type(capacity_factor).__name__}"
        )
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be a finite number > 0")
    return float(capacity_factor)


def expert_capacity(num_pairs: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert: ceil(capacity_factor * num_pairs / E), num_pairs = N * k."""
    return math.ceil(capacity_factor * num_pairs / num_experts)


def check_probability(name: str, value: object) -> float:
    """`value` must be a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1)")
    return float(value)


def check_non_negative(name: str, value: object) -> float:
    """`value` must be a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value} must be a finite number >= 0")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """`value` must be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")
    return value  # type: ignore[return-value]


def check_input(x: object, d_model: int, name: str = "x", min_dim: int = 1) -> Tensor:
    """A floating tensor of shape [..., d_model] with finite values.

    The finiteness check reads `x` once (a sum) and synchronises with the host, so it runs only
    for CPU tensors outside `torch.compile` (where it costs a small fraction of the layer); on
    accelerators a NaN propagates to the output and the training loop's loss check catches it.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(
            f"{name} last dimension must equal d_model={d_model}, got shape {tuple(x.shape)}"
        )
    # a NaN or Inf anywhere makes the sum non-finite: one pass, no temporaries; only a
    # non-finite (or overflowing) sum pays for the exact elementwise check
    if (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and x.numel()
        and not torch.isfinite(x.sum())
        and not bool(torch.isfinite(x).all())
    ):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x
