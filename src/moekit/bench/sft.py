"""The "SFT" table: tokens/s of chat fine-tuning on short records, moekit against TRL.

    bench_sft(rounds, records, seq_len, ...) -> list[SFTResult]
        "moekit packed"   `FinetuneJob(packing=True)`: `rows` rows of `seq_len`, records packed
                          best-fit, position ids restarting per record, no attention mask
        "moekit padded"   `FinetuneJob(packing=False)`: one record a row, padded to the longest
                          of the batch; as many records a step as make ~`rows * seq_len` tokens
        "TRL packed"      TRL's `SFTTrainer(packing=True)` (best-fit decreasing, padding-free:
                          the `rows` packed rows flattened into one sequence)
    format_sft_table(results) -> str

The same tiny Qwen3-MoE (`SIZES`, the vocabulary of a byte-level BPE tokenizer trained here
with a ChatML template) on `experts_implementation="moekit"` (moekit's job also patches the
model: `hf.load.load_model`), LoRA of rank 16, alpha 32 on the experts (PEFT
`target_parameters`), AdamW at a constant learning rate, float32, the loss on the assistant
turns, the family's auxiliary loss at the same coefficient, no activation checkpointing.
Everything in a temporary directory, no network. Interleaved in one run: after a warm-up step
of each case, every round runs `steps` moekit packed steps, `steps` padded ones and `steps`
TRL steps (TRL's loop drives: a `TrainerCallback` runs moekit's steps before a round's first
TRL step and times each TRL step from on_step_begin to on_step_end; its setup and data
loading are outside). tokens/s: the real (non-padding) tokens of the mean step over the median
step's seconds (robust to a shared machine's slow phases); also over all timed steps' seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from .hf_backends import SIZES

CASES = ("moekit packed", "moekit padded", "TRL packed")
AUX_COEF = 0.001  # Qwen3-MoE's router_aux_loss_coef, given to both trainers
LR = 1e-4
_SPECIALS = ["<|im_start|>", "<|im_end|>", "<eos>", "<pad>"]
_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}{%- generation -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TEXT = (  # the words of the records, and what the tokenizer is trained on
    "the king and queen of england went to war with france over a cup of tea while the "
    "people of london sang songs about the weather and the price of bread"
)


class SFTResult(NamedTuple):
    case: str  # one of CASES
    rows: int  # rows a step (TRL: 1, its packed rows flattened)
    width: int  # tokens a row, the median over the timed steps
    real_tokens: float  # non-padding tokens a step, the mean
    padding: float  # the share of the computed positions that are padding
    step_ms: float  # median
    tokens_per_s: float  # mean real tokens a step / the median step (robust to slow phases)
    total_tokens_per_s: float  # real tokens of all timed steps / all their seconds


class _Step(NamedTuple):
    seconds: float
    real: int  # non-padding tokens
    rows: int
    width: int


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """`n` one-turn chat records: a question of 12-34 words, an answer of 45-140 (~40 and ~150
    tokens of `chat_tokenizer`'s, ~200 with the template's)."""
    rng, vocabulary = random.Random(seed), TEXT.split()

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(low, high)))

    return [
        {
            "messages": [
                {"role": "user", "content": words(12, 34)},
                {"role": "assistant", "content": words(45, 140)},
            ]
        }
        for _ in range(n)
    ]


def chat_tokenizer():
    """A byte-level BPE of 320 ids trained on `TEXT`, with a ChatML template whose assistant
    turns are {% generation %} blocks (the supervised tokens, for both trainers)."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = _TEMPLATE
    return fast


def _write_setup(root: Path, records: int) -> tuple[Path, Path, list[dict]]:
    """(model directory with its tokenizer, chat JSONL, the records) under `root`."""
    from ..hf.catalog import tiny_model

    tok = chat_tokenizer()
    model_dir = root / "qwen3_moe-chat"
    model = tiny_model("qwen3_moe", **{**SIZES, "vocab_size": len(tok)})
    for config in (model.config, model.generation_config):  # as a released model's agree
        config.bos_token_id, config.eos_token_id = None, tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    chats = chat_records(records)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chats))
    return model_dir, data, chats


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The setup's log lines (moekit's engine and LoRA notes, transformers', TRL's, PEFT's) and
    warnings and the datasets progress bars left out of the benchmark's output."""
    loggers = [logging.getLogger(n) for n in ("moekit", "transformers", "trl", "peft")]
    levels = [logger.level for logger in loggers]
    libraries = [n for n in ("datasets", "transformers") if importlib.util.find_spec(n)]
    bars = [importlib.import_module(f"{n}.utils.logging") for n in libraries]
    shown = [bar.is_progress_bar_enabled() for bar in bars]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    for bar in bars:
        bar.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for bar, on in zip(bars, shown, strict=True):
            if on:
                bar.enable_progress_bar()


class _MoekitCase:
    """One `FinetuneJob` on the shared loop; `step()` runs and times one optimizer step."""

    def __init__(self, model_dir: Path, data: Path, out: Path, **fields) -> None:
        from ..hf.finetune import FinetuneJob
        from ..train.finetune_config import FinetuneConfig
        from ..train.loop import Loop

        job = FinetuneJob(
            FinetuneConfig(
                model=str(model_dir),
                data=str(data),
                out=str(out),
                lr=LR,
                aux_loss_coef=AUX_COEF,
                device="cpu",
                track=False,
                progress=False,
                **fields,
            )
        )
        self.job, self.loop = job, Loop(job)
        draw = job.micro_batches
        self._drawn: list = []

        def micro_batches(k: int):  # the loop's draw, its batches kept for counting
            micros, targets = draw(k)
            self._drawn = micros
            return micros, targets

        job.micro_batches = micro_batches

    def mean_record_tokens(self) -> float:
        """Tokens of the mean training record."""
        source = self.job.train_source
        return float(source.row_lengths.sum() / sum(len(row) for row in source.rows))

    def step(self) -> _Step:
        tic = time.perf_counter()
        self.loop.train_step()
        seconds = time.perf_counter() - tic
        real = sum(m.num_tokens() for m in self._drawn)
        rows = sum(m.input_ids.shape[0] for m in self._drawn)
        return _Step(seconds, real, rows, int(self._drawn[0].input_ids.shape[1]))


def _trl_trainer(model_dir: Path, chats: list[dict], out: Path, callback, **sizes):
    """TRL's `SFTTrainer` on the backend, LoRA on the experts, set up as moekit's job (module
    doc); sizes: seq_len, rows, rank, max_steps."""
    import datasets
    import peft
    import transformers
    import trl

    from .. import hf  # noqa: F401  (registers experts_implementation="moekit")
    from ..hf.lora import lora_targets

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, experts_implementation="moekit", dtype=torch.float32
    )
    parameters, _ = lora_targets(model, ("experts",))
    rank = sizes["rank"]
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=sizes["max_steps"],
        per_device_train_batch_size=sizes["rows"],
        max_length=sizes["seq_len"],
        packing=True,  # best-fit decreasing, with which TRL is padding-free
        padding_free=True,
        assistant_only_loss=True,
        gradient_checkpointing=False,  # TRL's default is on; moekit's job runs without
        bf16=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,  # moekit finetune's grad_clip
        router_aux_loss_coef=AUX_COEF,
        include_num_input_tokens_seen="non_padding",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(chats),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=parameters),
        callbacks=[callback],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-training line
    return trainer


def _rounds_callback(between: Callable[[int], None], warmup: int, steps: int):
    """A `TrainerCallback` that calls `between(-1)` before TRL's first step (the others'
    warm-up), `between(r)` before the first TRL step of round r, and times every TRL step
    after the warm-up (`.steps`)."""
    from transformers import TrainerCallback

    class Rounds(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[_Step] = []

        def on_step_begin(self, args, state, control, **kwargs):
            done = state.global_step
            if done == 0:
                between(-1)
            if done >= warmup and (done - warmup) % steps == 0:
                between((done - warmup) // steps)
            self._seen, self._tic = state.num_input_tokens_seen, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self._tic
            if state.global_step > warmup:  # padding-free: one row of real tokens only
                real = state.num_input_tokens_seen - self._seen
                self.steps.append(_Step(seconds, real, 1, real))

    return Rounds()


def _result(case: str, steps: list[_Step]) -> SFTResult:
    seconds, real = sum(s.seconds for s in steps), sum(s.real for s in steps)
    computed = sum(s.rows * s.width for s in steps)
    median = statistics.median(s.seconds for s in steps)
    return SFTResult(
        case,
        round(statistics.median(s.rows for s in steps)),
        round(statistics.median(s.width for s in steps)),
        real / len(steps),
        1.0 - real / computed,
        median * 1e3,
        real / len(steps) / median,
        real / seconds,
    )


def bench_sft(
    rounds: int = 3,
    records: int = 400,
    seq_len: int = 2048,
    rows: int = 4,
    steps: int = 2,
    warmup: int = 1,
    rank: int = 16,
    trl: bool | None = None,
) -> list[SFTResult]:
    """tokens/s of moekit packed, moekit padded and TRL packed (module doc), interleaved.

    Args:
        rounds: Timing rounds; each runs `steps` optimizer steps of every case in turn.
        records: Chat records generated (`chat_records`), ~200 tokens each.
        seq_len: Tokens a packed row (moekit and TRL), and the longest record.
        rows: Packed rows a step; the padded case takes as many records as hold about
            `rows * seq_len` tokens.
        warmup: Untimed steps of each case before the first round.
        rank: LoRA rank on the experts (alpha twice it).
        trl: Time TRL's `SFTTrainer`; None: when it is installed.

    Returns:
        One `SFTResult` per case, in `CASES` order (without TRL: the two moekit rows).
    """
    use_trl = trl_available() if trl is None else trl
    timed: dict[str, list[_Step]] = {c: [] for c in CASES if use_trl or not c.startswith("TRL")}
    with tempfile.TemporaryDirectory(prefix="moekit-sft-") as tmp, _quiet():
        root = Path(tmp)
        model_dir, data, chats = _write_setup(root, records)
        lora = dict(seq_len=seq_len, lora_rank=rank, lora_alpha=2.0 * rank)
        packed = _MoekitCase(model_dir, data, root / "packed", batch_size=rows, **lora)
        per_step = max(1, round(rows * seq_len / packed.mean_record_tokens()))
        padded = _MoekitCase(
            model_dir, data, root / "padded", packing=False, batch_size=per_step, **lora
        )
        moekit = {"moekit packed": packed, "moekit padded": padded}

        def between(round_index: int) -> None:  # -1: the warm-up
            for name, case in moekit.items():
                for _ in range(warmup if round_index < 0 else steps):
                    step = case.step()
                    if round_index >= 0:
                        timed[name].append(step)

        if use_trl:
            callback = _rounds_callback(between, warmup, steps)
            sizes = dict(seq_len=seq_len, rows=rows, rank=rank, max_steps=warmup + rounds * steps)
            _trl_trainer(model_dir, chats, root / "trl", callback, **sizes).train()
            timed["TRL packed"] = callback.steps
        else:
            for round_index in range(-1, rounds):
                between(round_index)
    return [_result(case, done) for case, done in timed.items()]


def format_sft_table(results: list[SFTResult]) -> str:
    """One line a case: its step's shape, real tokens, padding, median ms, tokens/s at the
    median step and its ratio to moekit packed's, tokens/s over all timed steps."""
    from . import _table

    base = next((r.tokens_per_s for r in results if r.case == CASES[0]), None)
    header = (
        "case",
        "step",
        "real tokens",
        "padding",
        "step ms",
        "tokens/s",
        "x moekit packed",
        "tokens/s (total)",
    )
    rows = [
        (
            r.case,
            f"{r.rows} x {r.width}",
            f"{r.real_tokens:,.0f}",
            f"{r.padding:.1%}",
            f"{r.step_ms:,.0f}",
            f"{r.tokens_per_s:,.0f}",
            "-" if base is None else f"{r.tokens_per_s / base:.2f}",
            f"{r.total_tokens_per_s:,.0f}",
        )
        for r in results
    ]
    return _table(header, rows)
