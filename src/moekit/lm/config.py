"""The training run's configuration: presets, TOML files and flag overrides, in that order."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .._checks import check_choice, check_non_negative, check_positive_int
from .._extras import require
from .model import LMConfig


def _tomllib():
    """The standard library's TOML reader, or its backport tomli below Python 3.11."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    return require("tomli", "train", "Reading --config on Python < 3.11")  # pragma: no cover


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `moekit train` needs; `asdict()` goes into checkpoints and MLflow params."""

    model: LMConfig = field(default_factory=LMConfig)
    data: str | None = field(
        default=None, metadata=_help("UTF-8 text file (default: tinyshakespeare, downloaded once)")
    )
    out: str = field(
        default="runs/makemoe", metadata=_help("run directory: checkpoints, plots, mlflow.db")
    )
    tokenizer: str = field(default="char", metadata=_help("char (makeMoE) or bpe (byte-level BPE)"))
    bpe_vocab_size: int = field(default=512, metadata=_help("vocabulary size of the BPE tokenizer"))
    batch_size: int = field(default=16, metadata=_help("sequences per step"))
    max_iters: int = field(default=5000, metadata=_help("training steps"))
    eval_interval: int = field(default=100, metadata=_help("steps between evaluations"))
    eval_iters: int = field(default=400, metadata=_help("batches per split in each evaluation"))
    learning_rate: float = field(default=1e-3, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    schedule: str = field(
        default="constant", metadata=_help("learning-rate schedule: constant or cosine")
    )
    warmup_iters: int = field(default=0, metadata=_help("linear warmup steps"))
    min_lr: float = field(
        default=1e-4, metadata=_help("final learning rate of the cosine schedule")
    )
    grad_clip: float = field(default=0.0, metadata=_help("clip the gradient norm to this (0: off)"))
    dtype: str = field(default="float32", metadata=_help("float32, or bfloat16 autocast"))
    seed: int = field(default=1337, metadata=_help("seed of weights, batches and sampling"))
    save_every: int = field(
        default=500, metadata=_help("steps between checkpoints (0: only the final one)")
    )
    keep: int = field(default=2, metadata=_help("checkpoints kept in the run directory"))
    sample_tokens: int = field(
        default=200, metadata=_help("tokens of sample text at each evaluation")
    )
    track: bool = field(default=True, metadata=_help("track the run with MLflow"))
    tracking_uri: str | None = field(
        default=None, metadata=_help("MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    )
    experiment: str = field(default="moekit", metadata=_help("MLflow experiment name"))
    device: str = field(
        default="auto",
        metadata=_help("auto, cpu or cuda (under torchrun: each rank's LOCAL_RANK GPU)"),
    )
    expert_parallel: int = field(
        default=1,
        metadata=_help(
            "expert-parallel group size R under torchrun: each group of R consecutive ranks "
            "shares out every layer's experts; R divides the number of ranks"
        ),
    )
    dist_timeout: float = field(
        default=300.0,
        metadata=_help("seconds a collective may wait for a dead or hung rank before failing"),
    )
    compile: bool = field(
        default=False,
        metadata=_help(
            "torch.compile the model: on CUDA mode reduce-overhead (the step replays as CUDA "
            "graphs), on CPU Inductor's default"
        ),
    )
    threads: int = field(default=0, metadata=_help("CPU threads for torch (0: torch's default)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "keep",
            "bpe_vocab_size",
            "expert_parallel",
        ):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_iters", "save_every", "sample_tokens", "threads", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("learning_rate", "weight_decay", "min_lr", "grad_clip"):
            check_non_negative(name, getattr(self, name))
        if check_non_negative("dist_timeout", self.dist_timeout) == 0:
            raise ValueError(f"dist_timeout={self.dist_timeout} must be > 0 seconds")
        check_choice("tokenizer", self.tokenizer, ("char", "bpe"))
        check_choice("schedule", self.schedule, ("constant", "cosine"))
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("device", self.device, ("auto", "cpu", "cuda"))

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # the makeMoE blog's hyperparameters (batch 16, block 32, AdamW lr 1e-3, 5000 steps,
    # makeMoE's model) with three changes that took the 5000-step val loss from 1.730 to 1.683
    # on tinyshakespeare (blog: 1.751): nn.Linear's default init instead of kaiming_normal_
    # (start at ln V, not 5.3), dropout 0.2 instead of 0.1, and 100 warmup steps then cosine
    # decay to 1e-4. It evaluates every 500 steps on 100 batches a split (the training loss of
    # every step is logged): makeMoE's every 100 on 400 (--eval-interval 100 --eval-iters 400)
    # spent twice the training's token-passes. The blog exactly: --init kaiming --dropout 0.1
    # --schedule constant --warmup-iters 0 --eval-interval 100 --eval-iters 400.
    "makemoe": TrainConfig(
        model=LMConfig(init="default", dropout=0.2),
        schedule="cosine",
        warmup_iters=100,
        min_lr=1e-4,
        eval_interval=500,
        eval_iters=100,
    ),
    # a few seconds on a laptop core: for tests and smoke runs
    "tiny": TrainConfig(
        model=LMConfig(block_size=16, n_embed=32, n_head=4, n_layer=2, num_experts=4, top_k=2),
        out="runs/tiny",
        batch_size=8,
        max_iters=60,
        eval_interval=20,
        eval_iters=4,
        learning_rate=3e-3,
        save_every=20,
        sample_tokens=32,
    ),
}

_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(values: dict, source: str) -> None:
    """Each known key's value must have its field's type (a TOML file can hold anything)."""
    annotations = {f.name: f.type for f in (*fields(LMConfig), *fields(TrainConfig))}
    for key, value in values.items():
        annotation = str(annotations.get(key, ""))
        base = annotation.replace("| None", "").strip()
        if base not in _TYPES:
            continue
        wanted = _TYPES[base]
        is_bool = isinstance(value, bool)
        if (is_bool and bool not in wanted) or not isinstance(value, wanted):
            raise ValueError(
                f"{source}: {key} must be {annotation.replace('| None', 'or none')}, "
                f"got {type(value).__name__} {value!r}"
            )


MODEL_FIELDS = {f.name for f in fields(LMConfig)} - {"vocab_size"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"model"}


def build_config(
    preset: str = "makemoe",
    toml_path: str | None = None,
    *,
    model_base: LMConfig | None = None,
    **overrides,
) -> TrainConfig:
    """preset, then the TOML file (flat keys or a [model] table), then `overrides` (flat keys).

    `model_base` replaces the preset's model (a resumed run's saved config: model keys that the
    file and the flags leave out come from it).

    Raises:
        ValueError: An unknown preset or key, or a value out of range.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} must be one of {sorted(PRESETS)}")
    values: dict = {}
    if toml_path is not None:
        tomllib = _tomllib()
        try:
            table = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"--config {toml_path}: {err}") from err
        model_table = table.pop("model", {})
        if not isinstance(model_table, dict):
            raise ValueError(f"--config {toml_path}: model must be a table, got {model_table!r}")
        values.update(model_table)
        values.update(table)
        _check_types(values, f"--config {toml_path}")
    values.update(overrides)
    unknown = set(values) - MODEL_FIELDS - TRAIN_FIELDS
    if unknown:
        raise ValueError(f"unknown configuration keys {sorted(unknown)}")
    base = PRESETS[preset]
    if model_base is not None:
        base = replace(base, model=model_base)
    model_values = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    num_experts = model_values.get("num_experts")
    if "top_k" not in model_values and isinstance(num_experts, int) and num_experts >= 1:
        # the preset's top_k, at most num_experts: --num-experts 1 alone is the dense model
        model_values["top_k"] = min(base.model.top_k, num_experts)
    model = replace(base.model, **model_values)
    return replace(base, model=model, **{k: v for k, v in values.items() if k in TRAIN_FIELDS})
