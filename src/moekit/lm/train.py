"""Training: `train(config)` runs, evaluates, tracks, checkpoints and resumes a language model.

One step: batch from the data generator -> forward (CE + the MoE layers' aux losses) -> backward
-> finite check -> clip -> AdamW -> router-bias update. Every `eval_interval` steps: makeMoE's
estimate_loss (mean CE over `eval_iters` batches per split, eval mode), per-layer expert load and
router entropy, a text sample. On CPU a resumed run is bitwise identical to an uninterrupted one:
the checkpoint carries weights, optimizer state, both RNG states and the step.

Under torchrun (N ranks, `expert_parallel` R): every rank draws the same global batch and takes
its slice; the experts are shared out over groups of R ranks (`moekit.parallel`), dense
gradients averaged by DDP, expert gradients summed over replicas / N; losses, counts and the
router bias are global, so the run follows the single-process one. Rank 0 alone logs, plots and
writes checkpoints, in the single-process layout (experts gathered): they load in one process
and resume at any R.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .._device import fast_bfloat16
from .._extras import require
from ..parallel import expert_parallel, sharded_parameters
from ..parallel import training as par
from ..train.plots import plot_expert_load, plot_losses, pyplot
from ..routing import update_router_biases
from ..train.files import decode_bytes, encode_bytes, latest_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import TokenData, build_tokenizer, load_text, tokenizer_from_dict
from .model import LMConfig, SparseMoELanguageModel
from ..train.tracking import make_tracker

log = logging.getLogger(__name__)

_EVAL_CHUNK = 8  # evaluation batches per forward


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; raised before the optimizer touches the weights."""


@dataclass
class TrainResult:
    out: Path
    step: int
    evals: list[dict]  # [{"step", "train_loss", "val_loss"}]
    train_losses: list[float]  # cross-entropy of every training step
    checkpoint: Path | None


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant or cosine decay to `min_lr` at `max_iters`."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "constant":
        return cfg.learning_rate
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr + (cfg.learning_rate - cfg.min_lr) * cosine


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where the device has the kernel (one pass over all tensors), else foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; "
            "use --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tqdm():
    """tqdm.auto's progress bar class (a widget in notebooks)."""
    return require("tqdm.auto", "train", "The progress bar").tqdm


def _make_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {path}: cannot create the run directory ({err})") from err


def _wrap_ddp(model: torch.nn.Module, topo: par.Topology) -> torch.nn.Module:
    """DDP over the dense parameters; expert shards are `par.sync_expert_grads`'."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, list(sharded_parameters(model)))
    device_ids = [topo.device.index] if topo.device.type == "cuda" else None
    # buffers stay local after init: the sigmoid router counts its rank's load until
    # update_bias sums it (torch >= 2.13 names the switch forward_sync_buffers)
    params = inspect.signature(DDP.__init__).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    # the data group: it carries --dist-timeout (the default group has the I/O timeout)
    return DDP(model, device_ids=device_ids, process_group=topo.data_group, **{sync: False})


class Trainer:
    """The state of one run; `run()` trains from `step` to `cfg.max_iters`."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        if cfg.data is not None:  # absolute, so `moekit eval` finds it from anywhere
            cfg = replace(cfg, data=str(Path(cfg.data).resolve()))
        self.cfg = cfg
        # optional packages imported now, so a missing extra stops the run before any work
        _tqdm()
        pyplot()  # used at the end of the run, for the plots
        device = _device(cfg.device)  # checked before any process group starts
        self.topo = par.init_distributed(cfg.expert_parallel, cfg.device, cfg.dist_timeout)
        self.is_main = self.topo is None or self.topo.is_main
        if self.topo is not None and cfg.batch_size % self.topo.world_size:
            raise ValueError(
                f"--batch-size {cfg.batch_size} must be divisible by the number of ranks "
                f"{self.topo.world_size} (each rank takes an equal slice of the global batch)"
            )
        self.out = Path(cfg.out)
        _make_run_dir(self.out)
        self.device = self.topo.device if self.topo is not None else device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        checkpoint = latest_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            log.warning("--resume: no valid checkpoint in %s, starting from scratch", self.out)
        # 1. data and tokenizer (the checkpoint's tokenizer wins on resume)
        text = load_text(cfg.data)
        if checkpoint is not None:
            self.tokenizer = tokenizer_from_dict(checkpoint.state["tokenizer"])
        else:
            self.tokenizer = build_tokenizer(cfg.tokenizer, text, cfg.bpe_vocab_size)
        self.model_config = replace(cfg.model, vocab_size=self.tokenizer.vocab_size)
        self.data = TokenData.from_ids(self.tokenizer.encode(text), self.model_config.block_size)
        # 2. model, optimizer, random streams
        if cfg.dtype == "bfloat16" and not fast_bfloat16(self.device):
            log.warning(
                "--dtype bfloat16: this CPU has no native bf16 GEMM (AVX-512 BF16 or AMX); "
                "its matmuls fall back to a reference kernel ~200x slower than float32"
            )
        torch.manual_seed(cfg.seed)
        self.model = SparseMoELanguageModel.from_config(self.model_config).to(self.device)
        if checkpoint is not None:
            self._load_model(checkpoint)  # the single-process layout, before sharding
        self.step_model = self.model  # what the training step calls: the model, or its DDP
        if self.topo is not None:
            expert_parallel(self.model, self.topo.ep_group, data_group=self.topo.data_group)
            self.step_model = _wrap_ddp(self.model, self.topo)
            torch.manual_seed(par.rank_seed(cfg.seed, self.topo.rank))  # own dropout, noise draws
        if cfg.compile:  # the forward and backward; the optimizer and logging stay eager
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.step_model = torch.compile(self.step_model, mode=mode)
        self.optimizer = make_optimizer(self.model, cfg)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.evals: list[dict] = []
        self.train_losses: list[float] = []
        self.load_history: list[dict] = []  # [{"step", "load": [layers][experts] fractions}]
        self._load_sum = torch.zeros(self.model_config.n_layer, self.model_config.num_experts)
        run_id = None
        if checkpoint is not None:
            run_id = self._restore(checkpoint)
        track = cfg.track and self.is_main
        self.tracker = make_tracker(track, self.out, cfg.experiment, cfg.tracking_uri, run_id)

    def _load_model(self, checkpoint) -> None:
        saved = LMConfig.from_dict(checkpoint.state["model_config"])
        if saved != self.model_config:
            raise ValueError(
                f"--resume: the checkpoint in {self.out} has model config {saved}, "
                f"which differs from the requested {self.model_config}"
            )
        self.model.load_state_dict(checkpoint.model)

    def _restore(self, checkpoint) -> str | None:
        if self.topo is None:
            optimizer_state = checkpoint.optimizer
        else:  # this rank's rows of the experts' moments, read from the file alone
            optimizer_state = checkpoint.optimizer_slices(par.expert_rows(self.model))
        self.optimizer.load_state_dict(optimizer_state)
        self.step = checkpoint.step
        self._restore_rng(checkpoint.state["rng"])
        self.data_gen.set_state(decode_bytes(checkpoint.state["rng"]["data"]))
        history = checkpoint.state["history"]
        self.evals, self.train_losses = history["evals"], history["train_losses"]
        self.load_history = history["expert_load"]
        self._load_sum = torch.tensor(history["load_since_eval"])
        log.info("resumed from %s at step %d", checkpoint.path, self.step)
        return checkpoint.state.get("mlflow_run_id")

    def _restore_rng(self, rng: dict) -> None:
        """This rank's torch RNG state; at another number of ranks, fresh per-rank streams."""
        per_rank = rng.get("torch_ranks", [rng["torch"]])
        rank, world_size = (0, 1) if self.topo is None else (self.topo.rank, self.topo.world_size)
        if len(per_rank) == world_size:
            torch.set_rng_state(decode_bytes(per_rank[rank]))
        else:
            log.warning(
                "--resume: the checkpoint was written by %d rank(s), this run has %d: "
                "dropout and routing noise draw from fresh per-rank streams",
                len(per_rank),
                world_size,
            )
            torch.manual_seed(par.rank_seed(self.cfg.seed, rank, self.step))

    def _autocast(self):
        enabled = self.cfg.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _batch(self, split: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(split, self.cfg.batch_size, self.model_config.block_size, gen)

    def _my_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of a global batch [B, T] (all of it in one process)."""
        if self.topo is None:
            return t
        rows = t.shape[0] // self.topo.world_size
        return t[self.topo.rank * rows : (self.topo.rank + 1) * rows]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch to the device; to CUDA from pinned memory, asynchronously (a copy from
        pageable memory makes the host wait for the GPU: two syncs a step)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _global_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.topo is None else par.all_reduce_mean(t, self.topo)

    def train_step(self) -> float:
        """One optimizer step; returns its cross-entropy.

        One host read a step: the global losses, the gradient norm and the expert loads come
        back together after the backward, and a non-finite loss or norm stops the run there,
        before the optimizer touches the weights (on CUDA each read waits for the queued work,
        so fewer reads keep the GPU fed). Under torchrun the losses and the norm are global:
        every rank stops at the same step, none waits for another.
        """
        cfg, model = self.cfg, self.model
        batch = self._batch("train", self.data_gen)
        x, y = (self._to_device(self._my_rows(t)) for t in batch)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        with self._autocast():
            _, loss = self.step_model(x, y)
            total = loss + model.aux_loss()
        losses = self._global_mean(torch.stack([loss.detach(), total.detach()]).float())  # [2]
        # the statistics are computed from forward tensors: before the backward, which a
        # compiled model may run in buffers of its forward
        loads = torch.stack([m.stats.tokens_per_expert for m in model.moe_layers()])  # [L, E]
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.topo is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        else:
            par.sync_expert_grads(model, self.topo)
            norm = par.grad_norm(model, self.topo)
        host = torch.cat([losses, norm.reshape(1).float(), loads.flatten().float()]).cpu()
        loss_g, total_g, norm_g = host[:3].tolist()
        if not math.isfinite(total_g):
            raise NonFiniteError(f"step {self.step}: non-finite loss {total_g}")
        if not math.isfinite(norm_g):
            raise NonFiniteError(f"step {self.step}: non-finite gradient norm {norm_g}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(
                model.parameters(), cfg.grad_clip, norm, foreach=True
            )
        self.optimizer.step()
        update_router_biases(model, None if self.topo is None else self.topo.data_group)
        self._load_sum += host[3:].view(loads.shape).to(self._load_sum.dtype)
        return loss_g

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """makeMoE's estimate_loss: mean CE over `eval_iters` batches of each split, eval mode.

        The batches come from a generator seeded by the step, so evaluating never moves the
        training batch stream; they run `_EVAL_CHUNK` to a forward. Under torchrun each rank
        takes a slice of every chunk. A progress line counts the batches.
        """
        cfg, model = self.cfg, self.model
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        block_size = self.model_config.block_size
        bar = _tqdm()(
            total=2 * cfg.eval_iters,
            desc=f"eval at step {self.step}",
            unit="batch",
            leave=False,
            disable=not (cfg.progress and self.is_main),
            dynamic_ncols=True,
        )
        model.eval()
        result = {}
        try:
            for split in ("train", "val"):
                total = 0.0
                chunks = self.data.eval_chunks(
                    split, cfg.batch_size, block_size, cfg.eval_iters, gen, _EVAL_CHUNK
                )
                for n, x, y in chunks:
                    x, y = self._my_rows(x).to(self.device), self._my_rows(y).to(self.device)
                    with self._autocast():
                        total += self._global_mean(model(x, y)[1]).item() * n
                    bar.update(n)
                result[split] = total / cfg.eval_iters
        finally:
            model.train()
            bar.close()
        return result

    def sample(self, num_tokens: int) -> str:
        """Text generated from a newline (token 0 if absent), reproducible for the step."""
        try:
            start = self.tokenizer.encode("\n")[:1] or [0]
        except ValueError:
            start = [0]
        idx = torch.tensor([start], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        out = self.model.generate(idx, num_tokens, generator=gen)
        return self.tokenizer.decode(out[0, len(start) :].tolist())

    def evaluate(self) -> dict:
        losses = self.estimate_loss()
        record = {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"]}
        self.evals.append(record)
        metrics = {"train_loss": losses["train"], "val_loss": losses["val"]}
        for i, layer in enumerate(self.model.moe_layers()):
            metrics[f"layer{i}_router_entropy"] = float(layer.stats.router_entropy)
        if self._load_sum.sum() > 0:  # the training steps since the previous evaluation
            load = self._load_sum / self._load_sum.sum(-1, keepdim=True)  # [L, E] fractions
            self._load_sum.zero_()
            self.load_history.append({"step": self.step, "load": load.tolist()})
            for i in range(load.shape[0]):
                metrics[f"layer{i}_load_max"] = float(load[i].max())
                for e, fraction in enumerate(load[i].tolist()):
                    metrics[f"layer{i}_expert{e}_load"] = fraction
        self.tracker.log_metrics(metrics, step=self.step)
        self.tracker.flush()
        if self.cfg.sample_tokens:  # every rank decodes: the experts are everywhere
            text = self.sample(self.cfg.sample_tokens)
            record["sample"] = text
            if self.is_main:
                with (self.out / "samples.txt").open("a", encoding="utf-8") as f:
                    f.write(f"--- step {self.step}\n{text}\n")
        return record

    def save(self) -> Path:
        """Write a checkpoint (rank 0) in the single-process layout; a collective under torchrun."""
        self.tracker.flush()
        model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        rng = {"torch": encode_bytes(torch.get_rng_state())}
        if self.topo is not None:
            model_state = par.full_state_dict(self.model, self.topo)
            optimizer_state = par.full_optimizer_state(self.optimizer, self.model, self.topo)
            rng["torch_ranks"] = par.all_gather_objects(rng["torch"], self.topo)
        path = self.out / f"ckpt-{self.step:08d}"
        if self.is_main:
            path = self._write_checkpoint(model_state, optimizer_state, rng)
        if self.topo is not None:
            self.topo.wait()  # rank 0's write is not a step: no --dist-timeout on it
        return path

    def _write_checkpoint(self, model_state: dict, optimizer_state: dict, rng: dict) -> Path:
        state = {
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "rng": rng | {"data": encode_bytes(self.data_gen.get_state())},
            "history": {
                "evals": self.evals,
                "train_losses": self.train_losses,
                "expert_load": self.load_history,
                "load_since_eval": self._load_sum.tolist(),
            },
            "mlflow_run_id": self.tracker.run_id,
        }
        return save_checkpoint(
            self.out, self.step, model_state, optimizer_state, state, self.cfg.keep
        )

    def write_reports(self) -> list[Path]:
        """Plots and the config as files in the run directory, also logged as artifacts."""
        paths = [self.out / "config.json"]
        paths[0].write_text(json.dumps(self.cfg.to_dict(), indent=2))
        if self.evals:
            paths.append(plot_losses(self.evals, self.out / "loss.png"))
        if self.load_history:
            steps = [entry["step"] for entry in self.load_history]
            loads = [entry["load"] for entry in self.load_history]
            paths.append(plot_expert_load(steps, loads, self.out / "expert_load.png"))
        if (self.out / "samples.txt").exists():
            paths.append(self.out / "samples.txt")
        for path in paths:
            self.tracker.log_artifact(path)
        return paths

    def run(self, on_eval: Callable[[dict], None] | None = None) -> TrainResult:
        cfg = self.cfg
        start = self.step
        if start == 0:
            params = {k: v for k, v in cfg.to_dict().items() if k != "model"}
            self.tracker.log_params(params | self.model_config.to_dict())
        tokens_per_step = cfg.batch_size * self.model_config.block_size
        bar = _tqdm()(
            total=cfg.max_iters,
            initial=self.step,
            disable=not (cfg.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        checkpoint, status = None, "FAILED"
        try:
            if self.topo is not None:
                self.topo.wait()  # rank 0's MLflow setup is not a step: no --dist-timeout on it
            while self.step < cfg.max_iters:
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters - 1:
                    record = self.evaluate()
                    if on_eval and self.is_main:
                        on_eval(record)
                tic = time.perf_counter()
                self.train_losses.append(self.train_step())
                step_metrics = {"step_loss": self.train_losses[-1]}
                step_metrics["learning_rate"] = learning_rate(cfg, self.step)
                self.tracker.log_metrics(step_metrics, step=self.step)
                self.step += 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.train_losses[-1]:.4f}",
                    tok_s=f"{tokens_per_step / (time.perf_counter() - tic):.0f}",
                )
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_iters:
                    checkpoint = self.save()
            if self.step > start:  # the final checkpoint
                checkpoint = self.save()
            if self.is_main:
                self.write_reports()
            status = "FINISHED"
        except RuntimeError as err:
            if self.topo is None:
                raise
            raise par.rank_failure(self.topo, self.step, err, cfg.dist_timeout, self.out) from err
        finally:
            bar.close()
            self.tracker.close(status)
        return TrainResult(self.out, self.step, self.evals, self.train_losses, checkpoint)


def train(
    cfg: TrainConfig, resume: bool = False, on_eval: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train (or, with `resume`, continue) the run described by `cfg`; see `Trainer`."""
    return Trainer(cfg, resume).run(on_eval)
