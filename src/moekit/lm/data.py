"""Text, tokenizers and batches for the language model.

text file (or the cached tinyshakespeare) -> tokenizer (characters, as makeMoE, or byte-level
BPE) -> ids [L] -> 90/10 train/val split -> random windows x, y [B, T] drawn from a
`torch.Generator` the trainer checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._extras import require

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def cache_dir() -> Path:
    """Where downloads are kept: $MOEKIT_CACHE, else ~/.cache/moekit."""
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tinyshakespeare(directory: Path | None = None) -> Path:
    """The tinyshakespeare corpus: downloaded once, verified by sha256, then read from the cache.

    Raises:
        RuntimeError: Offline with no cached copy, or the download does not match its hash;
            the message says to pass `--data PATH`.
    """
    path = (directory or cache_dir()) / "tinyshakespeare.txt"
    if path.exists() and _sha256(path.read_bytes()) == TINYSHAKESPEARE_SHA256:
        return path
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"cannot download tinyshakespeare from {TINYSHAKESPEARE_URL} ({err}) and no verified "
            f"copy is cached at {path}; pass --data PATH to a local UTF-8 text file"
        ) from err
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        raise RuntimeError(
            f"the download from {TINYSHAKESPEARE_URL} does not match sha256 "
            f"{TINYSHAKESPEARE_SHA256}; pass --data PATH to a local UTF-8 text file"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def load_text(path: str | os.PathLike | None) -> str:
    """The training text: the UTF-8 file at `path`, or tinyshakespeare when None.

    Raises:
        ValueError: The file is missing, unreadable, not UTF-8 or empty (names `--data`).
    """
    source = tinyshakespeare() if path is None else Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ValueError(f"--data {source}: no such file") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {source}: not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise ValueError(f"--data {source}: cannot read ({err})") from err
    if len(text) < 2:
        raise ValueError(f"--data {source}: needs at least 2 characters, got {len(text)}")
    return text


class CharTokenizer:
    """makeMoE's character tokenizer: ids are positions in the sorted set of characters."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the tokenizer's vocabulary"
            ) from err

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def _tokenizers():
    """The `tokenizers` library (its submodules models, trainers, ... come with it)."""
    return require("tokenizers", "train", "The BPE tokenizer (--tokenizer bpe)")


class BPETokenizer:
    """Byte-level BPE trained on the corpus with the `tokenizers` library (offline)."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> BPETokenizer:
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([text], trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, data: str) -> BPETokenizer:
        return cls(_tokenizers().Tokenizer.from_str(data))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self._tok.to_str()}


Tokenizer = CharTokenizer | BPETokenizer


def build_tokenizer(kind: str, text: str, vocab_size: int = 512) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"tokenizer={kind!r} must be 'char' or 'bpe'")


def tokenizer_from_dict(data: dict) -> Tokenizer:
    if data.get("kind") == "char":
        return CharTokenizer(data["chars"])
    if data.get("kind") == "bpe":
        return BPETokenizer.from_json(data["json"])
    raise ValueError(f"unknown tokenizer kind {data.get('kind')!r}")


@dataclass
class TokenData:
    """Token ids split 90/10 into train and val (makeMoE), sampled as random windows."""

    train: Tensor  # [L_train] int64
    val: Tensor  # [L_val] int64

    @classmethod
    def from_ids(cls, ids: list[int], block_size: int) -> TokenData:
        data = torch.tensor(ids, dtype=torch.long)
        n = int(0.9 * len(data))
        split = cls(data[:n], data[n:])
        for name, part in (("train", split.train), ("val", split.val)):
            if len(part) <= block_size:
                raise ValueError(
                    f"--data is too short: the {name} split has {len(part)} tokens, "
                    f"needs more than block_size={block_size}"
                )
        return split

    def batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random windows: x [B, T] and the next tokens y [B, T]."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        offsets = torch.arange(block_size)
        x = data[starts[:, None] + offsets]  # [B, T]
        y = data[starts[:, None] + offsets + 1]  # [B, T]
        return x, y

    def eval_chunks(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        iters: int,
        generator: torch.Generator,
        chunk: int = 8,
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """makeMoE's `iters` evaluation batches, `chunk` per forward: yields (n, x [n*B, T],
        y [n*B, T]). The batches are equal-sized, so a chunk's mean loss is the mean of its n
        batches' (one forward of 128 windows ran 1.7x faster per batch than 16 at a time)."""
        for first in range(0, iters, chunk):
            n = min(chunk, iters - first)
            pairs = [self.batch(split, batch_size, block_size, generator) for _ in range(n)]
            xs, ys = zip(*pairs, strict=True)
            yield n, torch.cat(xs), torch.cat(ys)
