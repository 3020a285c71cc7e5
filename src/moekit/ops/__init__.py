"""Kernels, and the one place that chooses among them per device.

- gather -> experts -> combine (`ExpertBank.dispatch`): on CPU `fused_cpu.fused_moe`, one op;
  elsewhere the three steps below one after the other.
- experts on rows grouped by expert (`ExpertBank.forward`): on CPU `segment_mlp` (a GEMM per
  segment, or padded batched GEMMs); elsewhere `grouped.grouped_linear` (`F.grouped_mm`; a
  custom op of ours for float32 under torch.compile).
- combine (`dispatch.unpermute`): on CPU a weighted `index_add` (measured faster there); on
  accelerators, for token choice, the atomic-free gather (`triton_combine` where triton imports,
  else `combine.combine_reference`).
- SwiGLU (`ExpertBank`'s activation): on CUDA two Triton kernels (`triton_swiglu`), else torch.
- gather (`dispatch.permute`): `index_select`; on accelerators, for token choice, its backward
  sums each token's row gradients through the inverse permutation the same way (autograd's
  backward is an `index_add`, atomics: a fifth of the layer's GPU time at Qwen3 shapes).

A new backend is one module here and one line in the function that picks it. Every kernel has a
plain-torch twin the tests hold it to (Triton's run on CPU under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import triton_module
from .combine import combine_index_add, combine_reference, gather_rows, inverse_rows
from .fused_cpu import fused_moe
from .grouped import _GatheredGroupedLinear, grouped_linear, grouped_mm_supported, row_bias
from .segment_mlp import padded_capacity, segment_mlp

__all__ = [
    "COMBINE_BACKENDS",
    "combine",
    "combine_index_add",
    "combine_reference",
    "fused_moe",
    "gather",
    "gather_rows",
    "gathered_grouped_linear",
    "grouped_linear",
    "grouped_mm_supported",
    "inverse_rows",
    "padded_capacity",
    "row_bias",
    "segment_mlp",
    "swiglu",
    "triton_available",
    "uses_fused_cpu",
    "wants_grouped_mm",
]

COMBINE_BACKENDS = ("auto", "index_add", "torch", "triton")


def triton_available(device: torch.device, module: str = "triton_combine") -> bool:
    """Whether the Triton kernels of `module` can run on `device`: CUDA with triton importable,
    outside torch.compile (which traces the torch twin instead)."""
    return (
        device.type == "cuda"
        and not torch.compiler.is_compiling()
        and triton_module(module) is not None
    )


def uses_fused_cpu(device: torch.device, backend: str) -> bool:
    """Whether `ExpertBank.dispatch` runs the fused CPU op (every backend but "grouped")."""
    return device.type == "cpu" and backend != "grouped"


def wants_grouped_mm(device: torch.device, backend: str) -> bool:
    """Whether `ExpertBank.forward` asks for `F.grouped_mm` ("grouped", or "auto" off CPU);
    it runs it where the dtype and alignment allow (`grouped_mm_supported`)."""
    return backend == "grouped" or (backend == "auto" and device.type != "cpu")


def _backend(backend: str, device: torch.device, token_choice: bool) -> str:
    """The concrete backend of `combine` and `gather` ("auto" resolved per device)."""
    if backend not in COMBINE_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {COMBINE_BACKENDS}")
    if backend == "auto":
        if not token_choice or device.type == "cpu":
            return "index_add"
        return "triton" if triton_available(device) else "torch"
    if backend != "index_add" and not token_choice:
        raise ValueError(f"backend={backend!r} needs pair_index and top_k (token choice)")
    return backend


def swiglu(h: Tensor) -> Tensor:
    """SwiGLU of h = [gate | up] [.., 2h] -> silu(gate) * up [.., h]: two fused Triton kernels
    (`triton_swiglu`) on CUDA where triton imports, else plain torch."""
    if triton_available(h.device, "triton_swiglu"):
        from .triton_swiglu import swiglu_triton

        return swiglu_triton(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def gather(
    x: Tensor,
    token_index: Tensor,
    pair_index: Tensor | None = None,
    top_k: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Tokens x [N, d] -> rows [M, d] = x[token_index] (`combine`'s arguments and backends).

    The backends differ in the backward only: "index_add" is autograd's scatter-add of the row
    gradients; "torch" and "triton" gather each token's k rows through the inverse permutation.
    """
    backend = _backend(backend, x.device, pair_index is not None)
    if backend == "index_add":
        return x.index_select(0, token_index)
    return gather_rows(x, token_index, pair_index, top_k, backend)


def gathered_grouped_linear(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    token_index: Tensor,
    pair_index: Tensor | None = None,
    top_k: int = 0,
    backend: str = "auto",
) -> Tensor:
    """`grouped_linear(gather(x, token_index, ...), weight, offsets)` keeping x, not the [M, d]
    gathered rows, for the backward (which gathers them again): an [M, d] tensor less held
    from the forward to the backward. `gather`'s backends for the gradient of x."""
    backend = _backend(backend, x.device, pair_index is not None)
    row_of = None if backend == "index_add" else inverse_rows(pair_index, x.shape[0] * top_k)
    return _GatheredGroupedLinear.apply(x, weight, offsets, token_index, row_of, top_k, backend)


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
    backend = _backend(backend, rows.device, pair_index is not None)
    if backend == "index_add":
        return combine_index_add(rows, slot_weight, token_index, num_tokens)
    if backend == "triton":
        from .triton_combine import combine_triton

        return combine_triton(rows, slot_weight, pair_index, num_tokens, top_k)
    return combine_reference(rows, slot_weight, pair_index, num_tokens, top_k)
