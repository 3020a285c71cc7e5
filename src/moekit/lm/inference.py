"""Using a trained checkpoint: load it, evaluate it, generate text from it."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..train.files import resolve_checkpoint
from .data import TokenData, load_text, tokenizer_from_dict
from .model import LMConfig, SparseMoELanguageModel


@dataclass
class Loaded:
    model: SparseMoELanguageModel
    tokenizer: object
    state: dict  # the checkpoint's JSON state
    step: int


def load_model(checkpoint: str | os.PathLike, device: str = "cpu") -> Loaded:
    """The model and tokenizer of a run directory (its newest valid checkpoint) or checkpoint."""
    ckpt = resolve_checkpoint(checkpoint)
    config = LMConfig.from_dict(ckpt.state["model_config"])
    model = SparseMoELanguageModel.from_config(config)
    model.load_state_dict(ckpt.model)
    model.to(device).eval()
    return Loaded(model, tokenizer_from_dict(ckpt.state["tokenizer"]), ckpt.state, ckpt.step)


def generate_text(
    loaded: Loaded,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The prompt followed by `max_new_tokens` sampled tokens (reproducible for a seed).

    `on_text` receives the text as it comes: the prompt, then each piece the new tokens add
    (a byte-level BPE token that ends inside a UTF-8 character waits for the rest of it).
    """
    ids = loaded.tokenizer.encode(prompt) or [0]
    device = next(loaded.model.parameters()).device
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shown = loaded.tokenizer.decode(ids)
    if on_text:
        on_text(shown)
    stream = loaded.model.stream(idx, max_new_tokens, temperature, top_k, generator=gen)
    for token in stream:
        ids.append(int(token[0, 0]))
        text = loaded.tokenizer.decode(ids)
        if on_text and text.startswith(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])
            shown = text
    text = loaded.tokenizer.decode(ids)
    if on_text and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown) :])  # an incomplete character at the very end
    return text


@torch.no_grad()
def evaluate(
    loaded: Loaded, data: str | None = None, eval_iters: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Validation loss (mean CE over random windows, makeMoE's estimate_loss) and perplexity.

    `data` defaults to the run's data file; `eval_iters` and batch size to the run's.
    """
    train_cfg = loaded.state["train_config"]
    text = load_text(data if data is not None else train_cfg["data"])
    config = loaded.model.config
    split = TokenData.from_ids(loaded.tokenizer.encode(text), config.block_size)
    iters = eval_iters or train_cfg.get("eval_batches", train_cfg.get("eval_iters"))
    gen = torch.Generator().manual_seed(seed)
    device = next(loaded.model.parameters()).device
    total = 0.0
    for n, x, y in split.eval_chunks("val", train_cfg["batch_size"], config.block_size, iters, gen):
        total += loaded.model(x.to(device), y.to(device))[1].item() * n
    val_loss = total / iters
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "step": loaded.step}
