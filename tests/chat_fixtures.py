"""A tiny chat setup, built offline: a byte-level BPE tokenizer with a chat template that has
{% generation %} blocks, a tiny Qwen3-MoE of its vocabulary, and chat records whose
supervised lengths differ tenfold."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

SPECIALS = ["<|im_start|>", "<|im_end|>", "<eos>", "<pad>"]
TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}{%- generation -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
WORDS = (  # noqa: SIM905 - a sentence reads better than a list of its words
    "the king and queen of england went to war with france over a cup of tea while the "
    "people of london sang songs about the weather and the price of bread"
).split()


def tokenizer():
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = TEMPLATE
    return fast


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
