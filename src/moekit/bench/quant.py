"""The "quantised experts" memory table: LoRA fine-tuning of a Qwen3-MoE whose experts are
nearly all of its weights, with the experts in float32, int8 and nf4.

    bench_quant_memory(layers=6, experts=64, ...) -> list[QuantMemory]
    format_quant_memory_table(results) -> str

Each case runs in a process of its own (`moekit finetune`'s job: load, LoRA rank 8 on the
experts, three AdamW steps on chat records), then under torchrun at EP 2 (2 ranks, each
reading its half of the experts): its peak resident memory (the whole process, the kernel's
high-water mark `VmHWM`: the checkpoint's file pages that safetensors maps in count too;
not `ru_maxrss`, which keeps the parent's resident memory at the fork) and its peak anonymous
memory (sampled every 5 ms: what the process itself allocated), the seconds of a training step
(median of three) and of the load; at EP 2 the largest rank's. The model is written once into
a temporary directory (random weights, no network).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

SCHEMES = ("float32", "int8", "nf4")

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
from moekit.train.finetune_config import FinetuneConfig
from moekit.train.loop import Loop
model, data, out, scheme = sys.argv[1:5]
ranks = int(sys.argv[5])
cfg = FinetuneConfig(model=model, data=data, out=out, steps=3, seq_len=128, batch_size=4,
                     lora_rank=8, track=False, progress=False, overwrite=True,
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
"""


class QuantMemory(NamedTuple):
    scheme: str
    ranks: int  # 1: one process; 2: EP 2 under torchrun, the largest rank
    peak_rss_mb: float  # the whole process, file pages included
    peak_anon_mb: float  # the process's own allocations
    step_s: float
    load_s: float


def _write_model(root: Path, layers: int, experts: int, d_model: int, d_hidden: int) -> Path:
    import torch
    import transformers

    from .sft import chat_records, chat_tokenizer

    tok = chat_tokenizer()
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=d_model,
        moe_intermediate_size=d_hidden,
        num_experts=experts,
        num_experts_per_tok=4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=d_model // 4,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Qwen3MoeForCausalLM(config)
        model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    records = chat_records(40)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "model"


def bench_quant_memory(
    layers: int = 6, experts: int = 64, d_model: int = 512, d_hidden: int = 2048
) -> list[QuantMemory]:
    """The table's rows, one process each (module docstring)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _write_model(root, layers, experts, d_model, d_hidden)
        for ranks in (1, 2):
            for scheme in SCHEMES:
                out = root / f"out-{scheme}-{ranks}"
                args = [str(model), str(root / "chat.jsonl"), str(out), scheme, str(ranks)]
                found = _run_case(args, ranks, root)
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
        raise RuntimeError(f"{args[3]} at {ranks} ranks: {done.stderr.strip().splitlines()[-1]}")
    return [json.loads(Path(f"{args[2]}.{rank}.json").read_text()) for rank in range(ranks)]


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
