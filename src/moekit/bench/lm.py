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

    def run() -> None:
        x, y = batches[next(counter) % len(batches)]
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            _, loss = model(x, y)
            if with_aux:
                loss = loss + model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def bench_train_step(*, rounds: int, steps: int, dtypes: list[str]) -> list[LMResult]:
    torch.manual_seed(0)
    batches = [
        (torch.randint(0, VOCAB, (BATCH, BLOCK)), torch.randint(0, VOCAB, (BATCH, BLOCK)))
        for _ in range(8)
    ]
    cfg = TrainConfig()
    models = {
        "makeMoE (seed 003)": MakeMoELanguageModel(VOCAB),
        "LIMIT (dense)": dense_limit_model(),
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
        model = SparseMoELanguageModel(VOCAB)
        bf16 = dtype == "bfloat16"
        cases[f"moekit {dtype}"] = _train_step(
            model, make_optimizer(model, cfg), batches, True, bf16
        )

    def repeated(fn):
        return lambda: [fn() for _ in range(steps)]

    times = interleaved_medians(
        {name: repeated(fn) for name, fn in cases.items()}, rounds=rounds, warmup=1
    )
    makemoe, limit = times["makeMoE (seed 003)"], times["LIMIT (dense)"]
    results = []
    for name, total in times.items():
        note = ""
        if name.startswith("moekit"):
            note = f"{makemoe / total:.2f}x faster than makeMoE, {total / limit:.2f}x LIMIT"
        results.append(LMResult(name, total / steps, BATCH * BLOCK * steps / total * 1e3, note))
    return results


def bench_generation(*, tokens: int) -> list[LMResult]:
    torch.manual_seed(0)
    model = SparseMoELanguageModel(VOCAB).eval()
    start = torch.zeros(1, 1, dtype=torch.long)
    times = {}
    for use_cache in (True, False):
        model.generate(start, 8, use_cache=use_cache)  # warm-up
        gen = torch.Generator().manual_seed(0)
        tic = time.perf_counter()
        model.generate(start, tokens, generator=gen, use_cache=use_cache)
        times[use_cache] = (time.perf_counter() - tic) / tokens * 1e3
    speedup = times[False] / times[True]
    return [
        LMResult("generate, KV cache", times[True], 1e3 / times[True], f"{speedup:.2f}x no cache"),
        LMResult("generate, no cache", times[False], 1e3 / times[False]),
    ]
