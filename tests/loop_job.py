"""A toy job of the shared training loop (`moekit.train.loop.Job`), and one rank of it under
torchrun's environment, launched by test_loop.py's dead/hung-rank test.

    python loop_job.py CONFIG_JSON [--job JOB_JSON] [--resume] [--fault kill|hang --at STEP]

The job: masked linear regression in float64. A global batch is B rows of T positions,
x [B, T, d] and y [B, T] = x @ w* + noise, drawn from the job's own generator; row r
supervises its first `supervised[r % len(supervised)]` positions (mask [B, T]), so the
micro-batches hold different numbers of targets, some none. Token loss (x·w + b - y)²; the
auxiliary loss is `aux_coef * |w|²` (the same in every micro-batch). Under torchrun every
rank draws the same global batch and takes its slice; `finish_grads` averages the gradients
over the ranks, as DDP would. The router load is a fake [L, E] count of argmax(x @ P_l).
As a script: CONFIG_JSON holds RunConfig's fields, JOB_JSON ToyJob's keyword arguments; with
--fault, rank 1 kills or stops itself when the loop reaches step STEP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from moekit.parallel import training as par
from moekit.train.config import RunConfig
from moekit.train.files import (
    decode_bytes,
    encode_bytes,
    latest_checkpoint,
    prepare_run_dir,
    save_checkpoint,
)
from moekit.train.loop import Loop, check_batch

D_IN = 3  # d
LAYERS, EXPERTS = 2, 4  # L, E of the fake router load
TRUE_SEED, VAL_SEED, ROUTER_SEED = 1234, 999, 77


class ToyJob:
    """Masked float64 linear regression as a `train.loop.Job` (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        resume: bool = False,
        *,
        positions: int = 6,
        supervised: tuple[int, ...] = (6, 2, 0, 5),
        optimizer: str = "adamw",
        noise: float = 0.0,
        aux_coef: float = 1e-2,
        epoch_steps: int = 4,
    ) -> None:
        self.cfg, self.T, self.supervised = cfg, positions, supervised
        self.noise, self.aux_coef, self.epoch_steps = noise, aux_coef, epoch_steps
        self.topo = par.init_distributed(1, "cpu", cfg.dist_timeout)
        check_batch(cfg, self.topo)
        self.out = Path(cfg.out)
        prepare_run_dir(self.out, resume, cfg.overwrite)
        checkpoint = latest_checkpoint(self.out) if resume else None
        self.resumed = None if checkpoint is None else checkpoint.state["loop"]
        f64 = torch.float64
        self.true_w = torch.randn(
            D_IN, generator=torch.Generator().manual_seed(TRUE_SEED), dtype=f64
        )
        router_gen = torch.Generator().manual_seed(ROUTER_SEED)
        self.router = torch.randn(LAYERS, D_IN, EXPERTS, generator=router_gen, dtype=f64)
        torch.manual_seed(cfg.seed)
        self.model = torch.nn.Linear(D_IN, 1, dtype=f64)
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        else:
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
            )
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.load = torch.zeros(LAYERS, EXPERTS, dtype=f64)  # [L, E] since the last evaluation
        self.step = 0
        self.lrs: list[float] = []  # the lr each optimizer step ran with
        self.saved: list[int] = []  # steps of the checkpoints written
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.data_gen.set_state(decode_bytes(self.resumed["job"]["data"]))
            self.load = torch.tensor(self.resumed["job"]["load"], dtype=f64)
            self.step = checkpoint.step
        if self.topo.distributed:
            torch.manual_seed(par.rank_seed(cfg.seed, self.topo.rank))

    # --- data ---------------------------------------------------------------------------
    def global_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next global batch: x [B, T, d], y [B, T], mask [B, T] (bool)."""
        rows, f64 = self.cfg.batch_size, torch.float64
        x = torch.randn(rows, self.T, D_IN, generator=self.data_gen, dtype=f64)  # [B, T, d]
        y = x @ self.true_w + 0.1 * torch.randn(rows, self.T, generator=self.data_gen, dtype=f64)
        counts = torch.tensor([self.supervised[r % len(self.supervised)] for r in range(rows)])
        mask = torch.arange(self.T) < counts[:, None]  # [B, T]
        return x, y, mask

    def micro_batches(self, k: int) -> tuple[list, int]:
        x, y, mask = self.global_batch()
        targets = int(mask.sum())  # over the global batch: every rank's rows
        rows = x.shape[0] // self.topo.world_size
        mine = slice(self.topo.rank * rows, (self.topo.rank + 1) * rows)
        micros = zip(x[mine].chunk(k), y[mine].chunk(k), mask[mine].chunk(k), strict=True)
        return list(micros), targets

    # --- the step -----------------------------------------------------------------------
    def token_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.model(x).squeeze(-1) - y).square()  # [b, T]

    def aux_loss(self) -> torch.Tensor:
        return self.aux_coef * self.model.weight.square().sum()

    def forward_backward(self, micro, scale: float, aux_scale: float, sync: bool) -> torch.Tensor:
        x, y, mask = micro
        if self.noise:  # dropout on the inputs: the global torch stream, as a model's dropout
            keep = (torch.rand_like(x) > self.noise).to(x.dtype)
            x = x * keep / (1 - self.noise)
        summed = self.token_losses(x, y)[mask].sum()
        aux = self.aux_loss()
        (summed * scale + aux * aux_scale).backward()
        for layer in range(LAYERS):
            expert = (x @ self.router[layer]).argmax(-1)  # [b, T]
            self.load[layer] += torch.bincount(expert.flatten(), minlength=EXPERTS)
        return torch.stack([summed.detach(), aux.detach()])

    def finish_grads(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        par.average_grads(grads, self.topo.data_group, self.topo.world_size)  # DDP's mean
        return torch.nn.utils.get_total_norm(grads)

    def after_step(self) -> None:
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.step += 1

    def router_load(self) -> torch.Tensor | None:
        load = par.all_reduce_sum([self.load], self.topo.data_group)[0]  # [L, E]
        self.load.zero_()
        return load if load.sum() > 0 else None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        gen = torch.Generator().manual_seed(VAL_SEED)  # never moves the training stream
        x = torch.randn(16, self.T, D_IN, generator=gen, dtype=torch.float64)
        y = x @ self.true_w
        return {"val_loss": float(self.token_losses(x, y).mean())}

    # --- run bookkeeping ----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.epoch_steps

    def params(self) -> dict:
        return self.cfg.to_dict()

    def state(self) -> dict:
        return {"data": encode_bytes(self.data_gen.get_state()), "load": self.load.tolist()}

    def save(self, step: int, state: dict) -> Path:
        path = self.out / f"ckpt-{step:08d}"
        if self.topo.is_main:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
            path = save_checkpoint(self.out, step, model, optimizer, {"loop": state}, self.cfg.keep)
        self.topo.wait()
        self.saved.append(step)
        return path

    def finish(self) -> list[Path]:
        path = self.out / "final.pt"
        if self.topo.is_main:
            torch.save(self.model.state_dict(), path)
        self.topo.wait()
        return [path]

    def reports(self) -> list[Path]:
        path = self.out / "toy.json"
        path.write_text(json.dumps({"step": self.step}))
        return [path]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--job", default="{}")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fault", choices=("kill", "hang"))
    parser.add_argument("--at", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kwargs = json.loads(args.job)
    if "supervised" in kwargs:
        kwargs["supervised"] = tuple(kwargs["supervised"])
    job = ToyJob(RunConfig(**json.loads(args.config)), resume=args.resume, **kwargs)
    trainer = Loop(job)
    if args.fault and job.topo.rank == 1:
        step_fn = trainer.train_step

        def faulty_step():
            if trainer.step == args.at:
                sig = signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP
                os.kill(os.getpid(), sig)
            return step_fn()

        trainer.train_step = faulty_step
    try:
        trainer.run()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    job = trainer = None  # the run's groups go with it
    par.end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
