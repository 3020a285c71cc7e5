"""FinetuneConfig: the run of `moekit finetune` (`hf.finetune`), the shared run fields
(`RunConfig`) and its own. Kept here, not in `hf/`, so the command line builds its flags
without importing transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import RunConfig

__all__ = ["DTYPES", "TARGETS", "FinetuneConfig"]

DTYPES = ("float32", "bfloat16", "float64")  # torch dtype names
TARGETS = ("experts", "attention", "router")  # what --lora-targets names (`hf.lora`)
QUANT_SCHEMES = ("nf4", "int8")  # `moekit.quant.SCHEMES`


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(RunConfig):
    model: str = field(metadata=_help("a saved transformers model directory, or a hub id"))
    data: str = field(
        metadata=_help(
            "a text file, or records (.jsonl, .json, .parquet, a datasets directory) of text, "
            "prompt/completion or chat messages"
        )
    )
    out: str = field(metadata=_help("the run directory: checkpoints, final, plots, mlflow.db"))
    eval_data: str | None = field(
        default=None, metadata=_help("held-out records, all evaluated (default: 10%% of --data)")
    )
    seq_len: int = field(default=128, metadata=_help("tokens a row; longer records truncated"))
    packing: bool = field(
        default=True, metadata=_help("pack records into rows (each attends to itself only)")
    )
    train_on_prompt: bool = field(
        default=False, metadata=_help("the loss on every token, not only the answers")
    )
    lora_rank: int | None = field(
        default=None, metadata=_help("train a LoRA adapter of this rank (else: full)")
    )
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA alpha (2 x rank)"))
    lora_targets: tuple[str, ...] | None = None  # (experts, attention, router); None: experts
    aux_loss: str = field(
        default="family",
        metadata=_help(
            "family: transformers' own auxiliary loss; moekit: the Switch loss on the routers' "
            "own choices"
        ),
    )
    aux_loss_coef: float | None = field(
        default=None, metadata=_help("auxiliary loss coefficient (0: off; default: the config's)")
    )
    router_bias_update: float | None = None  # aux-loss-free balancing: the bias step size
    quantize_experts: str | None = field(
        default=None,
        metadata=_help("nf4 or int8: store the frozen expert weights so (with --lora-rank)"),
    )
    merge: bool = field(default=False, metadata=_help("also write <out>/merged"))
    drift_warn: float = field(
        default=0.5,
        metadata=_help(
            "warn when a MoE layer keeps less than this fraction of the base model's routing "
            "(its top-k choices on a calibration batch; 0: never)"
        ),
    )
    fsdp: bool = field(
        default=True, metadata=_help("under torchrun: FSDP2 for the dense parameters (else DDP)")
    )
    # the run's defaults for a fine-tune
    grad_clip: float = field(default=1.0, metadata=_help("clip the gradient norm (0: off)"))
    experiment: str = field(default="moekit-finetune", metadata=_help("MLflow experiment name"))
    dtype: str = field(
        default="float32",
        metadata=_help("float32, float64, or bfloat16 (float32 master weights and optimizer)"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"--seq-len must be an integer >= 2, got {self.seq_len!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.lora_rank}")
        if self.lora_targets is not None:
            if self.lora_rank is None:
                raise ValueError(
                    "--lora-targets needs --lora-rank (without it every parameter trains: a "
                    "full fine-tune)"
                )
            unknown = [t for t in self.lora_targets if t not in TARGETS]
            if unknown or not self.lora_targets:
                raise ValueError(
                    f"--lora-targets must name some of {', '.join(TARGETS)}, got "
                    f"{','.join(self.lora_targets) or 'nothing'}"
                )
        if self.quantize_experts is not None:
            if self.quantize_experts not in QUANT_SCHEMES:
                raise ValueError(
                    f"--quantize-experts must be one of {', '.join(QUANT_SCHEMES)}, got "
                    f"{self.quantize_experts!r}"
                )
            if self.lora_rank is None:
                raise ValueError(
                    "--quantize-experts needs --lora-rank: the quantised base must be frozen "
                    "(a full fine-tune trains the expert weights themselves)"
                )
        if not 0.0 <= self.drift_warn <= 1.0:
            raise ValueError(f"--drift-warn must be a fraction in [0, 1], got {self.drift_warn}")
        if self.aux_loss not in ("family", "moekit"):
            raise ValueError(f"--aux-loss must be family or moekit, got {self.aux_loss!r}")
        if self.router_bias_update is not None:
            if not self.router_bias_update > 0:
                raise ValueError(f"--router-bias-update must be > 0, got {self.router_bias_update}")
            if self.lora_rank is not None:
                raise ValueError(
                    "--router-bias-update with --lora-rank: a PEFT adapter cannot carry the "
                    "routers' correction biases (buffers), so OUT/final would silently lose "
                    "them; fine-tune fully, or leave out --router-bias-update"
                )

    @property
    def targets(self) -> tuple[str, ...]:
        return self.lora_targets or ("experts",)
