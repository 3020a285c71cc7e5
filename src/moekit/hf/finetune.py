"""`moekit finetune`: fine-tune a saved transformers MoE model on moekit's engine, a job of
the shared loop (`train.loop`).

    finetune(FinetuneConfig(model=DIR, data=FILE, out=DIR, ...)) -> RunResult

The model is loaded with transformers (`experts_implementation="moekit"` where its family is
on the ExpertsInterface) and patched (`patch_model`: moekit's routing and experts). With
`lora_rank` a PEFT LoRA adapter trains on `lora_targets` (`hf.lora`); the experts' LoRA runs
inside moekit's grouped pass. Without it every parameter trains.

Data (`hf.data`, `train.data`): a text file is one document, random windows of `seq_len`
tokens; records (.jsonl/.ndjson/.json/.parquet/a `datasets` directory) of {"text"},
{"prompt", "completion"} or {"messages"} are tokenised once into a memory-mapped cache beside
the run, the loss on the supervised tokens only (assistant turns, completions), packed into
rows of `seq_len` with each document attending to itself alone (position ids restart; no
attention mask, so transformers builds the block-diagonal mask), or padded (`packing=False`).
Padding is never routed into the statistics: the patched routers count real tokens only, and
the family's auxiliary loss sees a mask of them.

A step's loss is the sum of the token losses over the supervised tokens of the global batch
over their number (`train.loop`). `val_loss` is the token-weighted mean over the whole eval
file (`eval_data`), or over the held-out 10% of the records (of the text's tokens: as many
windows as `eval_batches`). `dtype="bfloat16"`: the frozen weights in bfloat16, the trained
ones float32 (master weights and optimizer state), the forward under autocast.

Output in `<out>/final`: the PEFT adapter (`PeftModel.from_pretrained` loads it without
moekit), or with a full fine-tune a transformers model directory, with the tokenizer; `merge`
also writes `<out>/merged`. Checkpoints are DCP (`train.sharded`), resumed bitwise; a run
directory of another model or adapter is refused by its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._extras import require
from .._memory import map_large_blocks
from ..parallel import training as par
from ..train import batches
from ..train.files import prepare_run_dir
from ..train.finetune_config import FinetuneConfig
from ..train.health import stack_loads
from ..train.loop import RunResult, check_batch, run
from ..train.sharded import latest_sharded, load_sharded, save_sharded
from ..train.tracking import check_server
from .aux import family_aux, routers, switch_loss
from .balance import correction_biases, update_biases
from .distributed import Sharded
from .drift import RoutingDrift, counts_kept, routing_drift
from .load import load_config, load_model, load_tokenizer
from .lora import add_lora
from .patch import experts_of, holds_experts
from .quantize import quantize_experts, stored_scheme
from .sources import sources
from .stream import is_stand_in
from .verify import VerifyReport, verify_experts

__all__ = ["FinetuneConfig", "FinetuneJob", "finetune"]

log = logging.getLogger(__name__)


class FinetuneJob:
    """One fine-tune (`train.loop.Job`): model, adapter, optimizer, data streams; under
    torchrun one rank's part (`hf.distributed.Sharded`)."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)
        require("tqdm", "train", "moekit finetune's progress")
        self.topo = par.init_distributed(
            cfg.expert_parallel, cfg.device, cfg.dist_timeout, command="finetune"
        )
        self.is_main = self.topo.is_main
        if not self.is_main:  # rank 0 reports for all
            logging.getLogger("moekit").setLevel(logging.ERROR)
        if not (self.is_main and cfg.progress):  # transformers' loading and saving bars too
            require("transformers", "hf", "moekit finetune").utils.logging.disable_progress_bar()
        check_batch(cfg, self.topo)
        if cfg.track and cfg.tracking_uri and self.topo.is_main:  # before the model: seconds
            check_server(cfg.tracking_uri)
        prepare_run_dir(self.out, resume, cfg.overwrite)
        model_dir = Path(cfg.model)
        # 1. what can be wrong with the data, before the weights are read
        config = load_config(model_dir)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and cfg.seq_len > limit:
            raise ValueError(
                f"--seq-len {cfg.seq_len} is beyond the model's position limit "
                f"(max_position_embeddings {limit})"
            )
        self.tokenizer = load_tokenizer(model_dir, config.vocab_size)
        self.train_source, self.eval_source = sources(cfg, self.tokenizer, self.topo)
        checkpoint = latest_sharded(self.out) if resume and self.is_main else None
        if resume:  # rank 0 verified it: every rank takes its pick
            checkpoint = par.all_gather_objects(checkpoint, self.topo)[0]
            if checkpoint is None and self.is_main:
                log.warning("--resume: no valid checkpoint in %s, starting from scratch", self.out)
        self.fingerprint = self._fingerprint(model_dir, config)
        if checkpoint is not None:
            _check_fingerprint(checkpoint[1], self.fingerprint, self.out)
        # 2. the model (an expert-parallel rank reads its experts only), its adapter, its
        # shards, the optimizer
        torch.manual_seed(cfg.seed)
        topo = self.topo
        if topo.device.type == "cpu" and cfg.quantize_experts:  # memory first (`_memory`)
            map_large_blocks()
        ep = topo.expert_parallel
        shard = (topo.rank % ep, ep) if topo.distributed and ep > 1 else None
        # FSDP2 over all N ranks: each reads only the rows of the dense weights it keeps
        dense = (topo.rank, topo.world_size) if topo.distributed and cfg.fsdp else None
        checked = VerifyReport()  # expert rows against the files: as they load, or after
        self.model = load_model(
            model_dir,
            getattr(torch, cfg.dtype),
            cfg.quantize_experts,
            checked,
            shard,
            dense_shard=dense,
        )
        stored = stored_scheme(self.model)  # experts the checkpoint keeps quantised (MXFP4)
        if stored is not None and cfg.lora_rank is None:
            raise ValueError(
                f"--model {model_dir}: its experts are stored in {stored}; fine-tune them with "
                "--lora-rank (a quantised base stays frozen)"
            )
        self.aux_coef = self._aux_setup(self.model.config)
        if cfg.lora_rank is not None:
            self.model = add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
        self.trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if cfg.dtype == "bfloat16":  # master weights: the trained tensors in float32
            for param in self.trained.values():
                param.data = _as_float(param.data)
        if cfg.activation_checkpointing:
            model = self.model  # older transformers: gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
        if stored or cfg.quantize_experts:  # quantised as they were read: stand-ins to meta
            quantize_experts(self.model, stored or cfg.quantize_experts)
        self.device = self.topo.device
        self.model.to(self.device).train()
        self.routers = routers(self.model)
        for router in self.routers:
            router.counts = torch.zeros(0)
        self.biases = correction_biases(self.model) if cfg.router_bias_update else {}
        if shard is None:  # every expert on each rank: checked before FSDP2 shards them
            self._verify(model_dir, checked)
        self.sharded = Sharded(self.model, self.topo, cfg.fsdp)
        if shard is not None:  # each rank the expert rows it read and holds
            self._verify(model_dir, checked)
        if self.topo.distributed:  # the model alike everywhere: now each rank its own stream
            torch.manual_seed(par.rank_seed(cfg.seed, self.topo.rank))  # dropout, router noise
        self.step_model = self.sharded.step_model
        self.trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.stream = batches.TrainStream(self.train_source, cfg.batch_size, cfg.seed)
        self.step, self._step_counts = 0, []
        self.resumed = None
        self.drift = self._drift(resuming=checkpoint is not None)
        if checkpoint is not None:
            self._restore(*checkpoint)
        self.topo.wait()

    # --- setup --------------------------------------------------------------------------
    def _aux_setup(self, config) -> float:
        """The routers' logits out where an auxiliary loss trains; returns moekit's coefficient
        (0 where the family's own loss, if any, is used)."""
        cfg = self.cfg
        if cfg.aux_loss == "moekit":
            config.output_router_logits, config.router_aux_loss_coef = True, 0.0
            return 0.01 if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        if cfg.aux_loss_coef is not None:
            config.output_router_logits = cfg.aux_loss_coef > 0
            config.router_aux_loss_coef = cfg.aux_loss_coef
        return 0.0

    def _drift(self, resuming: bool) -> RoutingDrift | None:
        """The routing drift against the base model on the first eval batch (`hf.drift`)."""
        cfg, topo = self.cfg, self.topo
        if not self.routers:
            return None
        first = next(iter(batches.eval_pass(self.eval_source, cfg.batch_size, 1, cfg.seed)))
        batch = batches.part(first, topo.rank, topo.world_size).to(self.device)
        with counts_kept(self.routers):
            return routing_drift(
                self.model,
                self._forward,
                batch,
                topo,
                self.out,
                cfg.lora_rank is not None,
                resuming,
                cfg.drift_warn,
            )

    def _verify(self, model_dir: Path, report) -> None:
        """The expert rows this rank holds against the files (`hf.verify`)."""
        if model_dir.is_dir():
            verify_experts(self.model, model_dir, report, getattr(torch, self.cfg.dtype))
            log.warning("expert weights verified: %s", report.summary())

    def _fingerprint(self, model_dir: Path, config) -> dict:
        """What a checkpoint of this run must agree with to be resumed."""
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
        cfg = self.cfg
        return {
            "model": str(model_dir.resolve()) if model_dir.exists() else str(model_dir),
            "model_config": hashlib.sha256(text.encode()).hexdigest()[:16],
            "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_targets": list(cfg.targets) if cfg.lora_rank is not None else None,
            "dtype": cfg.dtype,
            "quantize_experts": cfg.quantize_experts,
        }

    def _param_groups(self) -> list[dict]:
        """The stacked experts' parameters (plain tensors under expert parallelism) in a group
        apart from the others (FSDP2's DTensors), the same at any world size."""
        experts = {
            id(p)
            for m in self.model.modules()
            if holds_experts(m) and (e := experts_of(m))
            for p in e.parameters(recurse=False)
        }
        groups = [
            [p for p in self.trained.values() if (id(p) in experts) == kind]
            for kind in (False, True)
        ]
        return [{"params": group} for group in groups if group]

    # --- the job's steps ----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.stream.steps_per_epoch()

    def params(self) -> dict:
        return {k: v for k, v in self.cfg.to_dict().items()}

    def _autocast(self):
        enabled = self.cfg.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def micro_batches(self, k: int) -> tuple[list, int]:
        """This rank's rows of the next global batch in `k` micro-batches; the global count of
        supervised tokens (every rank draws the whole global batch)."""
        self._step_counts = self._counts()
        batch = self.stream.next()
        mine = batches.contiguous_part(batch, self.topo.rank, self.topo.world_size)
        return batches.chunks(mine, k), batch.num_targets()

    def _forward(self, batch):
        """The model's output on `batch` (on the device), the routers told the real tokens."""
        batch = batch.to(self.device)
        valid = batch.attention_mask.reshape(-1).bool()  # [N]
        for router in self.routers:
            router.valid = valid
        # packed rows: no mask, transformers finds the documents from the restarting position
        # ids (their padding reads as the last document's tail, which nothing attends to)
        padded = not self.cfg.packing and not bool(valid.all())
        mask = batch.attention_mask if padded else None
        try:
            with self._autocast():
                out = self.step_model(  # no cache: with one, transformers ignores the packing
                    input_ids=batch.input_ids,
                    position_ids=batch.position_ids,
                    attention_mask=mask,
                    use_cache=False,
                )
        finally:
            for router in self.routers:
                router.valid = None
        return batch, out

    def forward_backward(self, micro, scale: float, aux_scale: float, sync: bool) -> torch.Tensor:
        with self.sharded.no_sync(sync):
            before = self._counts() if self.cfg.aux_loss == "moekit" else None
            batch, out = self._forward(micro)
            loss = _summed_loss(out.logits, batch.targets)
            aux = self._aux(out, batch, before)
            total = loss * scale + (0.0 if aux is None else aux * aux_scale)
            total.backward()
        aux_value = loss.new_zeros((), dtype=torch.float64) if aux is None else aux.detach()
        return torch.stack([loss.detach().double(), aux_value.double()])  # on the device

    def _aux(self, out, batch, before) -> torch.Tensor | None:
        """The auxiliary loss of a micro-batch, with its coefficient, over real tokens only."""
        valid = batch.attention_mask.reshape(-1).bool()  # [N]
        if self.cfg.aux_loss == "moekit":
            logits = getattr(out, "router_logits", None)
            if not logits or len(logits) != len(self.routers):
                raise ValueError(
                    "--aux-loss moekit: this model does not return one router-logits tensor per "
                    "patched router (use --aux-loss family)"
                )
            counts = [
                _since(r.counts, b, self.device) for r, b in zip(self.routers, before, strict=True)
            ]
            real = valid.sum().float().reshape(1).to(self.device)
            *counts, real = par.all_reduce_sum([*counts, real], self.topo.data_group)
            layers = [layer.reshape(-1, layer.shape[-1])[valid] for layer in logits]  # [N', E]
            # f_e over the global batch's real tokens, P_e over this rank's (DDP averages)
            shares = [c * (layers[0].shape[0] / real.clamp_min(1)) for c in counts]
            return self.aux_coef * switch_loss(layers, shares)
        return family_aux(self.model, out, batch.attention_mask)

    def finish_grads(self) -> torch.Tensor:
        self.sharded.finish_grads()
        return self.sharded.grad_norm()

    def after_step(self) -> None:
        if self.biases:
            counts = self._counts()
            since = [
                _since(now, then, self.device)
                for now, then in zip(counts, self._step_counts, strict=True)
            ]
            loads = par.all_reduce_sum(since, self.topo.data_group)
            update_biases([b for _, b in self.biases.values()], loads, self.cfg.router_bias_update)
        self.step += 1

    def _counts(self) -> list[torch.Tensor]:
        """Each patched router's token counts so far [E] ([0] before its first forward)."""
        return [r.counts.float().clone().to(self.device) for r in self.routers]

    def router_load(self) -> torch.Tensor | None:
        counts = par.all_reduce_sum(
            [r.counts.float().to(self.device) for r in self.routers], self.topo.data_group
        )
        for router in self.routers:
            router.counts = torch.zeros(0)
        return stack_loads([c for c in counts if c.numel()]) if counts else None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`val_loss`: the token-weighted mean over the eval set's supervised tokens; the
        routers' counts are left as the training made them."""
        cfg = self.cfg
        seed = cfg.seed * 1_000_003 + self.step
        sums = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        with counts_kept(self.routers):
            try:
                for batch in batches.eval_pass(
                    self.eval_source, cfg.batch_size, cfg.eval_batches, seed
                ):
                    part = batches.part(batch, self.topo.rank, self.topo.world_size)
                    mine, out = self._forward(part)
                    loss = _summed_loss(out.logits, mine.targets)
                    count = (mine.targets != -100).sum()
                    sums += torch.stack([loss.double().cpu(), count.double().cpu()])
            finally:
                self.model.train()
            drift = self.drift.measure() if self.drift is not None else {}
        total = par.all_reduce_sum([sums.to(self.device)], self.topo.data_group)[0].double()
        loss, count = total.tolist()
        return {"val_loss": loss / max(count, 1.0), "val_tokens": count, **drift}

    # --- checkpoints --------------------------------------------------------------------
    def _tensors(self) -> dict:
        """The training state for DCP: the trained tensors and correction biases, the
        optimizer's state; the live tensors (DCP loads in place)."""
        return self.sharded.state(self.optimizer, set(self.trained) | set(self.biases))

    def _restore(self, path: Path, state: dict) -> None:
        loop = state.get("loop")
        if not isinstance(loop, dict):
            raise ValueError(
                f"--resume: {path} was written by an older moekit finetune (no run state of "
                "the shared training runtime); start a new --out"
            )
        saved, mine = set(state.get("tensors", ())), set(self.trained) | set(self.biases)
        if saved != mine:
            raise ValueError(
                f"--resume: the checkpoint in {self.out} trains other tensors than this run "
                f"(e.g. {sorted(saved ^ mine)[:3]})"
            )
        tensors = self._tensors()
        load_sharded(path, tensors, self.topo)
        self.sharded.load(tensors, self.optimizer)
        self.stream.restore(loop["job"]["stream"])
        self.step, self.resumed = loop["step"], loop
        if self.is_main:
            log.warning(
                "resumed from %s at step %d (saved by %d ranks, expert-parallel %d)",
                path,
                self.step,
                loop.get("world_size", 1),
                loop.get("expert_parallel", 1),
            )

    def state(self) -> dict:
        return {"stream": self.stream.state()}

    def save(self, step: int, state: dict) -> Path:
        saved = {
            "config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint,
            "tensors": sorted(set(self.trained) | set(self.biases)),
            "loop": state,
        }
        return save_sharded(self.out, step, self._tensors(), saved, self.topo, self.cfg.keep)

    def finish(self) -> list[Path]:
        """`<out>/final` (and `<out>/merged`) by rank 0: the PEFT adapter or the whole model,
        its tensors gathered from the ranks (a collective under torchrun)."""
        final, lora = self.out / "final", self.cfg.lora_rank is not None
        state = self.sharded.full_state(trainable_only=lora)
        if not self.is_main:
            return [final]
        model = self.model
        if self.cfg.dtype == "bfloat16" and not lora:  # master weights back to bfloat16
            state = dict(model.state_dict() if state is None else state)
            for name in self.trained:
                state[name] = state[name].to(torch.bfloat16)
        model.save_pretrained(final, **({} if state is None else {"state_dict": state}))
        if not lora and self.topo.distributed and self.cfg.fsdp:  # FSDP2 renames the class
            model.config.architectures = [_plain_class(model).__name__]
            model.config.save_pretrained(final)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(final)
        paths = [final]
        if self.cfg.merge and lora:
            paths.append(self._write_merged(final))
        return paths

    def _write_merged(self, final: Path) -> Path:
        """`<out>/merged`: the base model reloaded with the saved adapter merged in (no tensor
        of this run's sharded model needed), with the tokenizer."""
        from peft import PeftModel

        # a base the checkpoint stores quantised (MXFP4) dequantised: merged, a plain model
        base = load_model(Path(self.cfg.model), getattr(torch, self.cfg.dtype), dequantize=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
        merged.save_pretrained(self.out / "merged")
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(self.out / "merged")
        return self.out / "merged"

    def reports(self) -> list[Path]:
        return []


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of the token cross-entropies over the supervised targets: logits [b, T, V]
    (at least float32: a bf16 softmax over V loses the small probabilities), targets [b, T]
    (-100: not learnt)."""
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [N, V]
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100, reduction="sum")


def _since(now: torch.Tensor, then: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token counts [E] added since `then` (an empty `then`: none counted before)."""
    now = now.float().to(device)
    return now - then.to(device) if then.numel() else now


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32; a stand-in of expert rows held apart (`hf.stream`) stays one element."""
    if is_stand_in(t):
        return torch.zeros((), dtype=torch.float32).expand(t.shape)
    return t.float()


def _check_fingerprint(state: dict, mine: dict, out: Path) -> None:
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        return
    differs = [
        f"{key} {saved.get(key)!r} there, {mine.get(key)!r} here"
        for key in mine
        if saved.get(key) != mine.get(key)
    ]
    if differs:
        raise ValueError(
            f"--resume: {out} holds a run of another model or adapter ({'; '.join(differs)}); "
            "give another --out, or --overwrite without --resume to start over there"
        )


def _plain_class(model: nn.Module) -> type:
    """The model's own class under the subclass FSDP2's `fully_shard` gives it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def finetune(cfg: FinetuneConfig, resume: bool = False, on_eval=None) -> RunResult:
    """Fine-tune `cfg.model` on `cfg.data` (see the module docstring)."""
    return run(FinetuneJob(cfg, resume), on_eval)
