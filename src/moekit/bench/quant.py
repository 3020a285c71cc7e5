"""The "quantised experts" memory table: LoRA fine-tuning of a Qwen3-MoE whose experts are
nearly all of its weights, with the experts in float32, int8 and nf4.

    bench_quant_memory(layers=6, experts=128, ...) -> list[QuantMemory]
    format_quant_memory_table(results) -> str

Each case runs in a process of its own (`moekit finetune`'s job: load, LoRA rank 8 on the
experts, activation checkpointing as QLoRA runs, three AdamW steps on chat records), then
under torchrun at EP 2 (2 ranks, each reading its half of the experts): its peak resident
memory (the whole process, the kernel's high-water mark `VmHWM`: the checkpoint's file pages
that safetensors maps in count too; not `ru_maxrss`, which keeps the parent's resident memory
at the fork) and its peak anonymous memory (sampled every 5 ms: what the process itself
allocated), the seconds of a training step (median of three) and of the load; at EP 2 the
largest rank's. The model is written once into a temporary directory (random weights, no
network). The default model (3.6B weights, 14.5 GB in float32) is large beside the ~450 MB
each process pays before it reads a weight (torch, transformers, PEFT): the float32 cases
need ~18 GB of memory, `memory_needed` says how much for a size.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

SCHEMES = ("float32", "int8", "nf4")
TOP_K = 4  # experts a token

_CHILD = r"""
import json, statistics, sys, threading, time
peak = {"anon": 0.0}
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))
def sample():
    while True:
        peak["anon"] = max(peak["anon"], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from moekit.hf.finetune import FinetuneJob
from moekit.parallel.training import end_distributed
from moekit.train.finetune_config import FinetuneConfig
from moekit.train.loop import Loop
model, data, out, scheme = sys.argv[1:5]
ranks, checkpointing = int(sys.argv[5]), sys.argv[6] == "1"
cfg = FinetuneConfig(model=model, data=data, out=out, steps=3, seq_len=128, batch_size=4,
                     lora_rank=8, activation_checkpointing=checkpointing,
                     track=False, progress=False, overwrite=True,
                     expert_parallel=ranks, dist_timeout=600.0,
                     quantize_experts=None if scheme == "float32" else scheme)
tic = time.perf_counter()
loop = Loop(FinetuneJob(cfg))
load = time.perf_counter() - tic
steps = []
for _ in range(3):
    tic = time.perf_counter()
    loop.train_step()
    steps.append(time.perf_counter() - tic)
found = json.dumps({"rss": status("VmHWM"),
                    "anon": peak["anon"], "step": statistics.median(steps), "load": load})
with open(f"{out}.{loop.topo.rank}.json", "w") as f:
    f.write(found)
del loop
end_distributed()
"""


class QuantMemory(NamedTuple):
    scheme: str
    ranks: int  # 1: one process; 2: EP 2 under torchrun, the largest rank
    peak_rss_mb: float  # the whole process, file pages included
    peak_anon_mb: float  # the process's own allocations
    step_s: float
    load_s: float


def _config(layers: int, experts: int, d_model: int, d_hidden: int, vocab: int):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_model,
        moe_intermediate_size=d_hidden,
        num_experts=experts,
        num_experts_per_tok=TOP_K,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=d_model // 4,
    )


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a Qwen3-MoE checkpoint as transformers saves it (an expert a tensor)."""
    d, h, heads = config.hidden_size, config.moe_intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * heads, config.num_key_value_heads * heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (d,),
            layer + "post_attention_layernorm.weight": (d,),
            layer + "self_attn.q_proj.weight": (q, d),
            layer + "self_attn.k_proj.weight": (kv, d),
            layer + "self_attn.v_proj.weight": (kv, d),
            layer + "self_attn.o_proj.weight": (d, q),
            layer + "self_attn.q_norm.weight": (heads,),
            layer + "self_attn.k_norm.weight": (heads,),
            layer + "mlp.gate.weight": (config.num_experts, d),
        }
        for e in range(config.num_experts):
            expert = f"{layer}mlp.experts.{e}."
            shapes |= {
                expert + "gate_proj.weight": (h, d),
                expert + "up_proj.weight": (h, d),
                expert + "down_proj.weight": (d, h),
            }
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (config.vocab_size, d)}


def _write_model(
    root: Path, layers: int, experts: int, d_model: int, d_hidden: int, shard_mb: int = 1024
) -> Path:
    """A random Qwen3-MoE checkpoint in `root/model` (norms 1, the rest N(0, 0.02)), written
    a shard of `shard_mb` at a time: never the whole model in memory, so the cases measured
    beside this process have the machine's memory."""
    import torch
    from safetensors.torch import save_file

    from .sft import chat_records, chat_tokenizer

    tok = chat_tokenizer()
    config = _config(layers, experts, d_model, d_hidden, len(tok))
    config.architectures = ["Qwen3MoeForCausalLM"]
    directory = root / "model"
    directory.mkdir(parents=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in checkpoint_shapes(config).items():  # shards of ~shard_mb (float32)
        if size >= shard_mb * 2**20:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += 4 * math.prod(shape)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: torch.ones(shape)
            if name.endswith("norm.weight")
            else torch.empty(shape).normal_(0.0, 0.02, generator=generator)
            for name, shape in group
        }
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.nbytes for t in tensors.values())
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    tok.save_pretrained(directory)
    records = chat_records(40)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def _weights(layers: int, experts: int, d_model: int, d_hidden: int) -> tuple[int, int]:
    """(all weights, the experts') of the table's model."""
    shapes = checkpoint_shapes(_config(layers, experts, d_model, d_hidden, 320)).items()
    total = sum(math.prod(shape) for _, shape in shapes)
    return total, sum(math.prod(shape) for name, shape in shapes if ".experts." in name)


def memory_needed(layers: int, experts: int, d_model: int, d_hidden: int) -> int:
    """Bytes of memory the table's largest case needs (the float32 process, or both float32
    ranks at EP 2): its weights, their LoRA state, a step, and each process's baseline."""
    return int(4 * _weights(layers, experts, d_model, d_hidden)[0] * 1.15) + 2 * 2**30


def describe(
    layers: int, experts: int, d_model: int, d_hidden: int, activation_checkpointing: bool
) -> str:
    """The model and run of a table, in words."""
    total, expert = _weights(layers, experts, d_model, d_hidden)
    return (
        f"a Qwen3-MoE ({layers} layers, {experts} experts of d={d_model} h={d_hidden}, "
        f"top-{TOP_K}; experts "
        f"{100 * expert / total:.1f}% of its {total / 1e9:.2f}B weights, "
        f"{4 * total / 1e9:.1f} GB in float32)"
        + (", activation checkpointing" if activation_checkpointing else "")
    )


def available_memory() -> int | None:
    """Bytes the kernel says a new process can have (`MemAvailable`), None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            return next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration):
        return None


def bench_quant_memory(
    layers: int = 6,
    experts: int = 128,
    d_model: int = 512,
    d_hidden: int = 3072,
    activation_checkpointing: bool = True,
) -> list[QuantMemory]:
    """The table's rows, one process each (module docstring).

    Raises:
        MemoryError: the machine has less memory available than the float32 cases need.
    """
    need, have = memory_needed(layers, experts, d_model, d_hidden), available_memory()
    if have is not None and have < need:
        raise MemoryError(
            f"the float32 cases need ~{need / 2**30:.0f} GB of memory, "
            f"{have / 2**30:.0f} GB is available"
        )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _write_model(root, layers, experts, d_model, d_hidden)
        for ranks in (1, 2):
            for scheme in SCHEMES:
                out = root / f"out-{scheme}-{ranks}"
                args = [str(model), str(root / "chat.jsonl"), str(out), scheme, str(ranks)]
                found = _run_case([*args, str(int(activation_checkpointing))], ranks, root)
                worst = max(found, key=lambda r: r["anon"])
                results.append(
                    QuantMemory(
                        scheme,
                        ranks,
                        max(r["rss"] for r in found),
                        worst["anon"],
                        max(r["step"] for r in found),
                        max(r["load"] for r in found),
                    )
                )
    return results


def _run_case(args: list[str], ranks: int, root: Path) -> list[dict]:
    """One case's processes (torchrun's ranks at EP 2): each rank's numbers."""
    script = root / "child.py"
    script.write_text(_CHILD)
    command = [sys.executable, str(script)]
    if ranks > 1:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
        command += [str(script)]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{args[3]} at {ranks} ranks: {_failure(done.stderr)}")
    return [json.loads(Path(f"{args[2]}.{rank}.json").read_text()) for rank in range(ranks)]


def _failure(stderr: str) -> str:
    """What failed, in one line: the child's exception, else torchrun's root cause (a signal);
    torchrun ends its report with a rule of '='."""
    lines = [line.strip() for line in stderr.splitlines()]
    errors = [line for line in lines if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception)\b", line)]
    causes = [line for line in lines if line.startswith(("exitcode", "traceback"))]
    if errors:
        return errors[-1]
    if causes:
        return "; ".join(causes[-2:])
    rest = [line for line in lines if line.strip("=-")]
    return rest[-1] if rest else "no output"


def format_quant_memory_table(results: list[QuantMemory]) -> str:
    """One row a case; the ratios of its peak RSS to the float32 process's and to the same
    scheme's one process (EP 2 rows), and of its peak anon to the float32 process's."""
    base = results[0]
    one = {r.scheme: r for r in results if r.ranks == 1}
    header = (
        f"{'experts':>8}  {'ranks':>5}  {'peak RSS MB':>11}  {'x float32':>9}  "
        f"{'x 1 proc':>8}  {'peak anon MB':>12}  {'x float32':>9}  {'step s':>7}  {'load s':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        single = one.get(r.scheme, r)
        lines.append(
            f"{r.scheme:>8}  {r.ranks:>5}  {r.peak_rss_mb:>11,.0f}  "
            f"{r.peak_rss_mb / base.peak_rss_mb:>9.2f}  "
            f"{r.peak_rss_mb / single.peak_rss_mb:>8.2f}  {r.peak_anon_mb:>12,.0f}  "
            f"{r.peak_anon_mb / base.peak_anon_mb:>9.2f}  {r.step_s:>7.2f}  {r.load_s:>7.1f}"
        )
    return "\n".join(lines)
