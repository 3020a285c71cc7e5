"""One rank of a distributed training run, launched by test_parallel_train.py (torchrun or plain
processes with RANK/WORLD_SIZE set).

    python ep_train_job.py CONFIG_JSON [--resume] [--logits FILE] [--fault kill|hang --at STEP]

Trains `build_config("tiny", **CONFIG_JSON)`; with --logits, every rank then runs the trained
expert-parallel model on a fixed batch and rank 0 saves the logits; with --fault, rank 1 kills
or stops itself when it reaches step STEP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

from moekit.lm.config import build_config
from moekit.lm.train import LMJob
from moekit.parallel.training import end_distributed
from moekit.train.loop import Loop


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--logits")
    parser.add_argument("--fault", choices=("kill", "hang"))
    parser.add_argument("--at", type=int, default=5)
    args = parser.parse_args()
    cfg = build_config("tiny", None, **json.loads(args.config))
    job = LMJob(cfg, resume=args.resume)
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
    if args.logits:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, job.model_config.vocab_size, (4, 16), generator=gen)
        job.model.eval()
        with torch.no_grad():
            logits = job.model(idx)[0]
        if job.is_main:
            torch.save({"idx": idx, "logits": logits}, args.logits)
    job = trainer = None  # the run's groups go with it
    end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
