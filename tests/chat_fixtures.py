"""A tiny chat setup, built offline: the benchmark's byte-level BPE tokenizer with a chat
template that has {% generation %} blocks, a tiny Qwen3-MoE of its vocabulary, and chat
records whose supervised lengths differ tenfold."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

from moekit.bench.sft import TEXT, chat_tokenizer

WORDS = TEXT.split()


def tokenizer():
    """The benchmark's chat tokenizer: a byte-level BPE of 320 ids with a ChatML template
    whose assistant turns are {% generation %} blocks (`moekit.bench.sft.chat_tokenizer`)."""
    return chat_tokenizer()


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` chat records: a question, an answer of 2 to 30 words (tenfold), sometimes a
    second turn."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    records = []
    for i in range(n):
        messages = [
            {"role": "user", "content": words(rng.randint(3, 8))},
            {"role": "assistant", "content": words(2 if i % 2 else 30)},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": words(4)},
                {"role": "assistant", "content": words(rng.randint(2, 12))},
            ]
        records.append({"messages": messages})
    return records


def save_chat_model(root: Path, family: str = "qwen3_moe") -> tuple[Path, Path]:
    """(model directory with its tokenizer, chat JSONL) under `root`."""
    from moekit.hf.catalog import tiny_model

    tok = tokenizer()
    model_dir = root / f"{family}-chat"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(family, vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(40)))
    return model_dir, data
