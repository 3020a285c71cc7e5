"""Supervised fine-tuning data: records on disk -> token ids + supervised mask -> a token cache.

file (.jsonl/.ndjson, .json, .parquet, a `datasets` directory; any other file is plain text)
-> records {"messages"} | {"prompt", "completion"} | {"text"} -> `encode_record` (chat template:
assistant tokens supervised; completion supervised; text all) -> `TokenCache` (moekit.train.data),
reused while the file, the tokenizer and the options are unchanged. Needs the tokenizer only, so
every data error is reported before a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .._extras import MissingExtraError
from ..train.data import TokenCache

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
RECORD_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_FORMAT_VERSION = 1  # bump when encoding changes: old caches then rebuild
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")  # not `add_generation_prompt`


# 1. reading records ------------------------------------------------------------------------


def _utf8(raw: bytes, name: str, first_line: int = 1) -> str:
    """`raw` decoded; a byte-order mark dropped where `raw` starts the file."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw[: err.start].count(b"\n")
        bad = raw[err.start : err.start + 1]
        raise ValueError(f"{name}: not UTF-8 text at line {line} (byte {bad!r})") from err


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: not a JSON object (got {type(value).__name__})")
    return value


def _parse(line: str, where: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg}, column {err.colno})") from err
    return _object(value, where)


def _jsonl(text: str, name: str) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{name} line {number}", _parse(line, f"{name} line {number}")


def _jsonl_file(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    """A JSONL file read line by line (never whole), each line decoded on its own."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            where = f"{name} line {number}"
            line = _utf8(raw, name, number)
            if line.strip():
                yield where, _parse(line, where)


def _json_file(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    """A JSON array of objects, one object, or JSONL content under a .json name."""
    text = _utf8(path.read_bytes(), name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values: JSON lines
            yield from _jsonl(text, name)
            return
        raise ValueError(f"{name} line {err.lineno}: not JSON ({err.msg})") from err
    if isinstance(value, dict):
        yield f"{name} record 1", value
        return
    if not isinstance(value, list):
        raise ValueError(f"{name}: not a JSON array of objects (got {type(value).__name__})")
    for number, item in enumerate(value, 1):
        yield f"{name} record {number}", _object(item, f"{name} record {number}")


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / marker).is_file() for marker in ("state.json", "dataset_dict.json")
    )


def _datasets(name: str):
    try:
        import datasets
    except ImportError as err:
        raise MissingExtraError(
            f"{name}: reading parquet or a `datasets` directory needs the datasets package, "
            "which is not installed: pip install datasets",
            name="datasets",
        ) from err
    return datasets


def _arrow_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet file (streamed in batches) or of a directory saved by `datasets`."""
    datasets = _datasets(name)
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data and len(data) != 1:
                raise ValueError(f"{name}: a DatasetDict with splits {list(data)} and no 'train'")
            data = data["train"] if "train" in data else next(iter(data.values()))
        rows = iter(data)
    else:
        import pyarrow.parquet as pq  # installed with datasets

        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
    for number, row in enumerate(rows, 1):
        yield f"{name} record {number}", _object(row, f"{name} record {number}")


def _located_records(path: Path, flag: str) -> Iterator[tuple[str, dict]]:
    """(where, record) per record; `where` names the flag, the file and the line or record."""
    name = f"{flag} {path}"
    if _is_datasets_dir(path):
        return _arrow_records(path, name)
    if not path.is_file():
        raise ValueError(f"{name}: no such file (or a directory not saved by `datasets`)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_file(path, name)
    if suffix == ".json":
        return _json_file(path, name)
    if suffix == ".parquet":
        return _arrow_records(path, name)
    raise ValueError(f"{name}: not a records file (expected one of {', '.join(RECORD_SUFFIXES)})")


def read_records(path: str | os.PathLike, flag: str = "--data") -> Iterator[dict]:
    """The records of a .jsonl/.ndjson, .json, .parquet file or a `datasets` directory.

    Raises:
        ValueError: One line naming `flag`, the file and the line or record: not UTF-8, not
            JSON, not an object.
        MissingExtraError: parquet or a datasets directory without `datasets` installed.
    """
    for _, record in _located_records(Path(path), flag):
        yield record


# 2. records -> ids + supervised mask ---------------------------------------------------------


def record_format(record: dict) -> str:
    """The record's format by its keys: "messages", "prompt_completion" or "text"."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise ValueError(
        'expected the key "messages", "text", or "prompt" and "completion", '
        f"got keys {sorted(record)}"
    )


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    """Token ids of `text`; `special` adds the tokenizer's own specials (e.g. a BOS)."""
    if hasattr(tokenizer, "apply_chat_template"):  # transformers
        return list(tokenizer.encode(text, add_special_tokens=special, verbose=False))
    return list(tokenizer.encode(text))  # a plain tokenizer: encode(str) -> ids


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids


def _check_messages(messages) -> list[dict]:
    """The turns with None-valued keys dropped (columnar sources fill absent keys with None)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    turns = []
    for number, turn in enumerate(messages, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {number}: not an object (got {type(turn).__name__})")
        turn = {key: value for key, value in turn.items() if value is not None}
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ValueError(f"turn {number}: unknown role {role!r}, expected one of {ROLES}")
        if role == "assistant" and not (isinstance(content, str) and content.strip()):
            got = "no content" if content is None else f"content {content!r}"
            raise ValueError(
                f"turn {number}: an assistant turn needs non-empty string content, got {got}"
            )
        if not isinstance(content, str):
            raise ValueError(f"turn {number} ({role}): content must be a string, got {content!r}")
        turns.append(turn)
    return turns


def _template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f'"messages" records need a tokenizer with a chat template, and {name} has none: '
            'use {"prompt", "completion"} or {"text"} records'
        )
    return template


def _render(tokenizer, messages: list[dict], generation_prompt: bool, **kwargs) -> dict:
    """The template's rendering of `messages` as {"input_ids": [n], ...}."""
    from jinja2 import TemplateError  # transformers renders templates with jinja2

    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt,
            **kwargs,
        )  # fmt: skip
    except TemplateError as err:  # also the template's own raise_exception(...)
        raise ValueError(
            f"the chat template fails on the first {len(messages)} turns: {err}"
        ) from err
    if out["input_ids"] and isinstance(out["input_ids"][0], list):  # a batch of one
        out = {key: value[0] for key, value in out.items()}
    return out


def _assistant_spans(tokenizer, turns: list[dict], full: list[int], tools) -> list[int]:
    """The mask of assistant tokens [n], found by rendering prefixes of the conversation: turn
    i's tokens are those between turns[:i] + the generation prompt and turns[:i + 1]."""
    mask = [0] * len(full)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = _render(tokenizer, turns[:i], True, tools=tools)["input_ids"]
        end = _render(tokenizer, turns[: i + 1], False, tools=tools)["input_ids"]
        if not (len(start) <= len(end) and end[: len(start)] == start and full[: len(end)] == end):
            raise ValueError(
                f"turn {i + 1} (assistant): the chat template renders the conversation so far "
                "differently once later turns follow (it rewrites earlier turns, as gpt-oss's "
                "Harmony template drops earlier reasoning), so the assistant tokens cannot be "
                "found by rendering prefixes: give the template {% generation %} blocks around "
                'assistant content, or use {"prompt", "completion"} records, or pass '
                "--train-on-prompt"
            )
        mask[len(start) : len(end)] = [1] * (len(end) - len(start))
    return mask


def _encode_messages(tokenizer, record: dict, train_on_prompt: bool) -> tuple[list, list]:
    turns = _check_messages(record["messages"])
    template = _template(tokenizer)
    tools = record.get("tools")
    if train_on_prompt:
        ids = _render(tokenizer, turns, False, tools=tools)["input_ids"]
        return ids, [1] * len(ids)
    if _GENERATION_TAG.search(template):
        out = _render(tokenizer, turns, False, tools=tools, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids = _render(tokenizer, turns, False, tools=tools)["input_ids"]
    return ids, _assistant_spans(tokenizer, turns, ids, tools)


def encode_record(
    tokenizer, record: dict, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids [n] of one record and its supervised mask [n] (1: the token's loss counts).

    text: the text's ids (+ EOS), all supervised. prompt/completion: prompt ids (with the
    tokenizer's own specials, e.g. BOS) then completion ids (+ EOS), tokenised separately,
    completion and EOS supervised. messages: the chat template's rendering; the assistant
    tokens supervised, by the template's {% generation %} blocks where it has them, else by
    rendering prefixes. `train_on_prompt` supervises every token.

    Raises:
        ValueError: An unknown format or role, an empty assistant turn, no chat template, or
            a template whose assistant tokens cannot be found (the message says what to do).
    """
    kind = record_format(record)
    if kind == "messages":
        return _encode_messages(tokenizer, record, train_on_prompt)
    if kind == "text":
        ids = _with_eos(tokenizer, _encode(tokenizer, _string(record, "text"), True))
        return ids, [1] * len(ids)
    prompt = _encode(tokenizer, _string(record, "prompt"), True)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and prompt[-1:] == [eos]:  # a tokenizer that appends EOS itself
        prompt = prompt[:-1]
    completion = _with_eos(tokenizer, _encode(tokenizer, _string(record, "completion"), False))
    mask = [int(train_on_prompt)] * len(prompt) + [1] * len(completion)
    return prompt + completion, mask


# 3. file -> token cache --------------------------------------------------------------------


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_identity(tokenizer) -> dict:
    """What decides the ids: name, vocabulary, specials, chat template (and, for a fast
    tokenizer, a digest of its whole definition: two tokenizers may share a name)."""
    template = getattr(tokenizer, "chat_template", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", None),
        "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "template": _digest(template) if template else None,
        "definition": _digest(backend.to_str()) if backend is not None else None,
    }


def _fingerprint(path: Path) -> list:
    """(name, size, mtime_ns) of the file, or of every file under a directory."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.relative_to(path)) if path.is_dir() else "", *_stat(p)) for p in files]


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


_TEXT_CHUNK = 1 << 20  # bytes of a text file tokenised at once (cut after a newline)


def _text_record(path: Path, tokenizer, flag: str):
    """A text file as one token stream, tokenised a ~1 MB piece at a time (cut after a
    newline): the pieces are records end to end, read as one document by `Windows`; memory
    stays that of a piece, never the whole file's ids as Python ints."""
    name, line, empty = f"{flag} {path}", 1, True
    with path.open("rb") as f:
        rest = b""
        while True:
            block = f.read(_TEXT_CHUNK)
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            piece, rest = (data[:cut], data[cut:]) if cut else (b"", data)
            if piece:
                text = _utf8(piece, name, line)
                line += text.count("\n")
                empty = empty and not text.strip()
                yield _encode(tokenizer, text, False), None  # every token supervised
            if not block:
                break
    if empty:
        raise ValueError(f"{name}: the text file is empty")


def _encoded(path: Path, tokenizer, train_on_prompt: bool, flag: str):
    for where, record in _located_records(path, flag):
        try:
            yield encode_record(tokenizer, record, train_on_prompt)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err


def tokenize_file(
    path: str | os.PathLike,
    tokenizer,
    cache_dir: str | os.PathLike,
    seq_len: int,
    train_on_prompt: bool = False,
    flag: str = "--data",
) -> TokenCache:
    """The token cache of a data file, built once and reused while nothing changes.

    A records file (.jsonl/.ndjson, .json, .parquet, a `datasets` directory) gives one record
    per object, truncated to `seq_len` tokens; any other file is plain text: one document,
    every token supervised, never truncated (windows are drawn from it). The cache lives in
    `cache_dir`, under a name from the path, the tokenizer and the options; its key adds the
    file's size and mtime, so an edited file rebuilds in place.

    Args:
        path: The data file or directory.
        tokenizer: A transformers tokenizer, or any object with `encode(str) -> list[int]`.
        cache_dir: Where caches are kept.
        seq_len: Tokens per row: longer records are truncated.
        train_on_prompt: Supervise every token of a record, not only the answer.
        flag: The command-line flag that named `path`, for error messages.

    Returns:
        The opened cache; `cache.truncated` counts truncated records.

    Raises:
        ValueError: One line naming `flag`, the file and the record (see `read_records`,
            `encode_record`), or nothing left to learn after truncation (names --seq-len).
    """
    path = Path(path)
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} must be >= 2")
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file")
    if path.is_dir() and not _is_datasets_dir(path):
        raise ValueError(f"{flag} {path}: a directory, but not one saved by `datasets`")
    text = not _is_datasets_dir(path) and path.suffix.lower() not in RECORD_SUFFIXES
    where = {
        "source": str(path.resolve()),
        "tokenizer": _tokenizer_identity(tokenizer),
        "format": _FORMAT_VERSION,
        "options": None if text else {"seq_len": seq_len, "train_on_prompt": train_on_prompt},
    }
    key = json.dumps({**where, "files": _fingerprint(path)}, sort_keys=True)
    cache_path = Path(cache_dir) / f"{path.stem}-{_digest(where)}"
    cache = TokenCache.open(cache_path, key)
    if cache is not None:
        log.info("%s %s: reusing the token cache %s", flag, path, cache_path)
        return cache
    if text:
        records = _text_record(path, tokenizer, flag)
    else:
        records = _encoded(path, tokenizer, train_on_prompt, flag)
    max_len = None if text else seq_len
    return TokenCache.build(cache_path, records, key, max_len=max_len, source=f"{flag} {path}")
