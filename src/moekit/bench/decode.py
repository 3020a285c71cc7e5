"""The "decode" table: greedy `generate()` of a tiny Qwen3-MoE, one thread, tokens per second
of transformers' `grouped_mm` experts and moekit's (the backend; the patched model; the patched
model recording its routes, `hf.record_routing`, as an RL rollout does).

    bench_decode(batches=(1, 8), new_tokens=32, rounds=9) -> list[DecodeResult]
    format_decode_table(results) -> str

One model object for every case (the implementation switched between runs, the patch put on
and taken off), the cases interleaved round by round, the median of the rounds: this machine
is shared and separately allocated copies of one model differ by a few percent. Every case's
tokens are checked equal to transformers' eager experts'.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import NamedTuple

import torch

CASES = ("grouped_mm", "moekit", "moekit patched", "moekit patched, recording")
SIZES = dict(d_model=256, d_hidden=128, experts=32, top_k=4, layers=4)


class DecodeResult(NamedTuple):
    case: str
    batch: int
    tokens_per_s: float
    same_as_eager: bool


def _model():
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=SIZES["d_model"],
        intermediate_size=2 * SIZES["d_model"],
        moe_intermediate_size=SIZES["d_hidden"],
        num_experts=SIZES["experts"],
        num_experts_per_tok=SIZES["top_k"],
        num_hidden_layers=SIZES["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=SIZES["d_model"] // 4,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def _prepare(model, case: str) -> None:
    """The model set up for `case` (untimed): its experts implementation, the patch on or off."""
    from ..hf import patch_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the patch taken off by set_experts_implementation
        model.set_experts_implementation("moekit" if case.startswith("moekit") else case)
        if "patched" in case:
            patch_model(model)


def _generate(model, case: str, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from ..hf import record_routing

    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        if case.endswith("recording"):
            with record_routing(model):
                return model.generate(ids, pad_token_id=0, **options)
        return model.generate(ids, pad_token_id=0, **options)


def bench_decode(
    batches: tuple[int, ...] = (1, 8), new_tokens: int = 32, rounds: int = 9
) -> list[DecodeResult]:
    """Tokens per second of each case at each batch size (module docstring)."""
    import moekit.hf  # noqa: F401  registers the backend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        results = []
        for batch in batches:
            ids = torch.randint(1, 512, (batch, 16), generator=torch.Generator().manual_seed(1))
            _prepare(model, "eager")
            eager = _generate(model, "eager", ids, new_tokens)
            same = {}
            for case in CASES:
                _prepare(model, case)
                same[case] = torch.equal(_generate(model, case, ids, new_tokens), eager)
            seconds: dict[str, list[float]] = {c: [] for c in CASES}
            for _ in range(rounds):
                for case in CASES:
                    _prepare(model, case)
                    tic = time.perf_counter()
                    _generate(model, case, ids, new_tokens)
                    seconds[case].append(time.perf_counter() - tic)
            for case in CASES:
                rate = batch * new_tokens / statistics.median(seconds[case])
                results.append(DecodeResult(case, batch, rate, same[case]))
        return results
    finally:
        torch.set_num_threads(threads)


def format_decode_table(results: list[DecodeResult]) -> str:
    peer = {r.batch: r.tokens_per_s for r in results if r.case == "grouped_mm"}
    header = f"{'experts':>26}  {'batch':>5}  {'tokens/s':>9}  {'x grouped_mm':>12}  {'= eager':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.case:>26}  {r.batch:>5}  {r.tokens_per_s:>9,.0f}  "
            f"{r.tokens_per_s / peer[r.batch]:>12.2f}  {'yes' if r.same_as_eager else 'NO':>7}"
        )
    return "\n".join(lines)
