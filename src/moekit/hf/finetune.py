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
trained tensors, optimizer and random streams (`train.files`): `resume` continues bitwise.

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
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

from .._extras import require
from ..lm.data import TokenData
from ..parallel import training as par
from ..train.files import decode_bytes, encode_bytes
from ..train.sharded import latest_sharded, load_sharded, save_sharded
from ..train.tracking import make_tracker
from .aux import switch_loss
from .distributed import Sharded, training_state
from .patch import experts_of, holds_experts, patch_model, router_of
from .routers import Router, attribute

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]

log = logging.getLogger(__name__)

TARGETS = ("experts", "attention", "router")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    expert_parallel: int = 1  # R under torchrun: each group of R ranks shares out the experts
    fsdp: bool = True  # under torchrun: FSDP2 for the dense parameters (False: DDP)
    dist_timeout: float = 300.0  # seconds a step's collective waits for a dead or hung rank

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
        if not isinstance(self.expert_parallel, int) or self.expert_parallel < 1:
            raise ValueError(
                f"--expert-parallel must be a positive integer, got {self.expert_parallel!r}"
            )
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")


@dataclass
class FinetuneResult:
    out: Path
    step: int
    evals: list[dict] = field(default_factory=list)
    final: Path | None = None
    is_main: bool = True  # rank 0 (or one process): the rank that reports


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
    """One run: the model, its adapter or parameters, the optimizer, data and streams; under
    torchrun one rank's part of it (`hf.distributed.Sharded`)."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)
        self.topo = par.init_distributed(
            cfg.expert_parallel, "auto", cfg.dist_timeout, command="finetune"
        )
        self.is_main = self.topo is None or self.topo.is_main
        if not self.is_main:  # rank 0 reports for all
            logging.getLogger("moekit").setLevel(logging.ERROR)
            require("transformers", "hf", "moekit finetune").utils.logging.disable_progress_bar()
        world = 1 if self.topo is None else self.topo.world_size
        if cfg.batch_size % world:
            raise ValueError(
                f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                f"{world} (each rank takes an equal slice of the global batch)"
            )
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        model_dir = Path(cfg.model)
        checkpoint = latest_sharded(self.out) if resume and self.is_main else None
        if resume and self.topo is not None:  # rank 0 verified it: every rank takes its pick
            checkpoint = par.all_gather_objects(checkpoint, self.topo)[0]
        if resume and checkpoint is None and self.is_main:
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
        self.device = torch.device("cpu") if self.topo is None else self.topo.device
        self.model.to(self.device).train()
        self.routers = [
            m.__dict__["forward"]
            for m in self.model.modules()
            if isinstance(m.__dict__.get("forward"), Router)
        ]
        for router in self.routers:
            router.counts = torch.zeros(0)
        self.biases = self._correction_biases() if cfg.router_bias_update else {}
        self.sharded = None if self.topo is None else Sharded(self.model, self.topo, cfg.fsdp)
        if self.topo is not None:  # the model (and adapter) alike everywhere: now each its own
            torch.manual_seed(par.rank_seed(cfg.seed, self.topo.rank))  # dropout, router noise
        self.step_model = self.model if self.sharded is None else self.sharded.step_model
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=0.0)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.evals, self.load_history, self._collapsed = 0, [], [], {}
        self._losses: list[float] = []  # the step losses since the last evaluation
        run_id = self._restore(*checkpoint) if checkpoint is not None else None
        self.tracker = make_tracker(
            cfg.track and self.is_main, self.out, "moekit-finetune", cfg.tracking_uri, run_id
        )
        self._wait()  # rank 0's MLflow setup is not a step: no --dist-timeout on it

    def _wait(self) -> None:
        if self.topo is not None:
            self.topo.wait()

    def _param_groups(self) -> list[dict]:
        """The trainable parameters: the stacked experts' (sharded under expert parallelism:
        plain tensors) in a group apart from the others (FSDP2's DTensors), the same at any
        world size, so a checkpoint's optimizer state fits any run."""
        experts = {
            id(p)
            for m in self.model.modules()
            if holds_experts(m) and (e := experts_of(m))
            for p in e.parameters(recurse=False)
        }
        groups = [
            [p for p in self.params.values() if (id(p) in experts) == kind]
            for kind in (False, True)
        ]
        return [{"params": group} for group in groups if group]

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
        with the step's token counts of each router (over the global batch)."""
        loads = self._summed(
            [router.counts.float() - before[name] for name, (router, _) in self.biases.items()]
        )
        for (_, bias), load in zip(self.biases.values(), loads, strict=True):
            load = load.to(bias.device)
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
    def _tensors(self) -> dict:
        """The training state for DCP: the trained tensors and correction biases, the
        optimizer's state; the live tensors (DCP loads in place)."""
        names = set(self.params) | set(self.biases)
        if self.sharded is not None:
            return self.sharded.state(self.optimizer, names)
        return training_state(self.model, self.optimizer, names)

    def _restore(self, path: Path, state: dict) -> str | None:
        saved = set(state.get("tensors", ()))
        mine = set(self.params) | set(self.biases)
        if saved != mine:
            raise ValueError(
                f"--resume: the checkpoint in {self.out} trains other tensors than this run "
                f"(e.g. {sorted(saved ^ mine)[:3]})"
            )
        tensors = self._tensors()
        load_sharded(path, tensors, self.topo)
        if self.sharded is not None:
            self.sharded.load(tensors, self.optimizer)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, tensors["optimizer"])
        self.step, self.evals = state["step"], state["evals"]
        self.load_history = state["expert_load"]
        ranks = state["rng"]["torch_ranks"]
        rank = 0 if self.topo is None else self.topo.rank
        if len(ranks) == (1 if self.topo is None else self.topo.world_size):
            torch.set_rng_state(decode_bytes(ranks[rank]))  # bitwise: each rank its own stream
        else:  # another world size: a fresh stream per rank and step
            torch.manual_seed(par.rank_seed(self.cfg.seed, rank, state["step"]))
        self.data_gen.set_state(decode_bytes(state["rng"]["data"]))
        if self.is_main:
            log.warning(
                "resumed from %s at step %d (saved by %d ranks, expert-parallel %d)",
                path,
                self.step,
                state.get("world_size", 1),
                state.get("expert_parallel", 1),
            )
        return state.get("mlflow_run_id")

    def save(self) -> Path:
        """A checkpoint (`train.sharded.save_sharded`): every rank its pieces."""
        self.tracker.flush()
        rng = encode_bytes(torch.get_rng_state())
        ranks = [rng] if self.topo is None else par.all_gather_objects(rng, self.topo)
        state = {
            "config": asdict(self.cfg),
            "evals": self.evals,
            "expert_load": self.load_history,
            "rng": {"torch_ranks": ranks, "data": encode_bytes(self.data_gen.get_state())},
            "mlflow_run_id": self.tracker.run_id,
            "tensors": sorted(set(self.params) | set(self.biases)),
            "world_size": 1 if self.topo is None else self.topo.world_size,
            "expert_parallel": self.cfg.expert_parallel,
        }
        return save_sharded(self.out, self.step, self._tensors(), state, self.topo)

    # --- steps --------------------------------------------------------------------------
    def _batch(self, split: str, generator: torch.Generator) -> torch.Tensor:
        """This rank's rows [B/N, T + 1] of the global batch every rank draws alike."""
        x, y = self.data.batch(split, self.cfg.batch_size, self.cfg.seq_len, generator)
        ids = torch.cat([x, y[:, -1:]], dim=1)  # [B, T + 1]: the model shifts its labels
        if self.topo is not None:
            rows = ids.shape[0] // self.topo.world_size
            ids = ids[self.topo.rank * rows : (self.topo.rank + 1) * rows]
        return ids.to(self.device)

    def _summed(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Token counts of this rank -> of the global batch (one collective)."""
        if self.topo is None:
            return tensors
        return par.all_reduce_sum([t.to(self.device) for t in tensors], self.topo.data_group)

    def _mean(self, values: list[float]) -> list[float]:
        """Per-rank means (of equal-sized slices) -> the global batch's."""
        if self.topo is None:
            return values
        values = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        return par.all_reduce_mean(values, self.topo).tolist()

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
        counts = self._summed(
            [
                r.counts.float() - b if b.numel() else r.counts.float()
                for r, b in zip(self.routers, before, strict=True)
            ]
        )
        return switch_loss([layer.reshape(-1, layer.shape[-1]) for layer in logits], counts)

    def train_step(self) -> dict[str, float]:
        before = self._counts()
        router_counts = [r.counts.float().clone() for r in self.routers]
        ids = self._batch("train", self.data_gen)
        out = self.step_model(input_ids=ids, labels=ids)
        total, aux = out.loss, getattr(out, "aux_loss", None)
        if self.cfg.aux_loss == "moekit":
            aux = self._moekit_aux(out, router_counts)
            total = total + self.aux_coef * aux
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.sharded is not None:
            self.sharded.finish_grads()
        values = self._mean([out.loss.item()] + ([] if aux is None else [aux.detach().item()]))
        if not math.isfinite(values[0]):  # the same on every rank: all stop together
            raise FloatingPointError(f"step {self.step}: non-finite loss {values[0]}")
        self.optimizer.step()
        if self.biases:
            self._update_biases(before)
        metrics = {"loss": values[0]}
        if aux is not None:
            metrics["aux_loss"] = values[1]
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        self.model.eval()
        try:
            losses = self._mean(
                [
                    self.step_model(
                        input_ids=(ids := self._batch("val", generator)), labels=ids
                    ).loss.item()
                    for _ in range(self.cfg.eval_batches)
                ]
            )
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
        summed = self._summed([router.counts for router in self.routers])
        for layer, (router, counts) in enumerate(zip(self.routers, summed, strict=True)):
            router.counts = torch.zeros(0)
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
        show = cfg.progress and self.is_main
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not show)
        status = "FAILED"
        try:
            self._wait()
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
                    if show:
                        bar.write(f"step {self.step}: val loss {record['val_loss']:.4f}")
                    self.save()
            final = self.write_final()
            if self.is_main:
                self.write_reports()
            self._wait()
            status = "FINISHED"
        except RuntimeError as err:
            if self.topo is None:
                raise
            raise par.rank_failure(self.topo, self.step, err, cfg.dist_timeout, self.out) from err
        finally:
            bar.close()
            self.tracker.close(status)
        return FinetuneResult(self.out, self.step, self.evals, final, self.is_main)

    def write_final(self) -> Path:
        """`<out>/final` (and `<out>/merged`) by rank 0: the PEFT adapter or the whole model,
        its tensors gathered from the ranks (a collective under torchrun)."""
        final, lora = self.out / "final", self.cfg.lora_rank is not None
        state = None if self.sharded is None else self.sharded.full_state(trainable_only=lora)
        if not self.is_main:
            return final
        self.model.save_pretrained(final, **({} if state is None else {"state_dict": state}))
        if not lora and self.sharded is not None:  # FSDP2 renames the class: the config's name
            self.model.config.architectures = [_plain_class(self.model).__name__]
            self.model.config.save_pretrained(final)
        if self.biases and lora:  # buffers: not in a PEFT adapter
            from safetensors.torch import save_file

            biases = {n: b.detach().contiguous().cpu() for n, (_, b) in self.biases.items()}
            save_file(biases, final / "router_biases.safetensors")
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(final)
        if self.cfg.merge and lora:
            self._write_merged(final)
        return final

    def _write_merged(self, final: Path) -> None:
        """`<out>/merged`: the base model reloaded with the saved adapter (and router biases)
        merged in, so it needs no tensor of this run's sharded model."""
        from peft import PeftModel
        from safetensors.torch import load_file

        base = load_model(Path(self.cfg.model), DTYPES[self.cfg.dtype])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
        biases = final / "router_biases.safetensors"
        if biases.is_file():
            with torch.no_grad():
                for name, value in load_file(biases).items():
                    name = name.removeprefix("base_model.model.")
                    merged.get_buffer(name).copy_(value)
        merged.save_pretrained(self.out / "merged")

    def write_reports(self) -> None:
        from ..train.plots import plot_expert_load, plot_losses

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


def _plain_class(model: nn.Module) -> type:
    """The model's own class under the subclass FSDP2's `fully_shard` gives it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def finetune(cfg: FinetuneConfig, resume: bool = False) -> FinetuneResult:
    """Fine-tune `cfg.model` on `cfg.data` (see the module docstring)."""
    return Finetuner(cfg, resume).run()
