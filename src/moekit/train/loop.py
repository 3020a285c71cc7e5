"""The training loop every trainer runs: `run(job)`.

    job.micro_batches(K) -> (this rank's K micro-batches, the global batch's supervised count)
    per micro-batch:  job.forward_backward(micro, scale, aux_scale, sync)   sums, detached
    job.finish_grads() -> the global gradient norm (expert shards synced)
    one host read a step: the global loss sums and the norm; a non-finite one stops it here,
    before the optimizer touches the weights; then clipping, the lr of the schedule, the step,
    job.after_step() (the router-bias update); on the CPU the step's freed memory handed
    back to the system where it is large (`_memory.trim_host_memory`; after loading on every
    device)

The loss of a step is the sum of the token losses over the supervised tokens of the whole
global batch divided by their number: every micro-batch's summed loss is scaled by
N / (global count) before its backward (DDP and FSDP2 average the N ranks' gradients), so
a step is the same update at any --grad-accum and any number of ranks. The auxiliary loss
is a mean over the micro-batches.

Cadence: an evaluation before the first step of a new run, every `eval_interval` steps and
after the last; a checkpoint every `save_every` steps and after the last (the job writes it,
the loop gives the JSON state: step, history, health, RNG streams, the MLflow run). Rank 0
alone tracks, prints and plots; a failure under torchrun ends in one line per rank
(`parallel.training.rank_failure`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .._extras import require
from .._memory import STEP_TRIM_BYTES, trim_host_memory
from ..parallel import training as par
from .config import RunConfig, learning_rate
from .files import decode_bytes, encode_bytes
from .health import RouterHealth
from .tracking import make_tracker

log = logging.getLogger(__name__)

RUNTIME_VERSION = 1  # the layout of the loop's state in a checkpoint


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; raised before the optimizer touches the weights."""


class Job(Protocol):
    """What a trainer gives the loop (see the module docstring)."""

    cfg: RunConfig
    topo: par.Topology
    out: Path
    optimizer: torch.optim.Optimizer
    resumed: dict | None  # the loop state of the checkpoint the job restored, if any

    def steps_per_epoch(self) -> int: ...
    def params(self) -> dict: ...  # logged once, at the start of a run
    def micro_batches(self, k: int) -> tuple[list[Any], int]: ...
    def forward_backward(
        self, micro: Any, scale: float, aux_scale: float, sync: bool
    ) -> torch.Tensor: ...  # [2] (summed token loss, aux loss), detached
    def finish_grads(self) -> torch.Tensor: ...  # the global gradient norm
    def after_step(self) -> None: ...
    def router_load(self) -> torch.Tensor | None: ...  # [L, E] global counts since last call
    def evaluate(self) -> dict[str, float]: ...  # {"val_loss", ...}; every rank calls it
    def state(self) -> dict: ...  # JSON: the job's streams (data position, generator)
    def save(self, step: int, state: dict) -> Path: ...  # a collective
    def finish(self) -> list[Path]: ...  # final model / adapter / samples; a collective
    def reports(self) -> list[Path]: ...  # the job's own report files (rank 0)


@dataclass
class RunResult:
    out: Path
    step: int
    evals: list[dict] = field(default_factory=list)  # [{"step", "val_loss", "train_loss", ...}]
    train_losses: list[float] = field(default_factory=list)  # every step's loss
    checkpoint: Path | None = None
    final: list[Path] = field(default_factory=list)
    is_main: bool = True


def check_batch(cfg: RunConfig, topo: par.Topology) -> None:
    """--batch-size (global rows) splits evenly over the ranks, and each rank's rows over the
    --grad-accum micro-batches (one line, from rank 0 alone under torchrun)."""
    world = topo.world_size
    if cfg.batch_size % world:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be divisible by the number of ranks {world} "
            "(each rank takes an equal slice of the global batch)"
        )
    if (cfg.batch_size // world) % cfg.grad_accum:
        raise ValueError(
            f"--grad-accum {cfg.grad_accum} must divide each rank's rows "
            f"(--batch-size {cfg.batch_size} / {world} ranks = {cfg.batch_size // world})"
        )


def total_steps(cfg: RunConfig, job: Job) -> int:
    """--steps, or --epochs passes over the training data."""
    if cfg.epochs is None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * job.steps_per_epoch()))


def start_state(step: int, torch_rng: str, job: dict, evals=(), train_losses=()) -> dict:
    """The loop state of a run that starts from converted weights at `step` (one rank's
    `torch_rng`, base64): what `moekit upcycle` and `import-makemoe` write."""
    return {
        "runtime": RUNTIME_VERSION,
        "step": step,
        "evals": list(evals),
        "train_losses": list(train_losses),
        "since_eval": [],
        "health": {"history": []},
        "rng": {"torch_ranks": [torch_rng]},
        "job": job,
        "mlflow_run_id": None,  # the next run starts its own in the new directory's store
        "world_size": 1,
        "expert_parallel": 1,
    }


class Loop:
    """One run's bookkeeping around a job: history, health, tracker, RNG streams."""

    def __init__(self, job: Job) -> None:
        self.job, self.cfg, self.topo = job, job.cfg, job.topo
        self.total = total_steps(self.cfg, job)
        self.step, self.evals, self.train_losses = 0, [], []
        self.health = RouterHealth(self.cfg.collapse_ratio, self.cfg.collapse_evals)
        self._since_eval: list[float] = []  # step losses since the last evaluation
        run_id = self._restore(job.resumed) if job.resumed is not None else None
        track = self.cfg.track and self.topo.is_main
        self.tracker = make_tracker(
            track, job.out, self.cfg.experiment, self.cfg.tracking_uri, run_id
        )
        trim_host_memory()  # what loading freed (the files' reads, full-precision experts)

    # --- state --------------------------------------------------------------------------
    def state(self) -> dict:
        rng = encode_bytes(torch.get_rng_state())
        return {
            "runtime": RUNTIME_VERSION,
            "step": self.step,
            "evals": self.evals,
            "train_losses": self.train_losses,
            "since_eval": self._since_eval,
            "health": self.health.state(),
            "rng": {"torch_ranks": par.all_gather_objects(rng, self.topo)},
            "job": self.job.state(),
            "mlflow_run_id": self.tracker.run_id,
            "world_size": self.topo.world_size,
            "expert_parallel": self.topo.expert_parallel,
        }

    def _restore(self, state: dict) -> str | None:
        self.step = int(state["step"])
        self.evals, self.train_losses = state["evals"], state["train_losses"]
        self._since_eval = state.get("since_eval", [])
        self.health.restore(state["health"])
        ranks = state["rng"]["torch_ranks"]
        if len(ranks) == self.topo.world_size:  # bitwise: each rank its own stream
            torch.set_rng_state(decode_bytes(ranks[self.topo.rank]))
        else:
            log.warning(
                "--resume: the checkpoint was written by %d rank(s), this run has %d: dropout "
                "and routing noise draw from fresh per-rank streams",
                len(ranks),
                self.topo.world_size,
            )
            torch.manual_seed(par.rank_seed(self.cfg.seed, self.topo.rank, self.step))
        return state.get("mlflow_run_id")

    # --- one step -----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step (see the module docstring); returns its metrics."""
        job, cfg, topo = self.job, self.cfg, self.topo
        micros, targets = job.micro_batches(cfg.grad_accum)
        scale = topo.world_size / max(targets, 1)  # DDP/FSDP2 average over the N ranks
        lr = learning_rate(cfg, self.step, self.total)
        for group in job.optimizer.param_groups:
            group["lr"] = lr
        job.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64, device=topo.device)  # on the device: no sync
        for i, micro in enumerate(micros):
            last = i == len(micros) - 1
            sums = sums + job.forward_backward(micro, scale, 1.0 / len(micros), last).to(sums)
        norm = job.finish_grads()
        summed = par.all_reduce_sum([sums], topo.data_group)[0]
        host = torch.cat([summed.double().cpu(), norm.reshape(1).double().cpu()])
        loss_sum, aux_sum, norm_value = host.tolist()
        loss = loss_sum / max(targets, 1)
        aux = aux_sum / (topo.world_size * len(micros))  # the mean over micro-batches, ranks
        if not math.isfinite(loss + aux):
            raise NonFiniteError(f"step {self.step}: non-finite loss {loss + aux}")
        if not math.isfinite(norm_value):
            raise NonFiniteError(f"step {self.step}: non-finite gradient norm {norm_value}")
        if cfg.grad_clip > 0 and norm_value > cfg.grad_clip:  # a host number: DTensors too
            coef = cfg.grad_clip / (norm_value + 1e-6)
            for group in job.optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.mul_(coef)
        job.optimizer.step()
        job.after_step()
        if topo.device.type == "cpu":  # the step's freed activations, if many (`_memory`)
            trim_host_memory(STEP_TRIM_BYTES)
        metrics = {"loss": loss, "grad_norm": norm_value, "learning_rate": lr}
        if aux_sum:
            metrics["aux_loss"] = aux
        return metrics

    def evaluate(self) -> dict:
        record = {"step": self.step, **self.job.evaluate()}
        if self._since_eval:
            record["train_loss"] = sum(self._since_eval) / len(self._since_eval)
            self._since_eval = []
        metrics = {k: v for k, v in record.items() if k not in ("step", "sample")}
        health = self.health.report(self.job.router_load(), self.step)
        metrics |= health
        record |= {k: v for k, v in health.items() if "_expert" not in k}  # per layer
        self.evals.append(record)
        self.tracker.log_metrics(metrics, step=self.step)
        self.tracker.flush()
        return record

    def save(self) -> Path:
        self.tracker.flush()
        return self.job.save(self.step, self.state())

    # --- the run ------------------------------------------------------------------------
    def run(self, on_eval: Callable[[dict], None] | None = None) -> RunResult:
        cfg, topo, job = self.cfg, self.topo, self.job
        start = self.step
        if start == 0:
            self.tracker.log_params(job.params())
        tqdm = require("tqdm.auto", "train", "The progress bar").tqdm
        show = cfg.progress and topo.is_main
        bar = tqdm(
            total=self.total, initial=self.step, disable=not show, unit="step", dynamic_ncols=True
        )

        def evaluate() -> None:
            record = self.evaluate()
            if topo.is_main:
                (on_eval or _eval_line(bar, show))(record)

        checkpoint, final, status = None, [], "FAILED"
        try:
            topo.wait()  # rank 0's MLflow setup is not a step: no --dist-timeout on it
            if self.step == 0:
                evaluate()
            while self.step < self.total:
                tic = time.perf_counter()
                metrics = self.train_step()
                metrics["step_seconds"] = time.perf_counter() - tic
                self.train_losses.append(metrics["loss"])
                self._since_eval.append(metrics["loss"])
                self.step += 1
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.step % cfg.eval_interval == 0 or self.step == self.total:
                    evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                    checkpoint = self.save()
            if self.step > start:  # the final checkpoint
                checkpoint = self.save()
            final = job.finish()
            if topo.is_main:
                for path in self._reports():
                    self.tracker.log_artifact(path)
            topo.wait()
            status = "FINISHED"
        except RuntimeError as err:
            if not topo.distributed:
                raise
            raise par.rank_failure(topo, self.step, err, cfg.dist_timeout, job.out) from err
        finally:
            bar.close()
            self.tracker.close(status)
        return RunResult(
            job.out, self.step, self.evals, self.train_losses, checkpoint, final, topo.is_main
        )

    def _reports(self) -> list[Path]:
        from .plots import plot_expert_load, plot_losses, plot_routing_overlap

        out = self.job.out
        paths = list(self.job.reports())
        evals = [e for e in self.evals if "train_loss" in e and "val_loss" in e]
        if evals:
            paths.append(plot_losses(evals, out / "loss.png"))
        if self.health.history:
            steps = [entry["step"] for entry in self.health.history]
            loads = [entry["load"] for entry in self.health.history]
            paths.append(plot_expert_load(steps, loads, out / "expert_load.png"))
        drift = [e for e in self.evals if "routing_overlap" in e]
        if drift:
            paths.append(plot_routing_overlap(drift, out / "routing_overlap.png"))
        return paths


def _eval_line(bar, show: bool) -> Callable[[dict], None]:
    """The default report of an evaluation: one line, with or without the progress bar."""

    def report(record: dict) -> None:
        line = f"step {record['step']}: val loss {record['val_loss']:.4f}"
        if "train_loss" in record:
            line = (
                f"step {record['step']}: train loss {record['train_loss']:.4f}, "
                + line[len(f"step {record['step']}: ") :]
            )
        if show:
            bar.write(line)
        else:
            log.info("%s", line)

    return report


def run(job: Job, on_eval: Callable[[dict], None] | None = None) -> RunResult:
    """Train `job` from its step (0, or the resumed checkpoint's) to the end of the run."""
    return Loop(job).run(on_eval)
