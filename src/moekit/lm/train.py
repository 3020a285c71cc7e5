"""`moekit train`: the makeMoE language model as a job of the shared loop (`train.loop`).

    train(cfg, resume=False, on_eval=None) -> RunResult

The job: random windows of the text (`lm.data.TokenData`, a generator the checkpoint
carries) -> the model's cross-entropy (every token supervised) + its MoE layers' aux losses.
The loop does the rest: accumulation, the non-finite guard, clipping, the schedule, cadence,
MLflow, plots, the checkpoints the job writes. Each evaluation is makeMoE's estimate_loss
(mean cross-entropy over `eval_batches` batches of each split, eval mode: `val_loss`, and
`train_split_loss` on the training split), per-layer router entropy, a text sample. On CPU a
resumed run is bitwise identical to an uninterrupted one.

Under torchrun (N ranks, `expert_parallel` R): every rank draws the same global batch and takes
its slice; the experts are shared out over groups of R ranks (`moekit.parallel`), dense
gradients averaged by DDP, expert gradients summed over replicas / N; losses, counts and the
router bias are global, so the run follows the single-process one. Rank 0 alone writes
checkpoints, in the single-process layout (experts gathered): they load in one process and
resume at any R.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from .._device import fast_bfloat16
from .._extras import require
from ..parallel import expert_parallel, sharded_parameters
from ..parallel import training as par
from ..routing import update_router_biases
from ..train.files import (
    CheckpointError,
    decode_bytes,
    encode_bytes,
    latest_checkpoint,
    prepare_run_dir,
    save_checkpoint,
)
from ..train.loop import NonFiniteError, RunResult, check_batch, run
from ..train.plots import pyplot
from ..train.tracking import check_server
from .config import TrainConfig
from .data import TokenData, build_tokenizer, load_text, tokenizer_from_dict
from .model import LMConfig, SparseMoELanguageModel

__all__ = ["LMJob", "NonFiniteError", "RunResult", "make_optimizer", "train"]

log = logging.getLogger(__name__)

_EVAL_CHUNK = 8  # evaluation batches per forward


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where the device has the kernel (one pass over all tensors), else foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def _tqdm():
    """tqdm.auto's progress bar class (a widget in notebooks)."""
    return require("tqdm.auto", "train", "The progress bar").tqdm


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


class LMJob:
    """The language model's part of a run (`train.loop.Job`): data, model, optimizer, the
    single-file checkpoints."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        if cfg.data is not None:  # absolute, so `moekit eval` finds it from anywhere
            cfg = replace(cfg, data=str(Path(cfg.data).resolve()))
        self.cfg = cfg
        # optional packages imported now, so a missing extra stops the run before any work
        _tqdm()
        pyplot()  # used at the end of the run, for the plots
        self.topo = par.init_distributed(cfg.expert_parallel, cfg.device, cfg.dist_timeout)
        self.is_main = self.topo.is_main
        check_batch(cfg, self.topo)
        if cfg.track and cfg.tracking_uri and self.topo.is_main:  # before the model: seconds
            check_server(cfg.tracking_uri)
        self.out = Path(cfg.out)
        prepare_run_dir(self.out, resume, cfg.overwrite)
        self.device = self.topo.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        checkpoint = latest_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            log.warning("--resume: no valid checkpoint in %s, starting from scratch", self.out)
        self.resumed = None if checkpoint is None else _loop_state(checkpoint)
        # 1. data and tokenizer (the checkpoint's tokenizer wins on resume)
        text = load_text(cfg.data)
        if checkpoint is not None:
            self.tokenizer = tokenizer_from_dict(checkpoint.state["tokenizer"])
        else:
            self.tokenizer = build_tokenizer(cfg.tokenizer, text, cfg.bpe_vocab_size)
        self.model_config = replace(cfg.model, vocab_size=self.tokenizer.vocab_size)
        self.data = TokenData.from_ids(self.tokenizer.encode(text), self.model_config.block_size)
        del text
        # 2. model, optimizer, random streams
        if cfg.dtype == "bfloat16" and not fast_bfloat16(self.device):
            log.warning(
                "--dtype bfloat16: this CPU has no native bf16 GEMM (AVX-512 BF16 or AMX); "
                "its matmuls fall back to a reference kernel ~200x slower than float32"
            )
        torch.manual_seed(cfg.seed)
        self.model = SparseMoELanguageModel.from_config(self.model_config).to(self.device)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if checkpoint is not None:
            self._load_model(checkpoint)  # the single-process layout, before sharding
        self.step_model = self.model  # what the training step calls: the model, or its DDP
        if self.topo.distributed:
            expert_parallel(self.model, self.topo.ep_group, data_group=self.topo.data_group)
            self.step_model = _wrap_ddp(self.model, self.topo)
            torch.manual_seed(par.rank_seed(cfg.seed, self.topo.rank))  # own dropout, noise draws
        if cfg.compile:  # the forward and backward; the optimizer and logging stay eager
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.step_model = torch.compile(self.step_model, mode=mode)
        self.optimizer = make_optimizer(self.model, cfg)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0 if checkpoint is None else checkpoint.step  # the evaluations' seeds
        self._load_sum = torch.zeros(
            self.model_config.n_layer, self.model_config.num_experts, device=self.device
        )
        if checkpoint is not None:
            self._restore(checkpoint)

    def _load_model(self, checkpoint) -> None:
        saved = LMConfig.from_dict(checkpoint.state["model_config"])
        if saved != self.model_config:
            raise ValueError(
                f"--resume: the checkpoint in {self.out} has model config {saved}, "
                f"which differs from the requested {self.model_config}"
            )
        self.model.load_state_dict(checkpoint.model)

    def _restore(self, checkpoint) -> None:
        # this rank's rows of the experts' moments, read from the file alone
        self.optimizer.load_state_dict(checkpoint.optimizer_slices(par.expert_rows(self.model)))
        self.data_gen.set_state(decode_bytes(self.resumed["job"]["data"]))
        self._load_sum += torch.tensor(self.resumed["job"]["load_since_eval"], device=self.device)
        log.info("resumed from %s at step %d", checkpoint.path, checkpoint.step)

    # --- the job's steps ----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        """Steps whose windows hold as many tokens as the training split."""
        tokens = self.cfg.batch_size * self.model_config.block_size
        return max(1, len(self.data.train) // tokens)

    def params(self) -> dict:
        return {k: v for k, v in self.cfg.to_dict().items() if k != "model"} | (
            self.model_config.to_dict()
        )

    def _autocast(self):
        enabled = self.cfg.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _my_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of a global batch [B, T] (all of it in one process)."""
        rows = t.shape[0] // self.topo.world_size
        return t[self.topo.rank * rows : (self.topo.rank + 1) * rows]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch to the device; to CUDA from pinned memory, asynchronously (a copy from
        pageable memory makes the host wait for the GPU: two syncs a step)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def micro_batches(self, k: int) -> tuple[list, int]:
        """This rank's rows of the next global batch in `k` micro-batches of (x, y) [b, T];
        every token is a target: the global count is B * T."""
        cfg, block_size = self.cfg, self.model_config.block_size
        x, y = self.data.batch("train", cfg.batch_size, block_size, self.data_gen)
        x, y = self._to_device(self._my_rows(x)), self._to_device(self._my_rows(y))
        return list(zip(x.chunk(k), y.chunk(k), strict=True)), cfg.batch_size * block_size

    def forward_backward(self, micro, scale: float, aux_scale: float, sync: bool) -> torch.Tensor:
        x, y = micro
        no_sync = getattr(self.step_model, "no_sync", None)
        context = no_sync() if no_sync is not None and not sync else contextlib.nullcontext()
        with context:
            with self._autocast():
                _, loss = self.step_model(x, y)  # the mean over the micro-batch's tokens
                aux = self.model.aux_loss()
            # the statistics are computed from forward tensors: before the backward, which a
            # compiled model may run in buffers of its forward
            loads = torch.stack([m.stats.tokens_per_expert for m in self.model.moe_layers()])
            self._load_sum += loads.to(self._load_sum.dtype)  # [L, E]
            (loss * (x.numel() * scale) + aux * aux_scale).backward()
        return torch.stack([loss.detach().float() * x.numel(), aux.detach().float()])

    def finish_grads(self) -> torch.Tensor:
        par.sync_expert_grads(self.model, self.topo)
        return par.grad_norm(self.model, self.topo)

    def after_step(self) -> None:
        update_router_biases(self.model, self.topo.data_group)
        self.step += 1

    def router_load(self) -> torch.Tensor | None:
        load = self._load_sum.cpu().clone()  # [L, E] (.cpu() of a CPU tensor is itself)
        self._load_sum.zero_()
        return load if load.sum() > 0 else None

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """makeMoE's estimate_loss: mean CE over `eval_batches` batches of each split, eval
        mode.

        The batches come from a generator seeded by the step, so evaluating never moves the
        training batch stream; they run `_EVAL_CHUNK` to a forward. Under torchrun each rank
        takes a slice of every chunk. A progress line counts the batches.
        """
        cfg, model = self.cfg, self.model
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        block_size = self.model_config.block_size
        bar = _tqdm()(
            total=2 * cfg.eval_batches,
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
                    split, cfg.batch_size, block_size, cfg.eval_batches, gen, _EVAL_CHUNK
                )
                for n, x, y in chunks:
                    x, y = self._my_rows(x).to(self.device), self._my_rows(y).to(self.device)
                    with self._autocast():
                        loss = par.all_reduce_mean(model(x, y)[1].float(), self.topo)
                    total += loss.item() * n
                    bar.update(n)
                result[split] = total / cfg.eval_batches
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
        record = {"val_loss": losses["val"], "train_split_loss": losses["train"]}
        for i, layer in enumerate(self.model.moe_layers()):
            record[f"layer{i}_router_entropy"] = float(layer.stats.router_entropy)
        if self.cfg.sample_tokens:  # every rank decodes: the experts are everywhere
            text = self.sample(self.cfg.sample_tokens)
            record["sample"] = text
            if self.is_main:
                with (self.out / "samples.txt").open("a", encoding="utf-8") as f:
                    f.write(f"--- step {self.step}\n{text}\n")
        return record

    # --- checkpoints and reports ----------------------------------------------------------
    def state(self) -> dict:
        return {
            "data": encode_bytes(self.data_gen.get_state()),
            "load_since_eval": self._load_sum.cpu().tolist(),
        }

    def save(self, step: int, state: dict) -> Path:
        """Write a checkpoint (rank 0) in the single-process layout; a collective under
        torchrun."""
        model_state = par.full_state_dict(self.model, self.topo)
        optimizer_state = par.full_optimizer_state(self.optimizer, self.model, self.topo)
        path = self.out / f"ckpt-{step:08d}"
        if self.is_main:
            saved = {
                "train_config": self.cfg.to_dict(),
                "model_config": self.model_config.to_dict(),
                "tokenizer": self.tokenizer.to_dict(),
                "loop": state,
            }
            path = save_checkpoint(
                self.out, step, model_state, optimizer_state, saved, self.cfg.keep
            )
        self.topo.wait()  # rank 0's write is not a step: no --dist-timeout on it
        return path

    def finish(self) -> list[Path]:
        return []

    def reports(self) -> list[Path]:
        """The config and the samples as files in the run directory (logged as artifacts)."""
        paths = [self.out / "config.json"]
        paths[0].write_text(json.dumps(self.cfg.to_dict(), indent=2))
        if (self.out / "samples.txt").exists():
            paths.append(self.out / "samples.txt")
        return paths


def _loop_state(checkpoint) -> dict:
    """The loop's state in a checkpoint; one written before the shared runtime is refused."""
    state = checkpoint.state.get("loop")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"--resume: {checkpoint.path} was written by an older moekit train (no run state "
            "of the shared training runtime); `moekit generate` and `eval` still read it, but "
            "a run continues only in a new --out (upcycle or import it there)"
        )
    return state


def train(
    cfg: TrainConfig, resume: bool = False, on_eval: Callable[[dict], None] | None = None
) -> RunResult:
    """Train (or, with `resume`, continue) the run described by `cfg` (see the module
    docstring)."""
    return run(LMJob(cfg, resume), on_eval)
