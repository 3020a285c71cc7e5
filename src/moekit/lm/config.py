"""The training run's configuration: presets, TOML files and flag overrides, in that order."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .._checks import check_choice, check_positive_int
from ..train.config import ALIASES, RunConfig, read_toml
from .model import LMConfig


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    """Everything `moekit train` needs: the run's fields (`train.config.RunConfig`, makeMoE's
    defaults) and the language model's; `asdict()` goes into checkpoints and MLflow params."""

    model: LMConfig = field(default_factory=LMConfig)
    data: str | None = field(
        default=None, metadata=_help("UTF-8 text file (default: tinyshakespeare, downloaded once)")
    )
    out: str = field(
        default="runs/makemoe", metadata=_help("run directory: checkpoints, plots, mlflow.db")
    )
    tokenizer: str = field(default="char", metadata=_help("char (makeMoE) or bpe (byte-level BPE)"))
    bpe_vocab_size: int = field(default=512, metadata=_help("vocabulary size of the BPE tokenizer"))
    batch_size: int = field(default=16, metadata=_help("sequences per step: the global batch"))
    steps: int = field(default=5000, metadata=_help("optimizer steps (alias --max-iters)"))
    eval_interval: int = field(default=100, metadata=_help("steps between evaluations"))
    eval_batches: int = field(
        default=400, metadata=_help("batches per split in each evaluation (alias --eval-iters)")
    )
    lr: float = field(
        default=1e-3, metadata=_help("peak learning rate, AdamW (alias --learning-rate)")
    )
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(
        default=0, metadata=_help("linear warmup steps (alias --warmup-iters)")
    )
    min_lr: float = field(default=1e-4, metadata=_help("the learning rate a decay ends at"))
    dtype: str = field(
        default="float32", metadata=_help("float32, or bfloat16 autocast (float32 weights)")
    )
    seed: int = field(default=1337, metadata=_help("seed of weights, batches and sampling"))
    save_every: int = field(
        default=500, metadata=_help("steps between checkpoints (0: only the final one)")
    )
    sample_tokens: int = field(
        default=200, metadata=_help("tokens of sample text at each evaluation")
    )
    compile: bool = field(
        default=False,
        metadata=_help(
            "torch.compile the model: on CUDA mode reduce-overhead (the step replays as CUDA "
            "graphs), on CPU Inductor's default"
        ),
    )
    threads: int = field(default=0, metadata=_help("CPU threads for torch (0: torch's default)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("bpe_vocab_size", self.bpe_vocab_size)
        for name in ("sample_tokens", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        check_choice("tokenizer", self.tokenizer, ("char", "bpe"))
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))


PRESETS: dict[str, TrainConfig] = {
    # the makeMoE blog's hyperparameters (batch 16, block 32, AdamW lr 1e-3, 5000 steps,
    # makeMoE's model) with three changes that took the 5000-step val loss from 1.730 to 1.683
    # on tinyshakespeare (blog: 1.751): nn.Linear's default init instead of kaiming_normal_
    # (start at ln V, not 5.3), dropout 0.2 instead of 0.1, and 100 warmup steps then cosine
    # decay to 1e-4. It evaluates every 500 steps on 100 batches a split (the training loss of
    # every step is logged): makeMoE's every 100 on 400 (--eval-interval 100 --eval-iters 400)
    # spent twice the training's token-passes. The blog exactly: --init kaiming --dropout 0.1
    # --schedule constant --warmup-steps 0 --eval-interval 100 --eval-batches 400.
    "makemoe": TrainConfig(
        model=LMConfig(init="default", dropout=0.2),
        schedule="cosine",
        warmup_steps=100,
        min_lr=1e-4,
        eval_interval=500,
        eval_batches=100,
    ),
    # a few seconds on a laptop core: for tests and smoke runs
    "tiny": TrainConfig(
        model=LMConfig(block_size=16, n_embed=32, n_head=4, n_layer=2, num_experts=4, top_k=2),
        out="runs/tiny",
        batch_size=8,
        steps=60,
        eval_interval=20,
        eval_batches=4,
        lr=3e-3,
        save_every=20,
        sample_tokens=32,
    ),
}

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
        values.update(read_toml(toml_path, (LMConfig, TrainConfig), tables=("model",)))
    values.update({ALIASES.get(k, k): v for k, v in overrides.items()})
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
