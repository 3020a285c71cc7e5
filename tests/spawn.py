"""Run a function on several gloo ranks from a test: spawned processes, a file store (no port to
pick), a process-group timeout and a hard deadline, so a broken collective fails instead of
hanging CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PG_TIMEOUT_S = 60  # a collective waiting longer raises inside the ranks
DEADLINE_S = 240  # the whole run; then every rank is killed


def _entry(fn, rank: int, world_size: int, tmp: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    from moekit.parallel.comm import init_process_group
    from moekit.parallel.training import end_distributed

    out = Path(tmp)
    try:
        torch.set_num_threads(1)
        init_process_group(
            "gloo",
            init_method=f"file://{tmp}/store",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        result = fn(rank, world_size, *args)
        (out / f"result-{rank}.pkl").write_bytes(pickle.dumps(result))
        del result
        dist.barrier()  # no rank tears its connections down while another still uses them
        end_distributed()
    except BaseException:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_ranks(fn, world_size: int, *args, deadline_s: float = DEADLINE_S) -> list:
    """fn(rank, world_size, *args) on `world_size` gloo ranks; returns each rank's result.

    `fn` must be importable (defined at the top level of a module on sys.path).
    Raises AssertionError with the failing ranks' tracebacks, or on the deadline.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, tmp, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [
            f"rank {rank}:\n{(Path(tmp) / f'error-{rank}.txt').read_text()}"
            for rank in range(world_size)
            if (Path(tmp) / f"error-{rank}.txt").exists()
        ]
        assert not errors, "\n".join(errors)
        assert not hung, f"ranks {hung} still running after {deadline_s} s: killed"
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return [
            pickle.loads((Path(tmp) / f"result-{rank}.pkl").read_bytes())
            for rank in range(world_size)
        ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_0_of(argv: list[str], world_size: int, timeout_s: float) -> tuple[int, str]:
    """`python *argv` as `world_size` ranks with torchrun's environment (a free port, one thread
    each); waits for rank 0, then kills the others (a hung one too). Returns rank 0's exit code
    and stderr."""
    env = os.environ | {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1"}
    env |= {"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    try:
        _, err = ranks[0].communicate(timeout=timeout_s)
    finally:
        for rank in ranks[1:]:
            rank.kill()
            rank.wait()
    return ranks[0].returncode, err
