"""Timing and memory of one step: interleaved rounds, medians, peak bytes above the baseline."""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


class _Allocations(TorchDispatchMode):
    """The storages that ops create while the mode is on: (storage id, +bytes / -bytes) events."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def ignore(self, tensors) -> None:
        for t in tensors:
            if t is not None:
                self._seen.add(id(t.untyped_storage()))

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.events.append((key, size))
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.events.append((key, -size))
        self._seen.discard(key)

    def peak(self, exclude: set[int]) -> int:
        live = peak = 0
        for key, size in self.events:
            if key not in exclude:
                live += size
                peak = max(peak, live)
        return peak


def peak_extra_bytes(fn: Callable[[], object], existing, module: torch.nn.Module | None = None):
    """Peak bytes of the tensors that `fn()` allocates, above the tensors in `existing`.

    Counted at the dispatcher, so it works on any device: the peak over time of the storages
    that ops created and still held, temporaries included. The gradients that `fn` leaves in
    `module`'s parameters are not counted: their size is the parameters' (an MoE has E times
    its LIMIT's), a training run holds them across steps, and they say nothing of the dispatch.
    """
    gc.collect()
    gc.disable()  # frees happen when the last reference goes, not when a collection runs
    try:
        with _Allocations() as mode:
            mode.ignore(existing)
            fn()
    finally:
        gc.enable()
    grads = [] if module is None else [p.grad for p in module.parameters() if p.grad is not None]
    return mode.peak(exclude={id(g.untyped_storage()) for g in grads})
