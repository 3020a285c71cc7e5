"""The MoE layer benchmark: moekit's layer against its LIMIT, the router and the seed loop.

LIMIT: the N*k routed rows through one expert-sized dense MLP (same active FLOPs, no routing),
the physical bound of any MoE layer on the machine. Each case is one forward+backward in train
mode with dropout 0 and a random contiguous upstream gradient; "forward" cases are inference
(no_grad, eval mode).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import MoE
from .hf_peer import available as hf_available
from .hf_peer import mixtral_peer
from .seed_loop import SeedExpert, SeedLoopMoE
from .timing import interleaved_medians, peak_extra_bytes


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    tokens: int

    def __str__(self) -> str:
        return (
            f"{self.name}: d={self.d_model} h={self.d_hidden} E={self.num_experts} "
            f"k={self.top_k} N={self.tokens}"
        )


SHAPES = {
    "A": LayerShape("A", 128, 512, 8, 2, 512),  # makeMoE-size
    "B": LayerShape("B", 512, 2048, 8, 2, 4096),  # Mixtral-small
    "C": LayerShape("C", 512, 256, 64, 6, 4096),  # fine-grained (DeepSeek-like)
    # real models' layers (GPU sizes: minutes a case on a CPU)
    "M": LayerShape("M", 4096, 14336, 8, 2, 8192),  # Mixtral-8x7B
    "D": LayerShape("D", 2048, 1408, 64, 6, 16384),  # DeepSeek-V2-Lite
    "O": LayerShape("O", 2048, 1024, 64, 8, 16384),  # OLMoE
    "Q": LayerShape("Q", 2048, 768, 128, 8, 16384),  # Qwen3-30B-A3B
}
CPU_SHAPES = "A,B,C"
CUDA_SHAPES = "M,D,O,Q,B,C"


def layer_flops(shape: LayerShape, activation: str, train: bool) -> float:
    """FLOPs of the N*k routed rows through the expert MLP (the LIMIT's): 2 per multiply-add,
    x3 for forward+backward (the backward's two GEMMs per forward GEMM)."""
    width = 2 * shape.d_hidden if activation == "swiglu" else shape.d_hidden
    rows = shape.tokens * shape.top_k
    forward = 2 * rows * (shape.d_model * width + shape.d_hidden * shape.d_model)
    return forward * (3 if train else 1)


HF_CASE = "HF Mixtral grouped_mm"
PATCHED_CASE = "HF Mixtral patched"  # the same block after moekit.hf.patch_model


@dataclass
class Result:
    shape: LayerShape
    dtype: str
    activation: str
    case: str
    ms: float
    tokens: int
    limit_ms: float | None = None
    peak_bytes: int | None = None
    limit_peak_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.ms * 1e3

    @property
    def tflops(self) -> float | None:
        """Useful TFLOP/s: the LIMIT's FLOPs over this case's time (none for the router)."""
        if self.case == "router":
            return None
        flops = layer_flops(self.shape, self.activation, not self.case.endswith("forward"))
        return flops / (self.ms * 1e-3) / 1e12

    @property
    def ratio(self) -> float | None:
        return None if self.limit_ms is None else self.ms / self.limit_ms

    @property
    def memory_ratio(self) -> float | None:
        if self.peak_bytes is None or not self.limit_peak_bytes:
            return None
        return self.peak_bytes / self.limit_peak_bytes


class _Step:
    """One forward+backward (or forward alone) of a module on fixed inputs."""

    def __init__(self, module: nn.Module, x: Tensor, grad: Tensor, train: bool) -> None:
        self.module, self.x, self.grad, self.train = module, x, grad, train

    def _out(self) -> Tensor:
        out = self.module(self.x)
        return out.output if hasattr(out, "output") else out

    def __call__(self) -> None:
        if not self.train:
            with torch.no_grad():
                self._out()
            return
        self.module.zero_grad(set_to_none=True)  # as a training step: grads are fresh
        self.x.grad = None
        out = self._out()
        tensors, grads = [out], [self.grad]
        aux = getattr(self.module, "aux_loss", None)
        if isinstance(aux, Tensor) and aux.requires_grad:
            tensors.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(tensors, grads)


class _RouterStep(_Step):
    def _out(self) -> Tensor:
        routing = self.module.route(self.x)
        return routing.weights

    def __call__(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        weights = self._out()
        weights.backward(self.grad)


def _modules(
    shape: LayerShape, activation: str, dtype: torch.dtype, device, seed_loop: bool
) -> dict:
    mods = {
        "moekit": MoE(
            shape.d_model,
            shape.num_experts,
            shape.top_k,
            shape.d_hidden,
            activation,
            router="softmax",
        ),
        "limit": SeedExpert(shape.d_model, shape.d_hidden, activation),  # one expert, dense
    }
    if seed_loop:
        mods["seed loop"] = SeedLoopMoE(
            shape.d_model, shape.d_hidden, shape.num_experts, shape.top_k, activation
        )
    return {name: m.to(device=device, dtype=dtype).train() for name, m in mods.items()}


def bench_layer(
    shape: LayerShape,
    dtype: torch.dtype,
    activation: str,
    *,
    rounds: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    seed_loop: bool = True,
    memory: bool = True,
    hf_peer: bool = True,
) -> list[Result]:
    """Time moekit's layer, the LIMIT, the router and the seed loop at one shape, interleaved;
    with SwiGLU and transformers installed, also transformers' Mixtral block (`hf_peer`), as
    it ships and after `moekit.hf.patch_model`."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, d, k = shape.tokens, shape.d_model, shape.top_k

    def tensor(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    mods = _modules(shape, activation, dtype, device, seed_loop)
    if hf_peer and activation == "swiglu" and hf_available():
        try:
            mods[HF_CASE] = mixtral_peer(mods["moekit"]).train()
            mods[PATCHED_CASE] = copy.deepcopy(mods[HF_CASE])
            from ..hf import patch_model  # imports transformers: only when it is installed

            if patch_model(mods[PATCHED_CASE]) != 1:
                raise RuntimeError("patch_model did not patch the Mixtral block")
        except Exception as err:  # another transformers version: the table goes on without it
            warnings.warn(f"{HF_CASE} peer skipped: {type(err).__name__}: {err}", stacklevel=2)
            mods.pop(HF_CASE, None)
            mods.pop(PATCHED_CASE, None)
    x, rows = tensor(n, d).requires_grad_(), tensor(n * k, d).requires_grad_()
    steps = {
        "moekit": _Step(mods["moekit"], x, tensor(n, d), True),
        "limit": _Step(mods["limit"], rows, tensor(n * k, d), True),
        "router": _RouterStep(mods["moekit"].router, x, tensor(n, k), True),
        "moekit forward": _Step(mods["moekit"], x, None, False),
        "limit forward": _Step(mods["limit"], rows, None, False),
    }
    if seed_loop:
        steps["seed loop"] = _Step(mods["seed loop"], x, tensor(n, d), True)
    for case in (HF_CASE, PATCHED_CASE):
        if case in mods:
            steps[case] = _Step(mods[case], x, tensor(n, d), True)
    times = interleaved_medians(steps, rounds=rounds, warmup=warmup, device=device)
    peaks = {}
    if memory:
        for name in ("moekit", "limit", "seed loop", HF_CASE, PATCHED_CASE):
            if name in steps:
                peaks[name] = peak_extra_bytes(steps[name], steps[name].module, device)
    label = str(dtype).removeprefix("torch.")
    results = []
    for name, ms in times.items():
        limit_name = "limit forward" if name.endswith("forward") else "limit"
        results.append(
            Result(
                shape,
                label,
                activation,
                name,
                ms,
                n,
                limit_ms=None if name.startswith("limit") else times[limit_name],
                peak_bytes=peaks.get(name),
                limit_peak_bytes=None if name == "limit" else peaks.get("limit"),
            )
        )
    return results
