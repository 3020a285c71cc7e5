"""Token caches on disk, packing and batches: the data layer every trainer shares.

records (ids [n], supervised mask [n]) -> `TokenCache` (memory-mapped ids.bin, mask.bin,
offsets.bin, meta.json; built once per source, tokenizer and options) -> `Rows` (records packed
into rows of `seq_len` tokens, or one record a row) or `Windows` (random windows over one long
text) -> `Batch` (input ids, shifted targets with -100 where nothing is learnt, position ids
restarting per document, attention mask), shapes [B, T].

Generic: torch, numpy and the standard library only (no tokenizer, no transformers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORE = -100  # the target of a position whose next token is not learnt (torch's ignore_index)
_FILES = ("ids.bin", "mask.bin", "offsets.bin")
_CHUNK = 1 << 20  # tokens buffered before a write: the corpus is never held in memory


class Batch(NamedTuple):
    """One batch of rows, every tensor [B, T].

    input_ids: int64 token ids; 0 on padding.
    targets: int64, already shifted: targets[b, t] is the id at t + 1 when that token is
        supervised and in the same document, else -100 (the last token of every document,
        padding, document boundaries, unsupervised tokens).
    position_ids: int64, restarting at 0 per document; padding continues counting from the
        row's last document, so it reads as that document's tail, which no real token attends
        to under causal attention (transformers finds packed documents from these restarts when
        given position ids and no attention mask).
    attention_mask: int64, 1 on real tokens, 0 on padding.
    """

    input_ids: Tensor  # [B, T]
    targets: Tensor  # [B, T]
    position_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]

    def num_targets(self) -> int:
        """Positions whose loss counts (targets != -100)."""
        return int((self.targets != IGNORE).sum())

    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))


class _Writer:
    """Appends records to the .bin files of a cache directory a chunk at a time, and counts."""

    def __init__(self, directory: Path, max_len: int | None) -> None:
        self.files = [open(directory / name, "wb") for name in _FILES]  # noqa: SIM115
        self.max_len = max_len
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, mask) not yet written
        self.offsets, self.buffered = [0], 0
        self.meta = {"records": 0, "tokens": 0, "targets": 0, "truncated": 0, "max_len": max_len}

    def add(self, ids: Sequence[int], mask: Sequence[int] | None) -> None:
        ids, mask = _as_record(ids, mask)  # [n], [n]
        meta = self.meta
        if self.max_len is not None and len(ids) > self.max_len:
            ids, mask = ids[: self.max_len], mask[: self.max_len]
            meta["truncated"] += 1
        meta["records"] += 1
        meta["tokens"] += len(ids)
        meta["targets"] += int(mask[1:].sum())  # the first token is never predicted
        self.chunks.append((ids.astype(np.uint32), mask.astype(np.uint8)))
        self.offsets.append(meta["tokens"])
        self.buffered += len(ids) + 1
        if self.buffered >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.chunks:
            ids, masks = zip(*self.chunks, strict=True)
            self.files[0].write(np.concatenate(ids).tobytes())
            self.files[1].write(np.concatenate(masks).tobytes())
        self.files[2].write(np.asarray(self.offsets, np.int64).tobytes())
        self.chunks, self.offsets, self.buffered = [], [], 0

    def close(self) -> None:
        for file in self.files:
            file.close()


def _check(meta: dict, source: str) -> None:
    """Warn of truncated records; raise when nothing is left to learn."""
    records, truncated = meta["records"], meta["truncated"]
    if records == 0:
        raise ValueError(f"{source}: no records")
    if truncated:
        log.warning(
            "%s: %d of %d records are longer than %d tokens and were truncated",
            source, truncated, records, meta["max_len"],
        )  # fmt: skip
    if meta["targets"] == 0:
        why = f"none of its {records} records has a supervised token"
        if truncated:
            why = (
                f"after truncating {truncated} of {records} records to --seq-len "
                f"{meta['max_len']} tokens no supervised token is left: raise --seq-len"
            )
        raise ValueError(f"{source}: {why}")


def _as_record(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """ids [n] as int64, mask [n] as bool (None: every token supervised), validated."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # [n]
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ValueError(f"token ids must be in [0, 2**32), got {ids.min()}..{ids.max()}")
    mask = np.ones(len(ids), bool) if mask is None else np.asarray(mask).reshape(-1) != 0
    if len(mask) != len(ids):
        raise ValueError(f"a record's mask has {len(mask)} entries for {len(ids)} token ids")
    return ids, mask


def _map(path: Path, dtype, count: int) -> np.ndarray:
    """A read-only memory map; an empty array where `count` is 0 (mmap cannot map 0 bytes)."""
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _publish(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path`, replacing an older cache there."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)  # a directory rename within one parent: atomic
    except OSError:
        if not path.exists():
            raise
        log.info("another process published %s first: using its cache", path)
        shutil.rmtree(tmp, ignore_errors=True)  # theirs holds the same key
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class TokenCache:
    """A tokenised corpus on disk, memory-mapped: R records, L tokens.

    Files: ids.bin (uint32 [L]), mask.bin (uint8 [L], 1 where the token is a supervised target,
    i.e. its loss counts when predicted from the token before), offsets.bin (int64 [R + 1]:
    record r is tokens offsets[r]:offsets[r + 1]), meta.json (the `key` naming source, tokenizer
    and options; counts of records, tokens, supervised targets and truncated records).
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self.offsets = np.fromfile(self.path / "offsets.bin", dtype=np.int64)  # [R + 1]
        self.ids = _map(self.path / "ids.bin", np.uint32, meta["tokens"])  # [L]
        self.mask = _map(self.path / "mask.bin", np.uint8, meta["tokens"])  # [L]

    @classmethod
    def open(cls, path: str | os.PathLike, key: str) -> TokenCache | None:
        """The cache at `path`, or None when it is missing, incomplete or built for another key."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            sizes = [(path / name).stat().st_size for name in _FILES]
        except (OSError, ValueError):
            return None
        if meta.get("key") != key:
            return None
        if sizes != [4 * meta["tokens"], meta["tokens"], 8 * (meta["records"] + 1)]:
            log.warning("token cache %s has files of the wrong size: rebuilding it", path)
            return None
        return cls(path, meta)

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        records: Iterable[tuple[Sequence[int], Sequence[int] | None]],
        key: str,
        max_len: int | None = None,
        source: str = "the data",
    ) -> TokenCache:
        """Stream `records` into a new cache at `path`, published atomically.

        The files are written into a temporary directory beside `path` and renamed into place
        once complete: an exception (or a killed process) leaves no cache at `path`.

        Args:
            path: The cache directory (its parent is created).
            records: (ids [n], mask [n] or None) per record; mask None supervises every token.
            key: Names what the cache was built from; `open` returns it only for this key.
            max_len: Records longer than this are truncated to their first `max_len` tokens
                (counted in meta["truncated"]); None keeps every record whole.
            source: How error messages name the data, e.g. "--data train.jsonl".

        Returns:
            The opened cache.

        Raises:
            ValueError: No records, or no record has a supervised target (after truncation,
                the message names --seq-len).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            writer = _Writer(tmp, max_len)
            try:
                for ids, mask in records:
                    writer.add(ids, mask)
                writer.flush()
            finally:
                writer.close()
            meta = {**writer.meta, "key": key}
            _check(meta, source)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _publish(tmp, path)
            cache = cls(path, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "tokenised %s: %d records, %d tokens -> %s", source, len(cache), cache.num_tokens, path
        )
        return cache

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per record: int64 [R]."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def truncated(self) -> int:
        """Records cut to `max_len` tokens when the cache was built."""
        return int(self.meta["truncated"])

    def targets(self) -> np.ndarray:
        """Supervised targets per record (mask summed over all tokens but the first): int64 [R]."""
        starts, lengths = self.offsets[:-1], self.lengths
        counts = np.zeros(len(self), np.int64)
        full = lengths > 0  # reduceat over an empty slice would return the next element
        if full.any():
            sums = np.add.reduceat(self.mask, starts[full], dtype=np.int64)  # streams the map
            counts[full] = sums - self.mask[starts[full]]
        return counts

    def record(self, index: int) -> tuple[Tensor, Tensor]:
        """Record `index`: ids [n] int64 and the supervised mask [n] bool."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = torch.from_numpy(self.ids[start:end].astype(np.int64))  # [n]
        mask = torch.from_numpy(self.mask[start:end] != 0)  # [n]
        return ids, mask


def pack(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Group records into rows of at most `seq_len` tokens: best-fit decreasing.

    Longest record first (ties by index), each into the open row with the least free space
    that still holds it, else a new row: deterministic, within 11/9 of the fewest rows (a
    sequential greedy wastes more), O(R log R) as rows are found by free space, never scanned.

    Args:
        lengths: Tokens per record, int [R], each in 1..seq_len.
        seq_len: Tokens per row.

    Returns:
        Record indices per row, every record in exactly one.
    """
    lengths = np.asarray(lengths, dtype=np.int64)  # [R]
    if lengths.size and (lengths.min() < 1 or lengths.max() > seq_len):
        raise ValueError(
            f"record lengths must be in 1..seq_len={seq_len}, got {lengths.min()}..{lengths.max()}"
        )
    rows: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free space of the open rows
    rows_by_space: dict[int, list[int]] = {}  # free space -> open rows with exactly that much
    for index in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[index])
        k = bisect_left(spaces, n)  # the tightest free space that holds n tokens
        if k < len(spaces):
            space = spaces[k]
            row = rows_by_space[space].pop()
            if not rows_by_space[space]:
                del rows_by_space[space], spaces[k]
            rows[row].append(index)
        else:
            space, row = seq_len, len(rows)
            rows.append([index])
        left = space - n
        if left > 0:
            if left not in rows_by_space:
                insort(spaces, left)
                rows_by_space[left] = []
            rows_by_space[left].append(row)
    return rows


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded by (seed, epoch) alone: an epoch's draws replay from those two ints."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class Rows:
    """Records of a `TokenCache` as rows of a batch: packed, or one record a row.

    Records without a supervised target (e.g. a prompt truncated before its completion) are
    left out. Packed rows (`pack`) are padded to `seq_len`, a fixed shape; unpacked rows to the
    longest row of their batch, which wastes less when records are much shorter than `seq_len`.

    Args:
        cache: The records, each at most `seq_len` tokens (`TokenCache.build(max_len=...)`).
        seq_len: Tokens per row, T.
        packing: Several records a row (position ids restart per record) or one a row.
        pad_id: The input id on padding (never a target).
        records: Record indices to take (a held-out split); None: every record.
    """

    def __init__(
        self,
        cache: TokenCache,
        seq_len: int,
        packing: bool = True,
        pad_id: int = 0,
        records: np.ndarray | None = None,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2")
        lengths = cache.lengths  # [R]
        if len(lengths) and lengths.max() > seq_len:
            raise ValueError(
                f"{cache.path} holds records of {lengths.max()} tokens, longer than "
                f"--seq-len {seq_len}: build the cache with max_len={seq_len}"
            )
        targets = cache.targets()  # [R]
        kept = np.flatnonzero(targets > 0)  # [R'] records with something to learn
        if records is not None:  # a subset (a held-out split)
            kept = np.intersect1d(kept, records)
        if len(kept) < len(cache):
            log.info("%d records have no supervised target: left out", len(cache) - len(kept))
        if packing:
            rows = [kept[row].tolist() for row in pack(lengths[kept], seq_len)]
        else:
            rows = [[index] for index in kept.tolist()]
        self.cache, self.seq_len, self.packing, self.pad_id = cache, seq_len, packing, pad_id
        self.rows: list[list[int]] = rows  # record indices per row
        self.row_lengths = np.array([lengths[row].sum() for row in rows], np.int64)  # [rows]
        self.row_targets = np.array([targets[row].sum() for row in rows], np.int64)  # [rows]

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int, seed: int) -> Tensor:
        """The rows of `epoch` in order: a permutation [len(self)] from (seed, epoch) alone, so a
        run resumes mid-epoch from (epoch, position)."""
        return torch.randperm(len(self), generator=epoch_generator(seed, epoch))

    def batch(self, indices: Sequence[int] | Tensor) -> Batch:
        """The rows `indices` as a `Batch` [B, T] (T = seq_len packed, else the longest row)."""
        indices = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        width = self.seq_len if self.packing else int(self.row_lengths[indices].max())
        shape = (len(indices), width)
        input_ids = np.full(shape, self.pad_id, np.int64)  # [B, T]
        targets = np.full(shape, IGNORE, np.int64)  # [B, T]
        position_ids = np.zeros(shape, np.int64)  # [B, T]
        attention_mask = np.zeros(shape, np.int64)  # [B, T]
        offsets, ids_all, mask_all = self.cache.offsets, self.cache.ids, self.cache.mask
        for b, row in enumerate(self.rows[i] for i in indices):
            at = 0
            for record in row:
                start, end = int(offsets[record]), int(offsets[record + 1])
                n = end - start
                ids = ids_all[start:end].astype(np.int64)  # [n]
                input_ids[b, at : at + n] = ids
                # position t predicts token t + 1 of the same record; the last predicts nothing
                targets[b, at : at + n - 1] = np.where(
                    mask_all[start + 1 : end] != 0, ids[1:], IGNORE
                )
                position_ids[b, at : at + n] = np.arange(n)
                at += n
            attention_mask[b, :at] = 1
            position_ids[b, at:] = np.arange(n, n + width - at)  # padding: the last record's tail
        return Batch(
            *(torch.from_numpy(t) for t in (input_ids, targets, position_ids, attention_mask))
        )


class Windows:
    """Random windows of `seq_len + 1` tokens over one long token stream (a text file).

    As the language model's `TokenData`: the stream splits 90/10 into train and val, window
    starts are drawn with `torch.randint` from the caller's generator; inputs are the first
    `seq_len` tokens of a window, targets the last `seq_len` (-100 where unsupervised).

    Args:
        ids: The token stream, int [L] (a memory map is read only where windows fall).
        seq_len: Tokens per row, T.
        mask: Supervised tokens, [L] (None: all).
        source: How error messages name the data.
    """

    def __init__(self, ids, seq_len: int, mask=None, source: str = "--data") -> None:
        ids = np.asarray(ids)
        split = int(0.9 * len(ids))
        self.seq_len = seq_len
        self.ids = {"train": ids[:split], "val": ids[split:]}  # [L_train], [L_val]
        self.mask = None if mask is None else {"train": mask[:split], "val": mask[split:]}
        for name, part in self.ids.items():
            if len(part) <= seq_len:
                raise ValueError(
                    f"{source} is too short: the {name} split has {len(part)} tokens, "
                    f"needs more than --seq-len {seq_len}"
                )

    @classmethod
    def from_cache(cls, cache: TokenCache, seq_len: int, source: str = "--data") -> Windows:
        """Windows over every token of `cache`, its records end to end (a text file: one)."""
        return cls(cache.ids, seq_len, cache.mask, source)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """`batch_size` random windows of the `split` ("train" or "val") as a `Batch` [B, T]."""
        ids, seq_len = self.ids[split], self.seq_len
        starts = torch.randint(len(ids) - seq_len, (batch_size,), generator=generator)  # [B]
        return self._windows(split, starts.numpy())

    def consecutive(self, split: str, batch_size: int) -> Iterator[Batch]:
        """Every token of `split` (but the first) once as a target: windows starting every
        `seq_len` tokens, then one ending at the split's end whose targets already seen are
        masked; `batch_size` windows to a Batch."""
        n, seq_len = len(self.ids[split]), self.seq_len
        starts = list(range(0, n - seq_len, seq_len))  # window s: targets s + 1 .. s + T
        covered = starts[-1] + seq_len  # the last target index they cover
        tail = None
        if covered < n - 1:
            starts.append(n - 1 - seq_len)
            tail = len(starts) - 1
        for first in range(0, len(starts), batch_size):
            chunk = np.asarray(starts[first : first + batch_size])  # [B]
            batch = self._windows(split, chunk)
            if tail is not None and first <= tail < first + len(chunk):
                seen = covered - chunk[tail - first]  # its first `seen` targets are covered
                batch.targets[tail - first, :seen] = IGNORE
            yield batch

    def _windows(self, split: str, starts: np.ndarray) -> Batch:
        """Windows at `starts` [B] of `split` as a `Batch` [B, T]."""
        ids, seq_len, batch_size = self.ids[split], self.seq_len, len(starts)
        where = starts[:, None] + np.arange(seq_len + 1)  # [B, T + 1]
        window = torch.from_numpy(ids[where].astype(np.int64))  # [B, T + 1]
        targets = window[:, 1:].clone()  # [B, T]
        if self.mask is not None:
            targets[torch.from_numpy(self.mask[split][where[:, 1:]] == 0)] = IGNORE
        position_ids = torch.arange(seq_len).expand(batch_size, seq_len).contiguous()  # [B, T]
        return Batch(window[:, :-1], targets, position_ids, torch.ones_like(targets))
