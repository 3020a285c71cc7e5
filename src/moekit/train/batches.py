"""The batches of a run: a checkpointable stream of global batches, the evaluation pass, and
the slices each rank and micro-batch takes.

    TrainStream(source, batch_size, seed)   .next() -> the global Batch [B, T]
        Rows:    epochs of shuffled rows (`Rows.order`), a batch may run into the next epoch;
                 state (epoch, position)
        Windows: random windows of the training split from a generator; state its bytes
    eval_pass(source, batch_size, eval_batches, seed) -> Iterator[Batch]
        Rows: every row once, in order; Windows: `eval_batches` random windows of the val split
    part(batch, index, parts) -> Batch      rows index, index + parts, ... (a rank's share)
    chunks(batch, k) -> list[Batch]         k micro-batches of equal rows

Every rank draws the same global batch: its supervised count (`Batch.num_targets`) is the
global count without a collective.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator

import torch

from .data import IGNORE, Batch, Rows, Windows


class TrainStream:
    def __init__(self, source: Rows | Windows, batch_size: int, seed: int) -> None:
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.epoch, self.position = 0, 0  # Rows: the next row of the epoch's order
        self.generator = torch.Generator().manual_seed(seed + 1)  # Windows
        self._order: torch.Tensor | None = None

    def steps_per_epoch(self) -> int:
        """Global batches that cover the training data once."""
        if isinstance(self.source, Rows):
            return max(1, math.ceil(len(self.source) / self.batch_size))
        tokens = self.batch_size * self.source.seq_len
        return max(1, len(self.source.ids["train"]) // tokens)

    def next(self) -> Batch:
        if isinstance(self.source, Windows):
            return self.source.batch("train", self.batch_size, self.generator)
        picked = []
        while len(picked) < self.batch_size:
            if self._order is None:
                self._order = self.source.order(self.epoch, self.seed)  # [rows]
            take = self._order[self.position : self.position + self.batch_size - len(picked)]
            picked += take.tolist()
            self.position += len(take)
            if self.position >= len(self._order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return self.source.batch(picked)

    def state(self) -> dict:
        generator = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()
        return {"epoch": self.epoch, "position": self.position, "generator": generator}

    def restore(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
        raw = bytearray(base64.b64decode(state["generator"]))
        self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8))


def eval_pass(
    source: Rows | Windows, batch_size: int, eval_batches: int, seed: int
) -> Iterator[Batch]:
    """An evaluation's batches: every row of `source` (Rows), every token of an eval file's
    windows (Windows with `whole`), or `eval_batches` windows of the val split from a
    generator seeded by `seed` (a held-out split: never moves the training stream)."""
    if isinstance(source, Windows) and getattr(source, "whole", False):
        yield from source.consecutive("val", batch_size)
        return
    if isinstance(source, Windows):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(eval_batches):
            yield source.batch("val", batch_size, generator)
        return
    for start in range(0, len(source), batch_size):
        yield source.batch(range(start, min(start + batch_size, len(source))))


def part(batch: Batch, index: int, parts: int) -> Batch:
    """Rows index, index + parts, ... of `batch`; a part with no row is the first row with no
    target (a rank with nothing to evaluate still runs the collectives of a forward)."""
    rows = Batch(*(t[index::parts] for t in batch))
    if rows.input_ids.shape[0]:
        return rows
    first = Batch(*(t[:1] for t in batch))
    return first._replace(targets=torch.full_like(first.targets, IGNORE))


def contiguous_part(batch: Batch, index: int, parts: int) -> Batch:
    """The index-th of `parts` equal runs of rows (a rank's slice of a training batch)."""
    rows = batch.input_ids.shape[0] // parts
    return Batch(*(t[index * rows : (index + 1) * rows] for t in batch))


def chunks(batch: Batch, k: int) -> list[Batch]:
    """`k` micro-batches of equal rows (k divides the rows)."""
    return [Batch(*parts) for parts in zip(*(t.chunk(k) for t in batch), strict=True)]
