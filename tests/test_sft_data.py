"""The SFT data layer: records -> ids + supervised mask -> token cache -> packed rows -> batches.

Oracles: transformers' own `return_assistant_tokens_mask` on a template with {% generation %}
blocks (the prefix-rendering mask of the same template without them must equal it), a
hand-worked packing, and "every supervised token is a target exactly once per epoch" over
records whose every token id is unique. Tokenizers are built offline (byte-level BPE).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from moekit.train import data as tdata
from moekit.train.data import IGNORE, Batch, Rows, TokenCache, Windows, pack

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from moekit._extras import MissingExtraError  # noqa: E402
from moekit.hf import data as hdata  # noqa: E402
from moekit.hf.data import encode_record, read_records, record_format, tokenize_file  # noqa: E402

SPECIALS = ["<|im_start|>", "<|im_end|>", "<eos>", "<pad>"]

# ChatML; the assistant turn is `{ASSISTANT}`, so the two versions render the same text
_CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}{ASSISTANT}"
    "{%- else -%}{{- m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_TURN = "{{- m['content'] + '<|im_end|>\\n' -}}"
PLAIN = _CHATML.replace("{ASSISTANT}", _TURN)
GENERATION = _CHATML.replace("{ASSISTANT}", "{%- generation -%}" + _TURN + "{%- endgeneration -%}")
# as gpt-oss's Harmony: an assistant turn followed by more turns loses its content
REWRITING = _CHATML.replace(
    "{ASSISTANT}",
    "{%- if loop.last -%}" + _TURN + "{%- else -%}{{- '...<|im_end|>\\n' -}}{%- endif -%}",
)

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "and the weather?"},
        {"role": "assistant", "content": "sunny, 20 degrees"},
    ],
    [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "calling add"},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "it is 5"},
        {"role": "user", "content": "thanks"},  # ends on a user turn: nothing after is learnt
    ],
]


def _backend():
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(["hello there user assistant system how are you fine"], trainer)
    return tok


def make_tokenizer(template: str | None = PLAIN):
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_backend(), eos_token="<eos>", pad_token="<pad>"
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def plain():
    return make_tokenizer(PLAIN)


@pytest.fixture(scope="module")
def generation():
    return make_tokenizer(GENERATION)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# records -> ids + mask ------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_encode_generation_blocks_match_transformers(generation, messages):
    ids, mask = encode_record(generation, {"messages": messages})
    out = generation.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(out["input_ids"])
    assert mask == list(out["assistant_masks"])
    learnt = generation.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert learnt == "".join(
        m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_encode_prefix_spans_equal_generation_mask(plain, generation, messages):
    assert plain.apply_chat_template(messages, tokenize=False) == generation.apply_chat_template(
        messages, tokenize=False
    )
    assert encode_record(plain, {"messages": messages}) == encode_record(
        generation, {"messages": messages}
    )


@pytest.mark.parametrize(
    "template", [PLAIN, GENERATION, REWRITING], ids=["plain", "generation", "rewriting"]
)
def test_encode_train_on_prompt_supervises_every_token(template):
    ids, mask = encode_record(make_tokenizer(template), {"messages": CONVERSATIONS[1]}, True)
    assert len(ids) == len(mask) > 0 and all(mask)


def test_encode_rewriting_template_names_the_ways_out():
    tok = make_tokenizer(REWRITING)
    with pytest.raises(ValueError, match="turn 3 .*generation.*prompt.*--train-on-prompt") as err:
        encode_record(tok, {"messages": CONVERSATIONS[1]})
    assert "\n" not in str(err.value)
    encode_record(tok, {"messages": CONVERSATIONS[0]})  # one assistant turn: nothing rewritten


def test_encode_template_exception_is_a_value_error():
    tok = make_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template fails.*roles must alternate"):
        encode_record(tok, {"messages": CONVERSATIONS[0]})


def test_encode_prompt_completion(plain):
    ids, mask = encode_record(plain, {"prompt": "how are you?", "completion": " fine"})
    prompt = plain.encode("how are you?", add_special_tokens=False)
    completion = plain.encode(" fine", add_special_tokens=False)
    assert ids == prompt + completion + [plain.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(completion) + 1)
    _, mask = encode_record(plain, {"prompt": "how", "completion": " fine"}, train_on_prompt=True)
    assert all(mask)


def test_encode_text(plain):
    ids, mask = encode_record(plain, {"text": "hello there"})
    assert ids == plain.encode("hello there", add_special_tokens=False) + [plain.eos_token_id]
    assert all(mask)


def test_record_format():
    assert record_format({"messages": []}) == "messages"
    assert record_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert record_format({"text": "a", "id": 3}) == "text"
    with pytest.raises(ValueError, match='"messages", "text", or "prompt" and "completion"'):
        record_format({"prompt": "only"})


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())


@pytest.mark.parametrize("tokenizer", [make_tokenizer(None), ByteTokenizer()], ids=["hf", "bytes"])
def test_encode_messages_without_chat_template(tokenizer):
    with pytest.raises(ValueError, match="chat template.*prompt.*completion"):
        encode_record(tokenizer, {"messages": CONVERSATIONS[0]})
    ids, mask = encode_record(tokenizer, {"prompt": "ab", "completion": "c"})
    assert len(ids) == len(mask)


# bad input: one line naming the flag, the file and the line or record --------------------------

BAD_RECORDS = [
    ({"question": "a", "answer": "b"}, 'line 2: expected the key "messages"'),
    ({"messages": [{"role": "robot", "content": "x"}]}, "line 2: turn 1: unknown role 'robot'"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
        "line 2: turn 2: an assistant turn needs non-empty",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
        "line 2: turn 2: an assistant turn .* no content",
    ),
    ({"messages": []}, 'line 2: "messages" must be a non-empty list'),
    ({"prompt": 3, "completion": "b"}, 'line 2: "prompt" must be a string'),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_tokenize_bad_record(tmp_path, plain, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(ValueError, match=f"^--eval-data {path} {message}") as err:
        tokenize_file(path, plain, tmp_path / "cache", 64, flag="--eval-data")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").iterdir())  # no cache, no temporary left


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', ": not UTF-8 text at line 2"),
        ("d.jsonl", b'{"text": "a"}\n\n{"text": \n', " line 3: not JSON"),
        ("d.ndjson", b'{"text": "a"}\n[1]\n', " line 2: not a JSON object"),
        ("d.json", b'[{"text": "a"}, 3]', " record 2: not a JSON object"),
        ("d.json", b'[{"text": "a"},', " line 1: not JSON"),
        ("d.json", b'{"text": "a"}\n{"text": "\xff"}', ": not UTF-8 text at line 2"),
        ("d.json", b'"just a string"', ": not a JSON array of objects"),
        ("d.txt", b"caf\xe9\nau lait", ": not UTF-8 text at line 1 \\(byte b'\\\\xe9'\\)"),
    ],
)
def test_read_bad_files(tmp_path, plain, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^--data {path}{message}"):
        tokenize_file(path, plain, tmp_path / "cache", 64)


def test_read_json_as_records_never_text(tmp_path):
    records = [{"text": "a"}, {"prompt": "b", "completion": "c"}]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records))
    lines = write_jsonl(tmp_path / "lines.json", records)
    single = tmp_path / "single.json"
    single.write_text(json.dumps(records[0]))
    assert list(read_records(array)) == list(read_records(lines)) == records
    assert list(read_records(single)) == records[:1]
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(ValueError, match="not a records file"):
        list(read_records(tmp_path / "notes.txt"))


def test_read_parquet_and_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[1]}]
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict"))
    for source in ("d.parquet", "saved", "dict"):
        assert list(read_records(tmp_path / source)) == records, source


def test_read_parquet_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ModuleNotFoundError
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingExtraError, match="pip install datasets"):
        list(read_records(tmp_path / "d.parquet"))


def test_tokenize_directory_not_saved_by_datasets(tmp_path, plain):
    with pytest.raises(ValueError, match="not one saved by `datasets`"):
        tokenize_file(tmp_path, plain, tmp_path / "cache", 64)


# the token cache ----------------------------------------------------------------------------


def test_cache_build_open_and_chunked_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tdata, "_CHUNK", 3)  # several flushes for 6 records
    records = [(list(range(10 * r, 10 * r + r + 1)), [r % 2] * (r + 1)) for r in range(6)]
    cache = TokenCache.build(tmp_path / "c", iter(records), key="k")
    again = TokenCache.open(tmp_path / "c", "k")
    assert TokenCache.open(tmp_path / "c", "other") is None
    assert TokenCache.open(tmp_path / "missing", "k") is None
    assert len(again) == len(cache) == 6 and again.num_tokens == 21
    np.testing.assert_array_equal(again.lengths, np.arange(1, 7))
    for r, (ids, mask) in enumerate(records):
        got_ids, got_mask = again.record(r)
        assert got_ids.dtype == torch.int64 and got_mask.dtype == torch.bool
        assert got_ids.tolist() == ids and got_mask.tolist() == [bool(m) for m in mask]
    np.testing.assert_array_equal(again.targets(), [0, 1, 0, 3, 0, 5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_cache_killed_build_leaves_nothing(tmp_path):
    def records():
        yield [1, 2, 3], None
        raise KeyboardInterrupt  # killed mid-iteration

    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(tmp_path / "c", records(), key="k")
    assert not list(tmp_path.iterdir())


def test_cache_truncation_counted_and_nothing_left_names_seq_len(tmp_path):
    records = [([1] * 10, [0] * 6 + [1] * 4), ([2] * 3, [0, 1, 1]), ([3] * 8, None)]
    cache = TokenCache.build(tmp_path / "c", records, key="k", max_len=5)
    assert cache.truncated == cache.meta["truncated"] == 2
    np.testing.assert_array_equal(cache.lengths, [5, 3, 5])
    np.testing.assert_array_equal(cache.targets(), [0, 2, 4])
    with pytest.raises(ValueError, match=r"^--data d.jsonl: after truncating 2 of 2 .*--seq-len 5"):
        TokenCache.build(tmp_path / "d", records[:1] * 2, "k", max_len=5, source="--data d.jsonl")
    assert not (tmp_path / "d").exists()


def test_tokenize_file_reuses_and_rebuilds(tmp_path, plain, monkeypatch):
    calls = []
    encode = hdata.encode_record
    monkeypatch.setattr(hdata, "encode_record", lambda *a: calls.append(1) or encode(*a))
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CONVERSATIONS])
    cache = tokenize_file(path, plain, tmp_path / "cache", 64)
    assert (len(cache), len(calls)) == (3, 3)
    again = tokenize_file(path, plain, tmp_path / "cache", 64)
    assert len(calls) == 3 and again.path == cache.path  # reopened, not retokenised
    for options in [(64, True), (16, False)]:  # a changed option: another cache
        tokenize_file(path, plain, tmp_path / "cache", *options)
    assert len(calls) == 9
    write_jsonl(path, [{"messages": c} for c in CONVERSATIONS[:2]])  # an edited file
    assert len(tokenize_file(path, plain, tmp_path / "cache", 64)) == 2
    assert len(calls) == 11
    assert len(list((tmp_path / "cache").iterdir())) == 3  # rebuilt in place


def test_tokenize_file_truncation_and_nothing_left(tmp_path, plain):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello there " * 4, "completion": "fine"}])
    with pytest.raises(ValueError, match=f"^--data {path}: after truncating 1 of 1.*--seq-len 8"):
        tokenize_file(path, plain, tmp_path / "cache", 8)
    cache = tokenize_file(path, plain, tmp_path / "cache", 64)
    assert cache.truncated == 0 and cache.targets().sum() > 0


@pytest.mark.parametrize("packing", [True, False])
def test_tokenize_file_to_rows_learns_the_answers(tmp_path, plain, packing):
    records = [{"messages": c} for c in CONVERSATIONS]
    records += [{"prompt": "how are you?", "completion": " fine"}, {"text": "hello there"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cache = tokenize_file(path, plain, tmp_path / "cache", 256)
    assert cache.truncated == 0
    rows = Rows(cache, 256, packing)
    batch = rows.batch(range(len(rows)))
    learnt = sorted(batch.targets[batch.targets != IGNORE].tolist())
    expected = []
    for record in records:
        ids, mask = encode_record(plain, record)
        expected += [i for i, m in zip(ids[1:], mask[1:], strict=True) if m]
    assert learnt == sorted(expected)


def test_tokenize_text_file_is_one_document(tmp_path, plain):
    path = tmp_path / "corpus.txt"
    path.write_text("hello there how are you fine " * 20)
    cache = tokenize_file(path, plain, tmp_path / "cache", 8)
    ids, mask = cache.record(0)
    assert len(cache) == 1 and cache.truncated == 0 and bool(mask.all())
    assert ids.tolist() == plain.encode(path.read_text(), add_special_tokens=False)
    assert tokenize_file(path, plain, tmp_path / "cache", 32).path == cache.path  # any seq_len
    batch = Windows.from_cache(cache, 8).batch("train", 4, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (4, 8) and batch.num_targets() == 32


# packing, rows and batches ------------------------------------------------------------------


def test_pack_hand_worked():
    # best-fit decreasing into rows of 8: 6 -> row 0 (2 left), 5 -> row 1 (3 left),
    # 4 -> row 2 (4 left), 3 -> row 1 (tightest fit, full), 2 -> row 0 (full)
    assert pack(np.array([5, 3, 4, 2, 6]), 8) == [[4, 3], [0, 1], [2]]
    assert pack(np.array([], np.int64), 8) == []
    with pytest.raises(ValueError, match="seq_len=8"):
        pack(np.array([9]), 8)


@pytest.mark.parametrize("seed", range(5))
def test_pack_properties(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 33, size=200)
    rows = pack(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(lengths[row].sum() <= 32 for row in rows)
    assert rows == pack(lengths, 32)  # deterministic
    assert len(rows) <= int(np.ceil(lengths.sum() / 32 * 11 / 9)) + 1


def test_rows_batch_hand_worked(tmp_path):
    # record 0: ids 10 11 12, supervised 11 12; record 1: ids 20 21, supervised 21
    records = [([10, 11, 12], [0, 1, 1]), ([20, 21], [0, 1]), ([30, 31, 32, 33, 34, 35], [0] * 6)]
    cache = TokenCache.build(tmp_path / "c", records, key="k")
    rows = Rows(cache, seq_len=6)
    assert rows.rows == [[0, 1]]  # record 2 has no target: left out
    batch = rows.batch([0])
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 0]]
    assert batch.targets.tolist() == [[11, 12, IGNORE, 21, IGNORE, IGNORE]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]  # padding continues record 1
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    assert (batch.num_targets(), batch.num_tokens()) == (3, 5)
    unpacked = Rows(cache, seq_len=6, packing=False).batch([1, 0])  # the longest row: T = 3
    assert unpacked.input_ids.tolist() == [[20, 21, 0], [10, 11, 12]]
    assert unpacked.targets.tolist() == [[21, IGNORE, IGNORE], [11, 12, IGNORE]]
    assert unpacked.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert unpacked.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("packing", [True, False])
def test_rows_every_supervised_token_once_per_epoch(tmp_path, packing):
    rng = np.random.default_rng(0)
    records, supervised = [], []
    for r in range(60):
        n = int(rng.integers(1, 40))
        ids = [1000 * r + t for t in range(n)]  # every token id unique
        mask = (rng.random(n) < 0.6).astype(int).tolist()
        records.append((ids, mask))
        supervised += [i for i, m in zip(ids[1:], mask[1:], strict=True) if m]
    cache = TokenCache.build(tmp_path / "c", records, key="k", max_len=24)
    supervised = [i for i in supervised if i % 1000 < 24]  # truncated tokens are gone
    rows = Rows(cache, seq_len=24, packing=packing)
    order = rows.order(epoch=0, seed=1)
    seen = []
    for first in range(0, len(rows), 7):
        batch = rows.batch(order[first : first + 7])
        assert batch.input_ids.shape[1] <= 24 and isinstance(batch, Batch)
        targets = batch.targets[batch.targets != IGNORE]
        seen += targets.tolist()
        real = batch.attention_mask.bool()
        assert not (batch.targets[~real] != IGNORE).any()  # no target on padding
        starts = (batch.position_ids == 0) & real  # a document starts: its id is never a target
        assert not torch.isin(batch.input_ids[starts], targets).any()
    assert sorted(seen) == sorted(supervised)


def test_rows_order_reproducible_per_epoch(tmp_path):
    cache = TokenCache.build(tmp_path / "c", [([1, 2], None)] * 50, key="k")
    rows = Rows(cache, seq_len=2)
    first = rows.order(epoch=3, seed=7)
    assert torch.equal(first, rows.order(epoch=3, seed=7))
    assert sorted(first.tolist()) == list(range(50))
    assert not torch.equal(first, rows.order(epoch=4, seed=7))
    assert not torch.equal(first, rows.order(epoch=3, seed=8))


def test_rows_rejects_records_longer_than_seq_len(tmp_path):
    cache = TokenCache.build(tmp_path / "c", [([1] * 9, None)], key="k")
    with pytest.raises(ValueError, match="--seq-len 8"):
        Rows(cache, seq_len=8)


def test_windows_shifted_targets_and_split():
    ids = torch.arange(100)
    mask = torch.ones(100, dtype=torch.bool)
    mask[50] = False
    windows = Windows(ids.numpy(), 8, mask.numpy())
    batch = windows.batch("train", 16, torch.Generator().manual_seed(0))
    again = windows.batch("train", 16, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batch, again, strict=True))
    expected = torch.where(batch.input_ids + 1 == 50, IGNORE, batch.input_ids + 1)
    assert torch.equal(batch.targets, expected)
    assert batch.position_ids.tolist() == [list(range(8))] * 16
    assert int(windows.batch("val", 4, torch.Generator()).input_ids.min()) >= 90
    with pytest.raises(ValueError, match="val split has 10 tokens.*--seq-len 10"):
        Windows(ids.numpy(), 10)


@pytest.mark.parametrize("n", [18, 161, 177, 200])
def test_consecutive_windows_make_every_token_a_target_once(n):
    """An --eval-data text file is evaluated whole: every token but the first is a target of
    exactly one window (the tail window masks what the regular ones covered)."""
    windows = Windows(np.arange(400), 16)
    windows.ids["val"], windows.mask = np.arange(n), None
    seen = []
    for batch in windows.consecutive("val", 3):
        assert batch.input_ids.shape[1] == 16
        seen += batch.targets[batch.targets != IGNORE].tolist()
    assert sorted(seen) == list(range(1, n))
