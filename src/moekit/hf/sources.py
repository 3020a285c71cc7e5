"""The data of a fine-tune: `--data` and `--eval-data` -> token caches -> a training source and
an evaluation source.

    sources(cfg, tokenizer, topo) -> (train, eval)

A text file: `train.data.Windows` (random windows; without --eval-data its last 10% is held
out); an --eval-data text file is evaluated whole. Records: `train.data.Rows` (packed or
padded); without --eval-data the last 10% of the records are held out. Rank 0 builds the
caches (in `OUT/data`), the other ranks open them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..parallel.training import Topology
from ..train.data import Rows, TokenCache, Windows
from ..train.finetune_config import FinetuneConfig
from .data import RECORD_SUFFIXES, tokenize_file

__all__ = ["sources"]

log = logging.getLogger(__name__)

HELD_OUT = 0.1  # the records (or text) held out when there is no --eval-data


def _is_text(path: str) -> bool:
    p = Path(path)
    return not p.is_dir() and p.suffix.lower() not in RECORD_SUFFIXES


def _cache(cfg: FinetuneConfig, tokenizer, topo: Topology, path: str, flag: str) -> TokenCache:
    def build() -> TokenCache:
        cache_dir = Path(cfg.out) / "data"
        return tokenize_file(path, tokenizer, cache_dir, cfg.seq_len, cfg.train_on_prompt, flag)

    cache = build() if topo.is_main else None  # rank 0 builds, the others open it
    topo.wait()
    cache = cache or build()
    if cache.truncated:
        log.warning(
            "%s: %d of %d records longer than --seq-len %d were truncated",
            flag,
            cache.truncated,
            len(cache),
            cfg.seq_len,
        )
    return cache


def sources(cfg: FinetuneConfig, tokenizer, topo: Topology) -> tuple:
    """(training source, evaluation source): `Windows` or `Rows` (module docstring).

    Raises:
        ValueError: Data errors, one line naming the flag (before any model is loaded).
    """
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    train = _cache(cfg, tokenizer, topo, cfg.data, "--data")
    held = (
        None
        if cfg.eval_data is None
        else _cache(cfg, tokenizer, topo, cfg.eval_data, "--eval-data")
    )
    if _is_text(cfg.data):
        train_source = eval_source = Windows.from_cache(train, cfg.seq_len, "--data")
    else:
        records = len(train)
        held_out = max(1, int(records * HELD_OUT)) if held is None else 0
        if records - held_out < 1:
            raise ValueError(
                f"--data {cfg.data}: {records} record(s), too few to hold out {HELD_OUT:.0%} "
                "for evaluation; give --eval-data"
            )
        split = np.arange(records - held_out)
        train_source = Rows(train, cfg.seq_len, cfg.packing, pad, records=split)
        rest = np.arange(records - held_out, records)
        eval_source = Rows(train, cfg.seq_len, cfg.packing, pad, records=rest)
    if held is not None and _is_text(cfg.eval_data):
        eval_source = Windows(held.ids, cfg.seq_len, None, "--eval-data")
        eval_source.ids["val"] = held.ids  # the whole file is held out, every token evaluated
        eval_source.whole = True
    elif held is not None:
        eval_source = Rows(held, cfg.seq_len, cfg.packing, pad)
    for name, source in (("--data", train_source), ("the held-out data", eval_source)):
        if isinstance(source, Rows) and len(source) == 0:
            raise ValueError(
                f"{name}: no record has a supervised token left within --seq-len "
                f"{cfg.seq_len} (raise --seq-len, or --train-on-prompt)"
            )
    return train_source, eval_source
