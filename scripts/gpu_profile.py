"""Where the GPU time goes (issue 10), for the device check after `scripts/gpu_check.sh`:

1. the makemoe training step of `moekit train` on CUDA (the Trainer's own `train_step`):
   eager fp32, eager bf16 autocast, and `--compile` (reduce-overhead), ms a step; for the eager
   step, kernels launched and GPU-busy ms a step (launch-bound when wall >> busy);
2. the layer's bf16 forward+backward at named shapes: host syncs, wall vs GPU-busy time, the
   top kernels by GPU time; at B and C also compiled with mode "reduce-overhead";
3. batch-1 decoding past the window: ms and GPU-busy ms a token, the top host-side ops.

`MOEKIT_TRITON=0` runs it all on the torch twins of the Triton kernels (a Triton launch costs
more host time than a torch op: compare the two where the eager paths are launch-bound).

Usage (repository root, PYTHONPATH=src): python scripts/gpu_profile.py DATA [--shapes Q,B]
[--skip-compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from moekit import MoE
from moekit.bench.layer import SHAPES
from moekit.lm.config import build_config
from moekit.lm.train import Trainer

DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _kernel_summary(prof, steps: int) -> tuple[int, float]:
    """(kernels a step, GPU-busy ms a step) from a profile of `steps` steps."""
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return len(kernels) // steps, busy_us / steps / 1e3


def train_steps(data: str, out: str, *, dtype: str, compile: bool, warmup: int, steps: int):
    cfg = build_config(
        "makemoe",
        data=data,
        out=out,
        device=DEVICE,
        dtype=dtype,
        compile=compile,
        track=False,
        progress=False,
    )
    trainer = Trainer(cfg)
    tic = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    _sync()
    warm_s = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync()
    ms = (time.perf_counter() - tic) / steps * 1e3
    line = f"train step {dtype:8s} {'compiled' if compile else 'eager':8s}: {ms:7.2f} ms/step"
    line += f" (warm-up {warmup} steps {warm_s:.1f} s)"
    if not compile and DEVICE == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            trainer.train_step()
            torch.cuda.set_sync_debug_mode("default")
        line += f"; {len(caught)} host syncs a step"
    if not compile:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                trainer.train_step()
            _sync()
        launches, busy = _kernel_summary(prof, 10)
        line += f"; {launches} kernels/step, GPU busy {busy:.2f} ms/step"
        if dtype == "float32":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    print(line, flush=True)


def layer_profile(name: str, dtype=torch.bfloat16) -> None:
    s = SHAPES[name]
    torch.manual_seed(0)
    layer = MoE(s.d_model, s.num_experts, s.top_k, s.d_hidden, "swiglu").to(DEVICE, dtype)
    x = torch.randn(s.tokens, s.d_model, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        torch.autograd.backward([out.output, out.aux_loss], [grad, torch.ones_like(out.aux_loss)])

    for _ in range(3):
        step()
    _sync()
    if DEVICE == "cuda":  # which ops make the host wait for the GPU
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0][:120] for w in caught]
        print(f"layer {name}: {len(syncs)} host syncs in a step", *syncs[:5], sep="\n  ")
    tic = time.perf_counter()
    for _ in range(10):
        step()
    _sync()
    wall = (time.perf_counter() - tic) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        _sync()
    launches, busy = _kernel_summary(prof, 5)
    print(f"layer {s} bf16 fwd+bwd: {wall:.2f} ms wall, GPU busy {busy:.2f} ms, {launches} kernels")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))


def compiled_layer(name: str, dtype=torch.bfloat16) -> None:
    """The layer's fwd+bwd compiled with mode="reduce-overhead" (CUDA graphs) against eager:
    what capture buys where the eager layer is launch-bound."""
    s = SHAPES[name]
    torch.manual_seed(0)
    layer = MoE(s.d_model, s.num_experts, s.top_k, s.d_hidden, "swiglu").to(DEVICE, dtype)
    x = torch.randn(s.tokens, s.d_model, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    compiled = torch.compile(layer, mode="reduce-overhead" if DEVICE == "cuda" else None)
    times = {}
    for label, module in (("eager", layer), ("compiled", compiled)):

        def step(module=module) -> None:
            out = module(x)
            ones = torch.ones_like(out.aux_loss)
            torch.autograd.backward([out.output, out.aux_loss], [grad, ones])
            layer.zero_grad(set_to_none=True)
            x.grad = None

        for _ in range(5):
            step()
        _sync()
        tic = time.perf_counter()
        for _ in range(20):
            step()
        _sync()
        times[label] = (time.perf_counter() - tic) / 20 * 1e3
    print(f"layer {name} bf16 fwd+bwd: eager {times['eager']:.2f} ms, "
          f"compiled reduce-overhead {times['compiled']:.2f} ms", flush=True)  # fmt: skip


def decode_profile(tokens: int = 120) -> None:
    """Batch-1 generation past the window: ms a token, and GPU-busy ms a token."""
    from moekit.lm.model import SparseMoELanguageModel

    torch.manual_seed(0)
    model = SparseMoELanguageModel(65).to(DEVICE).eval()
    start = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    model.generate(start, 64)  # captures the graphs
    _sync()
    tic = time.perf_counter()
    model.generate(start, tokens)
    _sync()
    wall = (time.perf_counter() - tic) / tokens * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(start, tokens)
        _sync()
    launches, busy = _kernel_summary(prof, tokens)
    print(f"decode: {wall:.2f} ms a token ({1e3 / wall:,.0f} tokens/s) over {tokens}; "
          f"GPU busy {busy:.3f} ms, {launches} kernels a token", flush=True)  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--shapes", dest="shape", default="Q,B")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--compiled-shapes", default="B,C", help="layers also compiled")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for shape in args.shape.split(","):
        layer_profile(shape)
    if not args.skip_compile:
        for shape in args.compiled_shapes.split(","):
            if shape:
                compiled_layer(shape)
    decode_profile()
    with tempfile.TemporaryDirectory() as out:
        train_steps(args.data, out + "/fp32", dtype="float32", compile=False, warmup=20, steps=100)
        train_steps(args.data, out + "/bf16", dtype="bfloat16", compile=False, warmup=20, steps=100)
        if not args.skip_compile:
            for dtype in ("float32", "bfloat16"):
                try:
                    train_steps(args.data, f"{out}/c{dtype}", dtype=dtype, compile=True,
                                warmup=30, steps=100)  # fmt: skip
                except Exception as err:  # report it, and go on to the next
                    print(f"train step {dtype} compiled: {type(err).__name__}: {err}"[:2000])


if __name__ == "__main__":
    main()
