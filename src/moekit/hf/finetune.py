"""`moekit finetune`: fine-tune a saved transformers MoE model on moekit's engine.

    finetune(FinetuneConfig(model=DIR, data=FILE, out=DIR, ...)) -> FinetuneResult

The model is loaded with transformers (`experts_implementation="moekit"` where its family is
on the ExpertsInterface) and patched (`patch_model`: moekit's routing and experts); the log
says which blocks run on which. With `lora_rank` a PEFT LoRA adapter is trained on the parts
named by `lora_targets` (the experts' fused weights and the routers through PEFT's
`target_parameters`, the attention projections through `target_modules`); the experts' LoRA
runs inside moekit's grouped pass (`blocks.LoraExperts`: per expert x @ A_e @ B_e on its rows,
never W + BA for the whole stack). Without `lora_rank` every parameter trains (a full
fine-tune).

Data: a UTF-8 text file, or a JSONL of {"text": ...}, tokenised with the model directory's own
tokenizer (bytes as ids where it has none: a vocabulary of at least 256), split 90/10 and
sampled as random windows of `seq_len` + 1 tokens (`lm.data.TokenData`). Per step: the loss
(the family's auxiliary loss included where `aux_loss_coef` or the config turns it on), tokens/s
in a tqdm line; every `eval_interval` steps the held-out loss and, per MoE layer, the routing
statistics the patched routers count (max/mean expert load, the entropy of the load, each
expert's share), all in MLflow (`sqlite:///<out>/mlflow.db`), and an atomic checkpoint of the
trained tensors, optimizer and random streams (`lm.checkpoint`): `resume` continues bitwise.

Output in `<out>/final`: the PEFT adapter directory (`adapter_config.json`,
`adapter_model.safetensors`; `PeftModel.from_pretrained` loads it without moekit), or with a
full fine-tune a transformers model directory; `merge` also writes `<out>/merged`, the base
model with the adapter merged in. `router_bias_update` moves each correction bias toward equal
load after every step (DeepSeek-V3's aux-loss-free balancing); with LoRA the biases are written
beside the adapter (`router_biases.safetensors`; the merged model holds them).
`<out>/expert_load.png` and `<out>/loss.png` plot the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._extras import require
from ..lm.checkpoint import decode_bytes, encode_bytes, latest_checkpoint, save_checkpoint
from ..lm.data import TokenData
from ..lm.tracking import make_tracker
from .aux import switch_loss
from .patch import experts_of, holds_experts, patch_model, router_of
from .routers import Router, attribute

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]

log = logging.getLogger(__name__)

TARGETS = ("experts", "attention", "router")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FinetuneConfig:
    model: str  # a saved transformers model directory
    data: str  # a UTF-8 text file or a JSONL of {"text": ...}
    out: str
    steps: int = 100
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    lora_rank: int | None = None  # None: a full fine-tune
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: tuple[str, ...] = ("experts",)
    aux_loss: str = "family"  # "family": transformers' own; "moekit": `aux.switch_loss`
    aux_loss_coef: float | None = None  # None: the model config's (moekit's: 0.01)
    router_bias_update: float | None = None  # aux-loss-free balancing: the bias step size
    dtype: str = "float32"
    eval_interval: int = 50
    eval_batches: int = 4
    merge: bool = False
    track: bool = True
    tracking_uri: str | None = None
    progress: bool = True
    collapse_ratio: float = 4.0  # warn when a layer's max/mean expert load stays above this
    collapse_evals: int = 3  # ... for this many evaluations in a row

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "eval_interval", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.lora_rank}")
        unknown = [t for t in self.lora_targets if t not in TARGETS]
        if unknown or not self.lora_targets:
            raise ValueError(
                f"--lora-targets must name some of {', '.join(TARGETS)}, got "
                f"{','.join(self.lora_targets) or 'nothing'}"
            )
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.aux_loss not in ("family", "moekit"):
            raise ValueError(f"--aux-loss must be family or moekit, got {self.aux_loss!r}")
        if self.router_bias_update is not None and not self.router_bias_update > 0:
            raise ValueError(f"--router-bias-update must be > 0, got {self.router_bias_update}")


@dataclass
class FinetuneResult:
    out: Path
    step: int
    evals: list[dict] = field(default_factory=list)
    final: Path | None = None


class ByteTokenizer:
    """UTF-8 bytes as token ids, for model directories without a tokenizer."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(
                f"the model directory has no tokenizer and its vocabulary ({vocab_size}) is too "
                "small for bytes (256): save a tokenizer with the model"
            )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(model_dir: Path, vocab_size: int):
    """The directory's (or hub repository's) own tokenizer, else bytes."""
    names = ("tokenizer.json", "tokenizer_config.json")
    local = model_dir.exists()
    if not local or any((model_dir / name).is_file() for name in names):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=local)
        except (OSError, ValueError):
            if local:
                raise
            return ByteTokenizer(vocab_size)  # a hub model without a tokenizer
        tokenizer.model_max_length = 1 << 30  # windows are cut here, not by the tokenizer
        return tokenizer
    return ByteTokenizer(vocab_size)


def load_corpus(path: Path) -> str:
    """A UTF-8 text file, or the "text" fields of a JSONL file joined by blank lines."""
    if not path.is_file():
        raise ValueError(f"--data: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return text
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--data: {path} line {number} is not JSON: {error}") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'--data: {path} line {number} has no "text" string')
        texts.append(record["text"])
    return "\n\n".join(texts)


def load_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """A saved transformers causal LM, its experts on moekit's backend where its family is
    on the ExpertsInterface, then patched; logs what runs where."""
    transformers = require("transformers", "hf", "moekit finetune")
    local = model_dir.exists()
    if local and not (model_dir / "config.json").is_file():
        raise ValueError(f"--model: {model_dir} is not a saved transformers model (no config.json)")
    if not local and str(model_dir).count("/") != 1:
        raise ValueError(f"--model: {model_dir} is neither a model directory nor a hub id")
    options = dict(dtype=dtype, local_files_only=local)  # a hub id: fetched, when online
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = transformers.AutoModelForCausalLM
        try:
            try:
                model = auto.from_pretrained(
                    str(model_dir), experts_implementation="moekit", **options
                )
            except (ValueError, TypeError):  # a family off the interface takes no backend name
                model = auto.from_pretrained(str(model_dir), **options)
        except OSError as error:  # a hub id offline, a corrupt checkpoint
            raise ValueError(f"--model: cannot load {model_dir}: {error}") from error
    blocks = [m for m in model.modules() if holds_experts(m)]
    if not blocks:
        log.warning("%s has no MoE blocks: fine-tuning it anyway, as a dense model", model_dir)
        return model
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patched = patch_model(model)
    for warning in record:
        log.warning("%s", warning.message)
    backend = getattr(model.config, "_experts_implementation", None) == "moekit"
    log.warning(
        "moekit engine: %d of %d MoE blocks patched (moekit's routing and experts)%s",
        patched,
        len(blocks),
        "; the others' experts on moekit's backend" if backend and patched < len(blocks) else "",
    )
    return model


def _suffix(model: nn.Module, module: nn.Module) -> str:
    """`module`'s name below its decoder layer: "mlp.experts" of "model.layers.0.mlp.experts"."""
    name = next(n for n, m in model.named_modules() if m is module)
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1] + 1 :] if digits else parts[-2:])


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(target_parameters, target_modules) of PEFT for the named parts of the model."""
    parameters, modules = set(), set()
    for block in (m for m in model.modules() if holds_experts(m)):
        if "experts" in targets and (experts := experts_of(block)) is not None:
            prefix = _suffix(model, experts)
            for name, param in experts.named_parameters(recurse=False):
                if param.dim() == 3:
                    parameters.add(f"{prefix}.{name}")
        router, rule = router_of(block)
        if "router" in targets and router is not None:
            parameters.add(f"{_suffix(model, router)}.{rule.weight}")
    if "attention" in targets:
        modules = {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _ATTENTION
        }
    if not parameters and not modules:
        raise ValueError(
            f"--lora-targets {','.join(targets)} names nothing in this model (its MoE blocks' "
            "experts and routers, or attention q/k/v/o projections)"
        )
    return sorted(parameters), sorted(modules)


class Finetuner:
    """One run: the model, its adapter or parameters, the optimizer, data and streams."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        model_dir = Path(cfg.model)
        checkpoint = latest_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            log.warning("--resume: no valid checkpoint in %s, starting from scratch", self.out)
        torch.manual_seed(cfg.seed)
        self.model = load_model(model_dir, DTYPES[cfg.dtype])
        config = self.model.config
        self.aux_coef = 0.0
        if cfg.aux_loss == "moekit":  # the routers' logits out, transformers' own loss off
            config.output_router_logits, config.router_aux_loss_coef = True, 0.0
            self.aux_coef = 0.01 if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        elif cfg.aux_loss_coef is not None:
            config.output_router_logits = cfg.aux_loss_coef > 0
            config.router_aux_loss_coef = cfg.aux_loss_coef
        self.tokenizer = load_tokenizer(model_dir, config.vocab_size)
        ids = self.tokenizer.encode(load_corpus(Path(cfg.data)))
        try:
            self.data = TokenData.from_ids(ids, cfg.seq_len)
        except ValueError as error:
            raise ValueError(f"{error} (--seq-len {cfg.seq_len}: give more data)") from error
        if cfg.lora_rank is not None:
            self.model = self._adapted(self.model)
        self.model.train()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=0.0)
        self.routers = [
            m.__dict__["forward"]
            for m in self.model.modules()
            if isinstance(m.__dict__.get("forward"), Router)
        ]
        for router in self.routers:
            router.counts = torch.zeros(0)
        self.biases = self._correction_biases() if cfg.router_bias_update else {}
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.evals, self.load_history, self._collapsed = 0, [], [], {}
        self._losses: list[float] = []  # the step losses since the last evaluation
        run_id = self._restore(checkpoint) if checkpoint is not None else None
        self.tracker = make_tracker(
            cfg.track, self.out, "moekit-finetune", cfg.tracking_uri, run_id
        )

    def _correction_biases(self) -> dict[str, tuple[Router, torch.Tensor]]:
        """{buffer name: (patched router, its correction bias [E])} for the aux-loss-free
        update: the rule's `choice_bias` on the router, or on the block where the block passes
        it in (`"arg"`)."""
        names = {id(t): n for n, t in self.model.named_buffers()}
        names |= {id(t): n for n, t in self.model.named_parameters()}
        found = {}
        for block in (m for m in self.model.modules() if holds_experts(m)):
            router, rule = router_of(block)
            if router is None or not isinstance(router.__dict__.get("forward"), Router):
                continue
            if rule.choice_bias == "arg":
                candidates = [
                    getattr(block, n, None) for n in ("e_score_correction_bias", "expert_bias")
                ]
            else:
                candidates = [attribute(router, rule.choice_bias)]
            bias = next((c for c in candidates if isinstance(c, torch.Tensor)), None)
            if bias is not None and id(bias) in names:
                found[names[id(bias)]] = (router.__dict__["forward"], bias)
        if not found:
            raise ValueError(
                "--router-bias-update: no router of this model chooses with a correction bias "
                "(DeepSeek-V3-style sigmoid routers do)"
            )
        return found

    @torch.no_grad()
    def _update_biases(self, before: dict[str, torch.Tensor]) -> None:
        """DeepSeek-V3's aux-loss-free balancing: bias_e += rate * sign(mean load - load_e)
        with the step's token counts of each router."""
        for name, (router, bias) in self.biases.items():
            load = router.counts.to(bias.device, torch.float32) - before[name]
            if load.numel() == bias.numel():
                bias.add_(
                    torch.sign(load.mean() - load).to(bias.dtype).view_as(bias),
                    alpha=self.cfg.router_bias_update,
                )

    def _adapted(self, model: nn.Module) -> nn.Module:
        peft = require("peft", "hf", "moekit finetune --lora-rank")
        parameters, modules = lora_targets(model, self.cfg.lora_targets)
        rank = self.cfg.lora_rank
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=self.cfg.lora_alpha or 2 * rank,
            target_parameters=parameters or None,
            target_modules=modules or None,
        )
        log.warning("LoRA rank %d on %s", rank, ", ".join(parameters + modules))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, config)
            patch_model(model)  # the experts' LoRA inside moekit's grouped pass (`LoraExperts`)
        return model

    # --- checkpoints --------------------------------------------------------------------
    def _restore(self, checkpoint) -> str | None:
        tensors = self.params | {n: bias for n, (_, bias) in self.biases.items()}
        differ = set(tensors) ^ set(checkpoint.model)
        if differ:
            raise ValueError(
                f"--resume: the checkpoint in {self.out} trains other tensors than this run "
                f"(e.g. {sorted(differ)[:3]})"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(checkpoint.model[name])
        self.optimizer.load_state_dict(checkpoint.optimizer)
        state = checkpoint.state
        self.step, self.evals = checkpoint.step, state["evals"]
        self.load_history = state["expert_load"]
        torch.set_rng_state(decode_bytes(state["rng"]["torch"]))
        self.data_gen.set_state(decode_bytes(state["rng"]["data"]))
        log.warning("resumed from %s at step %d", checkpoint.path, self.step)
        return state.get("mlflow_run_id")

    def save(self) -> Path:
        self.tracker.flush()
        state = {
            "config": asdict(self.cfg),
            "evals": self.evals,
            "expert_load": self.load_history,
            "rng": {
                "torch": encode_bytes(torch.get_rng_state()),
                "data": encode_bytes(self.data_gen.get_state()),
            },
            "mlflow_run_id": self.tracker.run_id,
        }
        tensors = {n: p.detach() for n, p in self.params.items()}
        tensors |= {n: bias for n, (_, bias) in self.biases.items()}
        return save_checkpoint(self.out, self.step, tensors, self.optimizer.state_dict(), state)

    # --- steps --------------------------------------------------------------------------
    def _batch(self, split: str, generator: torch.Generator) -> torch.Tensor:
        x, y = self.data.batch(split, self.cfg.batch_size, self.cfg.seq_len, generator)
        return torch.cat([x, y[:, -1:]], dim=1)  # [B, T + 1]: the model shifts its labels

    def _counts(self) -> dict[str, torch.Tensor]:
        return {
            name: (c.float().clone() if (c := router.counts).numel() else torch.zeros(bias.numel()))
            for name, (router, bias) in self.biases.items()
        }

    def _moekit_aux(self, out, before: list[torch.Tensor]) -> torch.Tensor:
        """`aux.switch_loss` over the step's router logits and the routers' own choices."""
        logits = getattr(out, "router_logits", None)
        if not logits or len(logits) != len(self.routers):
            raise ValueError(
                "--aux-loss moekit: this model does not return one router-logits tensor per "
                "patched router (use --aux-loss family)"
            )
        counts = [
            r.counts.float() - b if b.numel() else r.counts.float()
            for r, b in zip(self.routers, before, strict=True)
        ]
        return switch_loss([layer.reshape(-1, layer.shape[-1]) for layer in logits], counts)

    def train_step(self) -> dict[str, float]:
        before = self._counts()
        router_counts = [r.counts.float().clone() for r in self.routers]
        ids = self._batch("train", self.data_gen)
        out = self.model(input_ids=ids, labels=ids)
        total, metrics = out.loss, {}
        if self.cfg.aux_loss == "moekit":
            aux = self._moekit_aux(out, router_counts)
            total = total + self.aux_coef * aux
            metrics["aux_loss"] = float(aux)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: non-finite loss {loss}")
        self.optimizer.step()
        if self.biases:
            self._update_biases(before)
        metrics["loss"] = loss
        if getattr(out, "aux_loss", None) is not None and "aux_loss" not in metrics:
            metrics["aux_loss"] = float(out.aux_loss)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        self.model.eval()
        try:
            losses = [
                self.model(input_ids=(ids := self._batch("val", generator)), labels=ids).loss.item()
                for _ in range(self.cfg.eval_batches)
            ]
        finally:
            self.model.train()
        train, self._losses = self._losses, []
        record = {"step": self.step, "val_loss": sum(losses) / len(losses)}
        if train:
            record["train_loss"] = sum(train) / len(train)
        record.update(self._router_health())
        self.evals.append(record)
        return record

    def _router_health(self) -> dict[str, float]:
        """Per MoE layer, from the tokens the patched routers counted since the last call:
        max/mean expert load, the load's entropy over log E; a warning on collapse."""
        metrics, loads = {}, []
        for layer, router in enumerate(self.routers):
            counts, router.counts = router.counts, torch.zeros(0)
            if counts.numel() == 0 or counts.sum() == 0:
                continue
            share = counts.double() / counts.sum()  # [E]
            entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share))
            ratio = float(share.max() * len(share))
            metrics[f"layer{layer}_load_max_over_mean"] = ratio
            metrics[f"layer{layer}_load_entropy"] = float(entropy)
            loads.append(share.tolist())
            run = self._collapsed.get(layer, 0) + 1 if ratio > self.cfg.collapse_ratio else 0
            self._collapsed[layer] = run
            if run == self.cfg.collapse_evals:
                log.warning(
                    "MoE layer %d is collapsing: max/mean expert load %.1f > %.1f at %d "
                    "evaluations in a row (raise --aux-loss-coef)",
                    layer,
                    ratio,
                    self.cfg.collapse_ratio,
                    run,
                )
        if loads and len({len(load) for load in loads}) == 1:
            self.load_history.append({"step": self.step, "load": loads})
        return metrics

    def run(self) -> FinetuneResult:
        cfg = self.cfg
        tqdm = require("tqdm", "train", "moekit finetune's progress").tqdm
        if self.step == 0:
            self.tracker.log_params({k: v for k, v in asdict(cfg).items()})
        tokens = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not cfg.progress)
        status = "FAILED"
        try:
            while self.step < cfg.steps:
                tic = time.perf_counter()
                metrics = self.train_step()
                self._losses.append(metrics["loss"])
                metrics["tokens_per_s"] = tokens / (time.perf_counter() - tic)
                self.step += 1
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
                if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                    record = self.evaluate()
                    self.tracker.log_metrics(record, step=self.step)
                    bar.write(f"step {self.step}: val loss {record['val_loss']:.4f}")
                    self.save()
            final = self.write_final()
            self.write_reports()
            status = "FINISHED"
        finally:
            bar.close()
            self.tracker.close(status)
        return FinetuneResult(self.out, self.step, self.evals, final)

    def write_final(self) -> Path:
        final = self.out / "final"
        self.model.save_pretrained(final)
        if self.biases and self.cfg.lora_rank is not None:  # buffers: not in a PEFT adapter
            from safetensors.torch import save_file

            biases = {n: b.detach().contiguous().cpu() for n, (_, b) in self.biases.items()}
            save_file(biases, final / "router_biases.safetensors")
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(final)
        if self.cfg.merge and self.cfg.lora_rank is not None:
            merged = self.model.merge_and_unload()
            merged.save_pretrained(self.out / "merged")
        return final

    def write_reports(self) -> None:
        from ..plots import plot_expert_load, plot_losses

        paths = []
        evals = [e for e in self.evals if "train_loss" in e]
        if evals:
            paths.append(plot_losses(evals, self.out / "loss.png"))
        if self.load_history:
            steps = [entry["step"] for entry in self.load_history]
            loads = [entry["load"] for entry in self.load_history]
            paths.append(plot_expert_load(steps, loads, self.out / "expert_load.png"))
        for path in paths:
            self.tracker.log_artifact(path)


def finetune(cfg: FinetuneConfig, resume: bool = False) -> FinetuneResult:
    """Fine-tune `cfg.model` on `cfg.data` (see the module docstring)."""
    return Finetuner(cfg, resume).run()
