"""What the machine can do fast: read once, used to pick defaults and to warn."""

from __future__ import annotations

import torch


def fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls run on a native kernel on `device`.

    CUDA: yes. CPU: only with AVX-512 BF16 or AMX (oneDNN's check); elsewhere torch falls back
    to a reference GEMM, measured ~200x slower than float32 on an AVX2 machine (0.56 vs 126
    GFLOPS at [1024, 512] @ [512, 2048]).
    """
    if torch.device(device).type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast path either
        return False


def cpu_capability() -> str:
    """The SIMD level torch's CPU kernels run at ("AVX2", "AVX512", ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return "unknown"
