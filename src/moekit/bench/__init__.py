"""`moekit bench`: how far moekit is from the dense limit, measured in one process.

Layer: moekit's MoE layer, its LIMIT (the N*k routed rows through one expert-sized dense MLP),
the router alone and the seeds' loop over experts, interleaved round by round, medians.
Language model: the makemoe preset's training step against makeMoE's own code and a dense
LIMIT model; generation with and without the KV cache.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

from .._device import cpu_capability, fast_bfloat16
from .hf_peer import available as hf_available
from .layer import CPU_SHAPES, CUDA_SHAPES, SHAPES, LayerShape, Result, bench_layer
from .lm import LMResult, bench_generation, bench_train_step
from .parallel import EPResult, bench_expert_parallel

__all__ = [
    "CPU_SHAPES",
    "CUDA_SHAPES",
    "SHAPES",
    "BenchOptions",
    "LayerShape",
    "run_bench",
    "run_ep_bench",
    "shapes_named",
]


def shapes_named(names: str) -> list[LayerShape]:
    """ "A,B,C" -> the named shapes (ValueError naming an unknown one)."""
    unknown = [n for n in names.split(",") if n and n not in SHAPES]
    if unknown:
        raise ValueError(
            f"--shapes: unknown shape(s) {unknown}; the named ones are {sorted(SHAPES)}"
        )
    return [SHAPES[n] for n in names.split(",") if n]


@dataclass
class BenchOptions:
    shapes: list[LayerShape] = field(default_factory=lambda: shapes_named(CPU_SHAPES))
    dtypes: list[str] | None = None  # None: float32, and bfloat16 where it has a native GEMM
    activations: list[str] = field(default_factory=lambda: ["relu", "swiglu"])
    rounds: int = 7
    warmup: int = 2
    lm: bool = True
    lm_rounds: int = 5
    lm_steps: int = 5
    generate_tokens: int = 200
    seed_loop: bool = True
    memory: bool = True
    hf_peer: bool = True  # transformers' Mixtral block at SwiGLU shapes, when installed
    hf_backends: bool = True  # the "transformers backends" table, when installed
    finetune: bool = True  # the "fine-tuning" table vs PEFT, and the SFT table vs TRL
    device: str = "cpu"

    @classmethod
    def quick(cls, **overrides) -> BenchOptions:
        """Under a minute on 2 CPU cores: float32 ReLU at A, B, C; a short LM run."""
        base = dict(
            dtypes=["float32"],
            activations=["relu"],
            rounds=3,
            warmup=1,
            lm_rounds=3,
            lm_steps=2,
            generate_tokens=40,
            hf_backends=False,  # a minute more; `moekit bench` (not --quick) prints it
            finetune=False,  # a minute and a half more (fine-tuning and SFT tables)
        )
        return cls(**(base | overrides))


def machine_line() -> str:
    device = platform.processor() or platform.machine()
    return (
        f"torch {torch.__version__}, python {platform.python_version()}, {device} "
        f"({cpu_capability()}, native bf16 GEMM: {'yes' if fast_bfloat16() else 'no'}), "
        f"{torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )


def default_dtypes(device: torch.device, echo=print) -> list[str]:
    """float32, and bfloat16 where matmuls have a native kernel (a reference GEMM ~200x slower
    than float32 would measure nothing but itself)."""
    if fast_bfloat16(device):
        return ["float32", "bfloat16"]
    echo(
        "bfloat16 skipped: this CPU has no native bf16 GEMM (AVX-512 BF16 or AMX); "
        "--dtypes bfloat16 runs it anyway"
    )
    return ["float32"]


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def format_layer_table(results: list[Result]) -> str:
    header = (
        "shape",
        "dtype",
        "act",
        "case",
        "ms",
        "tokens/s",
        "TFLOP/s",
        "x LIMIT",
        "peak MB",
        "mem x LIMIT",
    )
    rows = [
        (
            r.shape.name,
            r.dtype,
            r.activation,
            r.case,
            f"{r.ms:.2f}",
            f"{r.tokens_per_s:,.0f}",
            "" if r.tflops is None else f"{r.tflops:.3g}",
            _x(r.ratio),
            _mb(r.peak_bytes),
            _x(r.memory_ratio),
        )
        for r in results
    ]
    return _table(header, rows)


def format_lm_table(results: list[LMResult]) -> str:
    header = ("language model", "ms", "tokens/s", "")
    rows = [(r.case, f"{r.ms:.2f}", f"{r.tokens_per_s:,.0f}", r.note) for r in results]
    return _table(header, rows)


def format_ep_table(results: list[EPResult]) -> str:
    header = (
        "shape",
        "act",
        "shared",
        "ranks",
        "EP step ms",
        "overlap ms",
        "all-to-all ms",
        "share",
        "1 process ms",
        "speedup",
        "all cores ms",
        "vs all cores",
    )
    rows = [
        (
            r.shape.name,
            r.activation,
            r.shared,
            r.ranks,
            f"{r.step_ms:.2f}",
            "-" if r.overlap_ms is None else f"{r.overlap_ms:.2f}",
            f"{r.exchange_ms:.2f}",
            f"{r.share:.0%}",
            f"{r.single_ms:.2f}",
            f"{r.speedup:.2f}",
            f"{r.all_cores_ms:.2f}",
            f"{r.vs_all_cores:.2f}",
        )
        for r in results
    ]
    return _table(header, rows)


def format_hf_backends_table(results: list) -> str:
    """ms of one fwd+bwd per case, and each case / grouped_mm (transformers' default)."""
    header = (
        "family",
        *(f"{c} ms" for c in ("eager", "grouped_mm", "moekit", "patched")),
        "eager/gmm",
        "moekit/gmm",
        "patched/gmm",
    )
    rows = []
    for r in results:
        base = r.ms["grouped_mm"]
        times = [r.ms[c] for c in ("eager", "grouped_mm", "moekit", "patched")]
        ratios = [
            None if r.ms[c] is None else r.ms[c] / base for c in ("eager", "moekit", "patched")
        ]
        rows.append(
            (
                r.family,
                *(("-" if t is None else f"{t:.1f}") for t in times),
                *(("-" if x is None else f"{x:.2f}") for x in ratios),
            )
        )
    return _table(header, rows)


def format_hf_compiled_table(results: list) -> str:
    """ms of one compiled fwd+bwd per case, each / compiled grouped_mm, and what compiling
    gains moekit (eager ms / compiled ms)."""
    header = (
        "family",
        "grouped_mm ms",
        "moekit ms",
        "patched ms",
        "moekit eager ms",
        "moekit/gmm",
        "patched/gmm",
        "moekit eager/compiled",
    )
    rows = []
    for r in results:
        ms, base = r.ms, r.ms["grouped_mm"]

        def cell(value, digits=1):
            return "-" if value is None else f"{value:.{digits}f}"

        rows.append(
            (
                r.family,
                *(cell(ms[c]) for c in ("grouped_mm", "moekit", "patched", "moekit eager")),
                cell(ms["moekit"] / base, 2),
                cell(None if ms["patched"] is None else ms["patched"] / base, 2),
                cell(ms["moekit eager"] / ms["moekit"], 2),
            )
        )
    return _table(header, rows)


def format_finetune_table(results: list) -> str:
    """moekit vs transformers + PEFT: fwd+bwd (layer) or step ms, tokens/s, peak memory."""
    header = (
        "case",
        "transformers ms",
        "moekit ms",
        "moekit/tf",
        "moekit tokens/s",
        "peak MB tf",
        "peak MB moekit",
        "memory moekit/tf",
    )
    rows = [
        (
            r.case,
            f"{r.ms['transformers']:.1f}",
            f"{r.ms['moekit']:.1f}",
            f"{r.ratio():.2f}",
            f"{r.tokens / r.ms['moekit'] * 1e3:,.0f}",
            _mb(r.peak_bytes["transformers"]),
            _mb(r.peak_bytes["moekit"]),
            f"{r.memory_ratio():.2f}",
        )
        for r in results
    ]
    return _table(header, rows)


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _sft_table(rounds: int, echo=print) -> list:
    """The SFT table (`bench.sft`): moekit packed and padded, and TRL where installed."""
    from .sft import bench_sft, format_sft_table, trl_available

    steps = 2  # a case's optimizer steps a round
    echo(
        "SFT on short chat records (~200 tokens): the tiny Qwen3-MoE above with a 320-id chat "
        'tokenizer, experts_implementation="moekit", LoRA r=16 on the experts, AdamW, float32; '
        "moekit packed (4 x 2048) and padded (~8k real tokens a step) vs TRL's SFTTrainer "
        f"(packing, padding-free, 4 x 2048); {rounds} interleaved rounds of {steps} steps a case; "
        "tokens/s: real tokens a step over the median step"
    )
    if not trl_available():
        echo("TRL is not installed (pip install trl): moekit's rows only")
    results = bench_sft(rounds=rounds, steps=steps)
    echo(format_sft_table(results))
    return results


def _decode_table(echo=print) -> list:
    """The decode table (`bench.decode`): greedy generate, one thread, interleaved."""
    from .decode import SIZES, bench_decode, format_decode_table

    shape = ", ".join(f"{k}={v}" for k, v in SIZES.items())
    echo(
        f"decode: greedy generate() of a Qwen3-MoE ({shape}), 16-token prompts, 32 new "
        "tokens, float32, one thread; the cases interleaved on one model, median of 9"
    )
    results = bench_decode()
    echo(format_decode_table(results))
    return results


def _quant_table(echo=print) -> list:
    """The quantised-experts memory table (`bench.quant`): one process per case."""
    import inspect

    from .quant import bench_quant_memory, describe, format_quant_memory_table

    sizes = {k: v.default for k, v in inspect.signature(bench_quant_memory).parameters.items()}
    echo(
        f"quantised experts: LoRA r=8 fine-tuning of {describe(**sizes)}, three AdamW steps "
        "on chat records, a process per case (EP 2: torchrun, the larger rank); peak RSS the "
        "whole process (VmHWM), peak anon its own allocations; x float32: of the float32 "
        "process, x 1 proc: of the same scheme's one process"
    )
    try:
        results = bench_quant_memory()
    except MemoryError as error:
        echo(f"quantised experts: skipped: {error}")
        return []
    echo(format_quant_memory_table(results))
    return results


def run_bench(options: BenchOptions, echo=print) -> dict:
    """Run the benchmark, printing each table as it completes; returns the results."""
    device = torch.device(options.device)
    echo(machine_line())
    dtypes = options.dtypes or default_dtypes(device, echo)
    layer: list[Result] = []
    for shape in options.shapes:
        echo(f"shape {shape}")
        for dtype in dtypes:
            for activation in options.activations:
                layer += bench_layer(
                    shape,
                    getattr(torch, dtype),
                    activation,
                    rounds=options.rounds,
                    warmup=options.warmup,
                    device=device,
                    seed_loop=options.seed_loop,
                    hf_peer=options.hf_peer,
                    memory=options.memory,
                )
    if layer:
        echo(format_layer_table(layer))
    lm: list[LMResult] = []
    if options.lm:
        lm += bench_train_step(
            rounds=options.lm_rounds, steps=options.lm_steps, dtypes=dtypes, device=device.type
        )
        lm += bench_generation(
            tokens=options.generate_tokens, rounds=options.lm_rounds, device=device.type
        )
        echo(format_lm_table(lm))
    hf: list = []
    compiled: list = []
    decode: list = []
    if options.hf_backends and device.type == "cpu" and hf_available():
        from .hf_backends import COMPILED_FAMILIES, bench_hf_backends, bench_hf_compiled

        echo(
            "transformers backends: one fwd+bwd, d=256, 16 experts h=256, top-4, 2 layers, "
            "4 x 256 tokens, float32"
        )
        hf = bench_hf_backends(rounds=max(3, options.lm_rounds), warmup=1)
        echo(format_hf_backends_table(hf))
        echo(
            "compiled: torch.compile(model, fullgraph=True), inductor, the same step and "
            f"sizes ({', '.join(COMPILED_FAMILIES)}); ratios against compiled grouped_mm"
        )
        compiled = bench_hf_compiled(rounds=max(3, options.lm_rounds))
        echo(format_hf_compiled_table(compiled))
        decode = _decode_table(echo)
    tune: list = []
    sft: list = []
    quant: list = []
    if options.finetune and device.type == "cpu" and hf_available():
        from .finetune import LORA_LAYER, bench_expert_lora, bench_finetune_step

        shape = ", ".join(f"{k}={v}" for k, v in LORA_LAYER.items())
        echo(
            f"fine-tuning vs transformers (grouped_mm) + PEFT, float32: expert LoRA on one "
            f"Qwen3-MoE block ({shape}; fwd+bwd); one AdamW step of a tiny Qwen3-MoE (d=256, "
            "16 experts h=256, top-4, 2 layers, 4 x 256 tokens), LoRA r=16 on the experts and full"
        )
        rounds = max(3, options.lm_rounds)
        tune = [bench_expert_lora(rounds=rounds), *bench_finetune_step(rounds=rounds)]
        echo(format_finetune_table(tune))
        sft = _sft_table(rounds, echo)
        quant = _quant_table(echo)
    return {
        "layer": layer,
        "lm": lm,
        "hf_backends": hf,
        "hf_compiled": compiled,
        "decode": decode,
        "finetune": tune,
        "sft": sft,
        "quant_memory": quant,
    }


def run_ep_bench(options: BenchOptions, expert_parallel: int, echo=print) -> list[EPResult]:
    """The expert-parallel table (under torchrun, R = all ranks); only rank 0 echoes."""
    from ..parallel.training import end_distributed, init_distributed

    topo = init_distributed(expert_parallel, options.device, timeout_s=300.0)
    if topo.world_size != expert_parallel:
        raise ValueError(
            f"--expert-parallel {expert_parallel}: run under torchrun --nproc-per-node "
            f"{expert_parallel} (every rank in one expert-parallel group)"
        )
    say = echo if topo.is_main else (lambda *_: None)
    say(machine_line())
    say(
        f"expert parallel over {topo.world_size} ranks ({torch.distributed.get_backend()}): "
        "each takes N/R of the shape's N tokens; "
        "float32 forward+backward; times are the slowest rank's medians; 'all cores': one "
        f"process with {os.cpu_count()} threads on the whole batch"
    )
    results = []
    for shape in options.shapes:
        for activation in options.activations:
            for shared in (0, 1):  # with a shared expert: overlapped with the exchange or not
                results.append(
                    bench_expert_parallel(
                        shape,
                        activation,
                        topo,
                        rounds=options.rounds,
                        warmup=options.warmup,
                        shared=shared,
                    )
                )
    say(format_ep_table(results))
    del topo
    end_distributed()
    return results
