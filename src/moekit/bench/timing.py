"""Timing and memory of one step: interleaved rounds, medians, peak bytes above the baseline."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    cases: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 2,
    iters: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Median milliseconds per call of each case.

    Every round runs each case `iters` times in turn, so slow phases of a shared machine hit all
    cases alike; the median over rounds drops the outliers.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            _sync(device)
            tic = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - tic) / iters * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hide what C++ writes to fd 2 meanwhile: the profiler's start/stop lines and the
    allocator's note on blocks from before it started (the step itself already ran unprofiled
    in the timing rounds, so nothing of its own is lost)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _memory_events(prof, device: torch.device) -> list[tuple[int, int]]:
    """(address, +bytes / -bytes) of every allocator event on `device`, in the order they
    happened. The Chrome trace is the profiler's one export that carries the addresses."""
    device_type = 1 if device.type == "cuda" else 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)["traceEvents"]
    events = [
        e["args"]
        for e in trace
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == device_type
    ]
    events.sort(key=lambda a: a["Ev Idx"])
    return [(int(a["Addr"]), int(a["Bytes"])) for a in events]


def _peak(events: list[tuple[int, int]], skip: set[int]) -> int:
    """Peak of the bytes alive, counting only blocks allocated in `events`; for an address in
    `skip`, its last allocation (the block still alive at the end) is left out."""
    last = {addr: i for i, (addr, size) in enumerate(events) if size > 0 and addr in skip}
    skipped = set(last.values())
    alive: dict[int, int] = {}
    live = peak = 0
    for i, (addr, size) in enumerate(events):
        if size > 0 and i not in skipped:
            alive[addr] = size
            live += size
            peak = max(peak, live)
        elif size < 0 and addr in alive:  # frees of blocks from before the call: not ours
            live -= alive.pop(addr)
    return peak


def peak_extra_bytes(
    fn: Callable[[], object],
    module: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> int:
    """Peak bytes that `fn()` allocates on `device` and holds at once, above what existed before.

    Read from the allocator's own events (torch.profiler with `profile_memory=True`), so it is
    exact and repeatable, temporaries inside kernels included. Blocks that existed before the
    call are not counted, nor is their release: the baseline is what existed. The gradients that
    `fn` leaves in `module`'s parameters are not counted either: their size is the parameters'
    (an MoE has E times its LIMIT's), a training run holds them across steps, and they say
    nothing of the dispatch.
    """
    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with _quiet_stderr():
        with profile(activities=activities, profile_memory=True) as prof:
            fn()
            _sync(device)
        events = _memory_events(prof, device)
    params = [] if module is None else list(module.parameters())
    grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    return _peak(events, grads)
