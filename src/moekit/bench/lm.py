"""The language-model benchmark: the makemoe preset's training step and generation.

Training step (batch 16, block 32, vocab 65, AdamW lr 1e-3): moekit's model against makeMoE's
own code (`makemoe.py`, from seed 003) and a dense LIMIT (each MoE layer replaced by one expert
of hidden width k*4d: the same active FLOPs per token, no routing). Generation: tokens/s of
`generate` with and without the KV cache.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..experts import ExpertBank
from ..layers import MoE
from ..lm.config import TrainConfig
from ..lm.model import SparseMoELanguageModel
from ..lm.train import make_optimizer
from ..routing import SoftmaxRouter
from .makemoe import MakeMoELanguageModel
from .timing import interleaved_medians

BATCH, BLOCK, VOCAB = 16, 32, 65


@dataclass
class LMResult:
    case: str
    ms: float  # per training step, or per generated token
    tokens_per_s: float
    note: str = ""  # ratios to the references measured in the same run


def dense_limit_model() -> SparseMoELanguageModel:
    """The makemoe model with each MoE layer replaced by one dense expert of width k*4d."""
    model = SparseMoELanguageModel(VOCAB)
    cfg = model.config
    for block in model.blocks:
        width = cfg.top_k * 4 * cfg.n_embed
        block.moe = MoE(
            cfg.n_embed,
            1,
            1,
            router=SoftmaxRouter(cfg.n_embed, 1, 1),
            experts=ExpertBank(1, cfg.n_embed, width, "relu", bias=True, dropout=cfg.dropout),
            load_balance_coef=0.0,
        )
    return model


def _train_step(model, optimizer, batches, with_aux: bool, bf16: bool = False):
    counter = iter(range(1 << 62))
    device_type = batches[0][0].device.type

    def run() -> None:
        x, y = batches[next(counter) % len(batches)]
        autocast = torch.autocast(device_type, torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            _, loss = model(x, y)
            if with_aux:
                loss = loss + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def bench_train_step(
    *, rounds: int, steps: int, dtypes: list[str], device: str = "cpu"
) -> list[LMResult]:
    torch.manual_seed(0)
    batches = [
        (
            torch.randint(0, VOCAB, (BATCH, BLOCK), device=device),
            torch.randint(0, VOCAB, (BATCH, BLOCK), device=device),
        )
        for _ in range(8)
    ]
    cfg = TrainConfig()
    models = {
        "makeMoE (seed 003)": MakeMoELanguageModel(VOCAB).to(device),
        "LIMIT (dense)": dense_limit_model().to(device),
    }
    cases = {}
    for name, model in models.items():
        optimizer = (
            torch.optim.AdamW(model.parameters(), lr=1e-3)
            if name.startswith("makeMoE")
            else make_optimizer(model, cfg)
        )
        cases[name] = _train_step(model, optimizer, batches, False)
    for dtype in dtypes:
        model = SparseMoELanguageModel(VOCAB).to(device)
        bf16 = dtype == "bfloat16"
        cases[f"moekit {dtype}"] = _train_step(
            model, make_optimizer(model, cfg), batches, True, bf16
        )

    def repeated(fn):
        return lambda: [fn() for _ in range(steps)]

    times = interleaved_medians(
        {name: repeated(fn) for name, fn in cases.items()}, rounds=rounds, warmup=1, device=device
    )
    makemoe, limit = times["makeMoE (seed 003)"], times["LIMIT (dense)"]
    results = []
    for name, total in times.items():
        note = ""
        if name.startswith("moekit"):
            note = f"{makemoe / total:.2f}x faster than makeMoE, {total / limit:.2f}x LIMIT"
        results.append(LMResult(name, total / steps, BATCH * BLOCK * steps / total * 1e3, note))
    return results


def _per_token_ms(generate, tokens: int, rounds: int, device: str = "cpu") -> float:
    """Median ms per generated token over `rounds` runs of `generate(tokens)`, after a warm-up."""
    generate(min(tokens, 8))
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        generate(tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tic) / tokens * 1e3)
    return sorted(times)[len(times) // 2]


def bench_generation(*, tokens: int, rounds: int = 3, device: str = "cpu") -> list[LMResult]:
    """Batch-1 sampling from a one-token prompt, the makemoe model (block 32):

    - `tokens` tokens with and without the KV cache, and makeMoE's own `generate` (seed 003,
      run under no_grad in eval mode: the seed calls it with autograd on, which is slower);
      past the 32-token window every step re-encodes the window (absolute positions), so
      the cache serves the first 31 tokens only;
    - the window itself (31 tokens), with and without the cache: what the cache buys.
    """
    torch.manual_seed(0)
    model = SparseMoELanguageModel(VOCAB).to(device).eval()
    seed_model = MakeMoELanguageModel(VOCAB).to(device).eval()
    start = torch.zeros(1, 1, dtype=torch.long, device=device)
    window = model.config.block_size - 1

    def ours(use_cache: bool):
        gen = torch.Generator(device).manual_seed(0)
        return lambda n: model.generate(start, n, generator=gen, use_cache=use_cache)

    def seed(n: int) -> None:
        with torch.no_grad():
            seed_model.generate(start, n)

    ms = {
        "cache": _per_token_ms(ours(True), tokens, rounds, device),
        "no cache": _per_token_ms(ours(False), tokens, rounds, device),
        "makeMoE": _per_token_ms(seed, tokens, rounds, device),
        "window cache": _per_token_ms(ours(True), window, rounds, device),
        "window no cache": _per_token_ms(ours(False), window, rounds, device),
    }
    vs_seed = (
        f"{ms['makeMoE'] / ms['cache']:.2f}x makeMoE, {ms['no cache'] / ms['cache']:.2f}x no cache"
    )
    in_window = f"{ms['window no cache'] / ms['window cache']:.2f}x no cache"
    return [
        LMResult(f"generate {tokens}, KV cache", ms["cache"], 1e3 / ms["cache"], vs_seed),
        LMResult(f"generate {tokens}, no cache", ms["no cache"], 1e3 / ms["no cache"]),
        LMResult(f"generate {tokens}, makeMoE (seed 003)", ms["makeMoE"], 1e3 / ms["makeMoE"]),
        LMResult(
            f"generate {window} (window), KV cache",
            ms["window cache"],
            1e3 / ms["window cache"],
            in_window,
        ),
        LMResult(
            f"generate {window} (window), no cache",
            ms["window no cache"],
            1e3 / ms["window no cache"],
        ),
    ]
