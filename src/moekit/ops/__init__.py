"""Kernels, and the one place that chooses among them per device.

- gather -> experts -> combine (`ExpertBank.dispatch`): on CPU `fused_cpu.fused_moe`, one op;
  elsewhere the three steps below one after the other.
- experts on rows grouped by expert (`ExpertBank.forward`): on CPU `segment_mlp` (a GEMM per
  segment, or padded batched GEMMs); elsewhere `grouped.grouped_linear` (`F.grouped_mm`; a
  custom op of ours for float32 under torch.compile).
- combine (`dispatch.unpermute`): on CPU a weighted `index_add` (measured faster there); on
  accelerators, for token choice, the atomic-free gather (`triton_combine` where triton imports,
  else `combine.combine_reference`).

A new backend is one module here and one line in the function that picks it. Every kernel has a
plain-torch twin the tests hold it to (Triton's run on CPU under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .combine import combine_index_add, combine_reference, inverse_rows
from .fused_cpu import fused_moe
from .grouped import grouped_linear, grouped_mm_supported
from .segment_mlp import padded_capacity, segment_mlp

__all__ = [
    "COMBINE_BACKENDS",
    "combine",
    "combine_index_add",
    "combine_reference",
    "fused_moe",
    "grouped_linear",
    "grouped_mm_supported",
    "inverse_rows",
    "padded_capacity",
    "segment_mlp",
    "triton_available",
    "uses_fused_cpu",
    "wants_grouped_mm",
]

COMBINE_BACKENDS = ("auto", "index_add", "torch", "triton")


@functools.cache
def _triton_imports() -> bool:
    try:
        from . import triton_combine  # noqa: F401
    except Exception:  # not installed, or no driver for this platform
        return False
    return True


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with triton importable, outside
    torch.compile (which traces the torch twin instead)."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and _triton_imports()


def uses_fused_cpu(device: torch.device, backend: str) -> bool:
    """Whether `ExpertBank.dispatch` runs the fused CPU op (every backend but "grouped")."""
    return device.type == "cpu" and backend != "grouped"


def wants_grouped_mm(device: torch.device, backend: str) -> bool:
    """Whether `ExpertBank.forward` asks for `F.grouped_mm` ("grouped", or "auto" off CPU);
    it runs it where the dtype and alignment allow (`grouped_mm_supported`)."""
    return backend == "grouped" or (backend == "auto" and device.type != "cpu")


def combine(
    rows: Tensor,
    slot_weight: Tensor,
    token_index: Tensor,
    num_tokens: int,
    pair_index: Tensor | None = None,
    top_k: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Expert rows [M, d] -> tokens [N, d]: out[n] = sum of slot_weight[m] * rows[m] over n's rows.

    Args:
        rows: [M, d] expert outputs grouped by expert.
        slot_weight: [M] each row's combine weight (differentiable).
        token_index: [M] int64 the token of each row.
        num_tokens: N.
        pair_index, top_k: [M] the (token, slot) pair n * k + j of each row, and k (token
            choice); without them only "index_add" applies.
        backend: "index_add" (scatter-add), "torch" (the gather by the inverse permutation,
            no atomics), "triton" (the gather as Triton kernels; on CPU tensors only under
            TRITON_INTERPRET=1), or "auto": index_add on CPU; elsewhere Triton where
            `triton_available`, else torch.
    """
    if backend not in COMBINE_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {COMBINE_BACKENDS}")
    if backend == "auto":
        if pair_index is None or rows.device.type == "cpu":
            backend = "index_add"
        else:
            backend = "triton" if triton_available(rows.device) else "torch"
    if backend == "index_add":
        return combine_index_add(rows, slot_weight, token_index, num_tokens)
    if pair_index is None:
        raise ValueError(f"backend={backend!r} needs pair_index and top_k (token choice)")
    if backend == "triton":
        from .triton_combine import combine_triton

        return combine_triton(rows, slot_weight, pair_index, num_tokens, top_k)
    return combine_reference(rows, slot_weight, pair_index, num_tokens, top_k)
