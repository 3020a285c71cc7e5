"""Frozen expert weights stored in 4 or 8 bits, dequantised one expert at a time.

    QuantizedExperts.quantize(w [E, d_in, d_out], "nf4" | "int8") -> the stack, stored small
    QuantizedExperts.empty(scheme, shape, dtype).fill(first, experts)
                                       the same, filled an expert at a time (a loader's reads)
    .expert(e) -> [d_in, d_out]        one expert dequantised (the compute dtype)
    .dequantize() -> [E, d_in, d_out]  the whole stack (references and tests only)
    quant_grouped_linear(rows [M, d_in], q, offsets [E]) -> [M, d_out]
        rows @ w[e] per expert segment, each expert's weight dequantised as its turn comes
        (on the CPU into one buffer the pass reuses): never the whole stack at once; the
        backward gives the rows' gradient (w[e] dequantised again), none to the frozen weight

NF4 (QLoRA, Dettmers et al. 2023): each expert's [d_in, d_out] flattened row-major and cut in
blocks of 64 values (the last zero-padded); a block stores its absmax (float32) and, per value,
the index of the nearest of the 16 NormalFloat levels of value / absmax (two indices a byte,
the first in the high nibble). int8: per output channel (column of [d_in, d_out]) a scale
absmax / 127 and the rounded value / scale in [-127, 127]. MXFP4 (gpt-oss's checkpoints, read
as stored, never made here): per output channel, blocks of 32 inputs, two E2M1 codes a byte
(the low nibble first) and an E8M0 exponent a block; `data` [E, d_out, d_in / 2], `scales`
[E, d_out, d_in / 32] (uint8, bias 127), as transformers' `*_blocks` / `*_scales` hold them.
On CUDA a Triton kernel writes an nf4 or int8 expert's values (`ops.triton_dequant`); MXFP4
and the CPU use torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FP4_VALUES", "NF4_LEVELS", "SCHEMES", "QuantizedExperts", "quant_grouped_linear"]

SCHEMES = ("nf4", "int8")  # what `quantize` makes; "mxfp4" is read as checkpoints store it
# OCP MXFP4 (gpt-oss's checkpoints): E2M1 values, a code's low bit first; a shared power of
# two a block of 32 (an E8M0 byte, bias 127)
FP4_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)
MXFP4_BLOCK = 32
NF4_BLOCK = 64
# the QLoRA paper's NormalFloat4 levels (bitsandbytes' NF4 code book), ascending
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


# a packed byte's two NF4 values, (high nibble, low nibble): one lookup a byte dequantises
NF4_PAIRS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=-1)


def _kernels(device: torch.device):
    """`ops.triton_dequant` where it runs on `device` (CUDA with triton), else None."""
    from .ops import triton_available
    from .ops._triton import triton_module

    if not triton_available(device, "triton_dequant"):
        return None
    return triton_module("triton_dequant")


def _nf4_into(w: Tensor, data: Tensor, absmax: Tensor, flat: Tensor, codes: Tensor) -> None:
    """One expert [d_in, d_out] -> its packed codes `data` [n_pad / 2] and `absmax`
    [n_pad / 64], through the scratch `flat` (float32) and `codes` (int32) [n_pad]."""
    n = w.numel()
    flat[:n].view(w.shape).copy_(w)
    flat[n:].zero_()
    blocks = flat.view(-1, NF4_BLOCK)  # [n_pad / 64, 64]
    torch.linalg.vector_norm(blocks, float("inf"), dim=-1, out=absmax)
    blocks.div_(absmax.clamp_min_(1e-12)[:, None])
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]).to(flat.device) / 2  # [15]
    torch.bucketize(flat, midpoints, out_int32=True, out=codes)
    data.copy_(codes[0::2].mul_(16).add_(codes[1::2]))  # the first in the high nibble


def _int8_into(w: Tensor, data: Tensor, scales: Tensor, values: Tensor) -> None:
    """One expert [d_in, d_out] -> int8 `data` [d_in, d_out] and `scales` [d_out], through
    the float32 scratch `values` [d_in, d_out]."""
    values.copy_(w)
    torch.linalg.vector_norm(values, float("inf"), dim=0, out=scales)
    scales.clamp_min_(1e-12).div_(127.0)
    data.copy_(values.div_(scales).round_().clamp_(-127, 127))


def _mxfp4_expert(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """One expert's MXFP4 codes [d_out, d_in / 2] and exponents [d_out, d_in / 32] ->
    its weight [d_in, d_out]."""
    d_out = blocks.shape[0]
    lut = FP4_VALUES.to(blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)
    values = values.view(d_out, -1, MXFP4_BLOCK)  # [d_out, d_in / 32, 32]
    exponents = (scales.to(torch.int32) - 127).to(torch.float32)[..., None]
    return torch.ldexp(values, exponents).view(d_out, -1).T.to(dtype)


@dataclass
class QuantizedExperts:
    """A stack of E expert weights [E, d_in, d_out] stored in `scheme` (see the module doc)."""

    scheme: str
    data: Tensor  # nf4: uint8 [E, n_pad / 2]; int8: int8 [E, d_in, d_out]; mxfp4 above
    scales: Tensor  # nf4: float32 [E, n_pad / 64] absmax; int8: float32 [E, d_out]
    shape: tuple[int, int, int]  # (E, d_in, d_out)
    dtype: torch.dtype  # the compute dtype it dequantises to

    @classmethod
    def empty(
        cls, scheme: str, shape: tuple[int, int, int], dtype: torch.dtype, device=None
    ) -> QuantizedExperts:
        """Storage for E experts [d_in, d_out] in `scheme`, to `fill`."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        experts, d_in, d_out = shape
        if scheme == "int8":
            data = torch.empty(shape, dtype=torch.int8, device=device)
            scales = torch.empty(experts, d_out, device=device)
        else:
            n_pad = -(-d_in * d_out // NF4_BLOCK) * NF4_BLOCK
            data = torch.empty(experts, n_pad // 2, dtype=torch.uint8, device=device)
            scales = torch.empty(experts, n_pad // NF4_BLOCK, device=device)
        return cls(scheme, data, scales, tuple(shape), dtype)

    @torch.no_grad()
    def fill(self, first: int, weights: Iterable[Tensor]) -> None:
        """Experts first, first + 1, ... quantised in place from their weights [d_in, d_out],
        one at a time (an iterable: a loader's reads) through one float scratch."""
        _, d_in, d_out = self.shape
        device = self.data.device
        if self.scheme == "int8":
            scratch = (torch.empty(d_in, d_out, device=device),)
        else:  # float32 values and int32 codes [n_pad]
            flat = torch.empty(self.data.shape[1] * 2, device=device)
            scratch = (flat, torch.empty(flat.shape, dtype=torch.int32, device=device))
        into = _int8_into if self.scheme == "int8" else _nf4_into
        for e, w in enumerate(weights, first):
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert {e}: the stack holds experts 0..{self.num_experts - 1}")
            if tuple(w.shape) != (d_in, d_out):
                raise ValueError(
                    f"expert {e}: expected a weight [{d_in}, {d_out}], got {tuple(w.shape)}"
                )
            into(w, self.data[e], self.scales[e], *scratch)

    @classmethod
    def quantize(cls, weight: Tensor, scheme: str) -> QuantizedExperts:
        if weight.dim() != 3:
            raise ValueError(f"expected a stack of experts [E, d_in, d_out], got {weight.shape}")
        quant = cls.empty(scheme, tuple(weight.shape), weight.dtype, weight.device)
        quant.fill(0, weight.detach())  # an expert at a time: no float copy of the stack
        return quant

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def nbytes(self) -> int:
        data, scales = self.data, self.scales
        return data.numel() * data.element_size() + scales.numel() * scales.element_size()

    def expert(self, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """Expert e's weight [d_in, d_out], dequantised to `dtype` (default: the original)."""
        _, d_in, d_out = self.shape
        dtype = dtype or self.dtype
        kernels = _kernels(self.data.device)
        if self.scheme == "mxfp4":
            if kernels is not None:
                values = FP4_VALUES.to(self.data.device)
                return kernels.dequantize_mxfp4(self.data[e], self.scales[e], values, dtype)
            return _mxfp4_expert(self.data[e], self.scales[e], dtype)
        if kernels is not None:  # CUDA: a Triton kernel writes the expert's values
            if self.scheme == "int8":
                return kernels.dequantize_int8(self.data[e], self.scales[e], dtype)
            levels = NF4_LEVELS.to(self.data.device)
            n = d_in * d_out
            return kernels.dequantize_nf4(self.data[e], self.scales[e], levels, n, dtype).view(
                d_in, d_out
            )
        if self.scheme == "int8":
            return (self.data[e].float() * self.scales[e][None, :]).to(dtype)
        packed = self.data[e]  # [n_pad / 2]
        pairs = NF4_PAIRS.to(packed.device)[packed.int()]  # [n_pad / 2, 2]: a byte's two values
        values = (pairs.view(-1, NF4_BLOCK) * self.scales[e][:, None]).view(-1)[: d_in * d_out]
        return values.view(d_in, d_out).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole stack [E, d_in, d_out] (for references; the forward never forms it)."""
        return torch.stack([self.expert(e, dtype) for e in range(self.num_experts)])

    def to(self, device: torch.device | str) -> QuantizedExperts:
        return QuantizedExperts(
            self.scheme, self.data.to(device), self.scales.to(device), self.shape, self.dtype
        )


class _Dequantizer:
    """Expert after expert of a stack, dequantised into the same buffers: a grouped pass
    allocates one expert's weight (and its codes' indices) once, not once an expert (on the
    CPU, where each allocation of that size is fresh pages and a hole in the heap after it).
    A weight it returns is valid until the next call. On CUDA (Triton) and for MXFP4 each
    expert is `QuantizedExperts.expert`'s own tensor."""

    def __init__(self, quant: QuantizedExperts, dtype: torch.dtype) -> None:
        self.quant, self.dtype = quant, dtype
        self.reuse = quant.scheme in SCHEMES and dtype == torch.float32 and not quant.data.is_cuda
        self.weight: Tensor | None = None  # int8 [d_in, d_out]; nf4 [n_pad]
        self.codes: Tensor | None = None  # nf4: int32 [n_pad / 2], the lookup's indices

    def __call__(self, e: int) -> Tensor:
        quant = self.quant
        if not self.reuse:
            return quant.expert(e, self.dtype)
        _, d_in, d_out = quant.shape
        data, scales = quant.data[e], quant.scales[e]
        if quant.scheme == "int8":
            if self.weight is None:
                self.weight = torch.empty(d_in, d_out)
            return self.weight.copy_(data).mul_(scales[None, :])  # no int8 -> float temporary
        if self.weight is None:
            self.codes = torch.empty(data.shape[0], dtype=torch.int32)
            self.weight = torch.empty(2 * data.shape[0])
        self.codes.copy_(data)
        pairs = self.weight.view(-1, 2)  # [n_pad / 2, 2]: a byte's two values
        torch.index_select(NF4_PAIRS, 0, self.codes, out=pairs)
        self.weight.view(-1, NF4_BLOCK).mul_(scales[:, None])
        return self.weight[: d_in * d_out].view(d_in, d_out)


class _QuantGroupedLinear(torch.autograd.Function):
    """rows @ w[e] per segment with w dequantised per expert; the rows' gradient only."""

    @staticmethod
    def forward(ctx, rows: Tensor, quant: QuantizedExperts, offsets: Tensor) -> Tensor:
        ends = offsets.tolist()  # one host read: which experts have rows
        out = rows.new_empty(rows.shape[0], quant.shape[2])  # [M, d_out]
        weight = _Dequantizer(quant, rows.dtype)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                torch.mm(rows[start:end], weight(e), out=out[start:end])
            start = end
        ctx.quant, ctx.ends = quant, ends
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        quant, ends = ctx.quant, ctx.ends
        grad_rows = grad.new_empty(grad.shape[0], quant.shape[1])  # [M, d_in]
        weight = _Dequantizer(quant, grad.dtype)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                torch.mm(grad[start:end], weight(e).T, out=grad_rows[start:end])  # w [d_in, d_out]
            start = end
        return grad_rows, None, None


def quant_grouped_linear(rows: Tensor, quant: QuantizedExperts, offsets: Tensor) -> Tensor:
    """rows [M, d_in] grouped by expert @ each expert's dequantised weight -> [M, d_out].

    Args:
        offsets: [E] cumulative group sizes (the end of each expert's segment).
    """
    if rows.shape[-1] != quant.shape[1]:
        raise ValueError(f"rows of width {rows.shape[-1]}, the experts take {quant.shape[1]}")
    return _QuantGroupedLinear.apply(rows, quant, offsets)
