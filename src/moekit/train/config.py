"""RunConfig: the fields every training run has, spelled the same in `moekit train` and
`moekit finetune`; each trainer's config extends it. Flags are generated from the fields
(`cli.add_config_flags`), a TOML file (`--config`) sits between the defaults and the flags.

One name per concept; the old names of `moekit train` stay as aliases (`ALIASES`), in flags
and in TOML files.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .._checks import check_choice, check_non_negative, check_positive_int
from .._extras import require

# old name -> the name of the concept (flags and TOML keys)
ALIASES = {
    "max_iters": "steps",
    "learning_rate": "lr",
    "warmup_iters": "warmup_steps",
    "eval_iters": "eval_batches",
}
SCHEDULES = ("constant", "cosine", "linear")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What the loop (`train.loop.run`) reads; `asdict()` goes into checkpoints and MLflow."""

    out: str = field(default="runs/moekit", metadata=_help("run directory: checkpoints, plots"))
    steps: int = field(default=100, metadata=_help("optimizer steps"))
    epochs: float | None = field(
        default=None, metadata=_help("passes over the training data, instead of --steps")
    )
    batch_size: int = field(default=8, metadata=_help("rows per step: the global batch"))
    grad_accum: int = field(
        default=1, metadata=_help("micro-batches a step (each rank's rows split K ways)")
    )
    lr: float = field(default=1e-4, metadata=_help("peak learning rate (AdamW)"))
    schedule: str = field(
        default="constant", metadata=_help("learning-rate schedule: constant, cosine or linear")
    )
    warmup_steps: int = field(default=0, metadata=_help("linear warmup steps"))
    min_lr: float = field(default=0.0, metadata=_help("the learning rate a decay ends at"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    grad_clip: float = field(default=0.0, metadata=_help("clip the gradient norm to this (0: off)"))
    dtype: str = field(
        default="float32",
        metadata=_help("float32, or bfloat16 (float32 master weights and optimizer state)"),
    )
    device: str = field(
        default="auto",
        metadata=_help("auto (cuda when available), cpu or cuda; under torchrun LOCAL_RANK's GPU"),
    )
    seed: int = field(default=0, metadata=_help("seed of weights, batches and sampling"))
    eval_interval: int = field(default=50, metadata=_help("steps between evaluations"))
    eval_batches: int = field(
        default=4, metadata=_help("held-out batches an evaluation (without --eval-data)")
    )
    save_every: int = field(
        default=50, metadata=_help("steps between checkpoints (0: only the final one)")
    )
    keep: int = field(default=2, metadata=_help("checkpoints kept in the run directory"))
    activation_checkpointing: bool = field(
        default=False, metadata=_help("recompute each block's activations in the backward")
    )
    overwrite: bool = field(
        default=False, metadata=_help("start over in an --out that holds another run")
    )
    track: bool = field(default=True, metadata=_help("track the run with MLflow"))
    tracking_uri: str | None = field(
        default=None, metadata=_help("MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    )
    experiment: str = field(default="moekit", metadata=_help("MLflow experiment name"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    collapse_ratio: float = field(
        default=4.0, metadata=_help("warn when a layer's max/mean expert load stays above this")
    )
    collapse_evals: int = field(default=3, metadata=_help("... for this many evaluations in a row"))
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

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "keep",
            "expert_parallel",
            "collapse_evals",
        ):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(
                    f"--{_flag(name)} must be an integer >= 0, got {getattr(self, name)!r}"
                )
        for name in ("weight_decay", "min_lr", "grad_clip"):
            check_non_negative(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"--grad-accum {self.grad_accum} must divide --batch-size {self.batch_size} "
                "(each micro-batch has batch-size / grad-accum rows over all ranks)"
            )
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))

    def to_dict(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def learning_rate(cfg: RunConfig, step: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then constant, cosine or linear decay to `min_lr` at
    `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    import math

    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine


def _tomllib():
    """The standard library's TOML reader, or its backport tomli below Python 3.11."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    return require("tomli", "train", "Reading --config on Python < 3.11")  # pragma: no cover


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def read_toml(path: str, classes: tuple[type, ...], tables: tuple[str, ...] = ()) -> dict:
    """The flat {field: value} of a TOML run file (old names -> their concept; `tables`:
    sub-tables whose keys are flattened, e.g. [model]), checked against the fields of
    `classes`: an unknown key or a value of the wrong type is one line naming it."""
    tomllib = _tomllib()
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"--config {path}: {err}") from err
    values: dict = {}
    for name in tables:
        sub = table.pop(name, {})
        if not isinstance(sub, dict):
            raise ValueError(f"--config {path}: {name} must be a table, got {sub!r}")
        values.update(sub)
    values.update(table)
    values = {ALIASES.get(k, k): v for k, v in values.items()}
    annotations = {f.name: str(f.type) for cls in classes for f in fields(cls)}
    unknown = sorted(set(values) - set(annotations))
    if unknown:
        raise ValueError(
            f"--config {path}: {', '.join(unknown)} is no flag of this command "
            f"(keys are flag names with _ for -, e.g. batch_size)"
        )
    for key, value in values.items():
        annotation = annotations[key]
        base = annotation.replace("| None", "").strip()
        if base not in _TYPES:
            continue
        wanted = _TYPES[base]
        is_bool = isinstance(value, bool)
        if (is_bool and bool not in wanted) or not isinstance(value, wanted):
            raise ValueError(
                f"--config {path}: {key} must be {annotation.replace('| None', 'or none')}, "
                f"got {type(value).__name__} {value!r}"
            )
    return values
