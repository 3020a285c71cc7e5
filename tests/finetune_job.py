"""One rank of distributed fine-tunes, launched by test_finetune_parallel.py (torchrun, or plain
processes with RANK/WORLD_SIZE set): several runs in one launch, one process group.

    python finetune_job.py RUNS_JSON

RUNS_JSON: a list of {"config": FinetuneConfig's fields, "resume": bool, "shards": bool,
"fault": {"rank": r, "at": step, "kind": "kill" | "hang"}}. With "shards", every rank writes
its expert shards as built (before any step) to <out>/shards-<rank>.safetensors with their
first expert index; with "fault", rank r writes the time to <out>/fault-time and kills or stops
itself when it reaches that step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moekit.hf.finetune import FinetuneConfig, FinetuneJob
from moekit.parallel.training import end_distributed
from moekit.train.loop import Loop


def write_shards(tuner: FinetuneJob) -> None:
    experts = tuner.sharded.experts
    params = dict(tuner.model.named_parameters())
    tensors = {name: params[name].detach().contiguous() for name in experts}
    firsts = {name: str(first) for name, (first, _) in experts.items()}
    save_file(tensors, f"{tuner.out}/shards-{tuner.topo.rank}.safetensors", metadata=firsts)


def inject(tuner: Loop, fault: dict) -> None:
    if tuner.topo.rank != fault["rank"]:
        return
    step_fn = tuner.train_step

    def faulty_step():
        if tuner.step == fault["at"]:
            (tuner.job.out / "fault-time").write_text(repr(time.time()))
            sig = signal.SIGKILL if fault["kind"] == "kill" else signal.SIGSTOP
            os.kill(os.getpid(), sig)
        return step_fn()

    tuner.train_step = faulty_step


def main() -> int:
    torch.set_num_threads(1)
    for run in json.loads(sys.argv[1]):
        fields = dict(run["config"])
        if "lora_targets" in fields:
            fields["lora_targets"] = tuple(fields["lora_targets"])
        job = FinetuneJob(FinetuneConfig(**fields), resume=run.get("resume", False))
        if run.get("shards"):
            write_shards(job)
        tuner = Loop(job)
        if run.get("fault"):
            inject(tuner, run["fault"])
        try:
            tuner.run()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    dist.barrier()
    del job, tuner
    end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
