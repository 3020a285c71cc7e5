"""Next-token logits along a growing sequence, for `SparseMoELanguageModel.generate`.

While the text fits the window (block_size tokens) each step runs the new token through the KV
cache; past it every position moves (absolute position embeddings), so each step re-encodes the
last block_size tokens. Two ways to run those steps:

  dynamic  the cache step attends to a view of the filled part (least work: CPU);
  static   fixed shapes: the cache step writes at a device-side position and attends over the
           whole buffer with the later positions masked, the window is always [B, block_size];
           on CUDA each kind of step is captured once as a CUDA graph and replayed, so a step
           costs one launch instead of hundreds (the MoE layers then need no host read: a few
           tokens take the gathered-weights path, more the grouped-GEMM path, both sync-free).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: Decoder}
_KEPT_PER_MODEL = 4


def decoder_for(model, batch: int, use_cache: bool, static: bool) -> Decoder:
    """A `Decoder` for `model`; a static one is kept across calls (for the batch size, cache
    use, and the parameters' device, dtype and storage), so its CUDA graphs are captured once
    and replayed by every later `generate` (the graphs read the parameters in place, so
    training between calls is seen). At most a few are kept per model, none on the model."""
    if not static:
        return Decoder(model, use_cache, static)
    param = next(model.parameters())
    key = (batch, use_cache, param.device, param.dtype, param.data_ptr())
    kept = _KEPT.setdefault(model, {})
    if key not in kept:
        if len(kept) >= _KEPT_PER_MODEL:
            kept.pop(next(iter(kept)))  # the oldest
        kept[key] = Decoder(model, use_cache, static)
    return kept[key]


class Decoder:
    """`start(prompt)` then `next(sequence)`, each returning the next token's logits [B, V]."""

    def __init__(self, model, use_cache: bool = True, static: bool = False) -> None:
        from .model import KVCache

        self.model = model
        self.block_size = model.config.block_size
        self.cache = KVCache(model.config.n_layer, self.block_size) if use_cache else None
        self.static = static
        self.length = 0  # tokens in the cache
        self.use_graphs = static and next(model.parameters()).device.type == "cuda"
        self._graphs: dict[str, tuple | None] = {}  # kind -> (graph, output); None: eager
        self._inputs: dict[str, Tensor] = {}
        self._position: Tensor | None = None  # [1] int64 on the device (static steps)

    def start(self, prompt: Tensor) -> Tensor:
        """Logits after the prompt [B, T0 <= block_size] (its length varies: run eagerly).
        A decoder starts over at each call: its buffers and graphs serve the next sequence."""
        if self.cache is not None:
            self.cache.reset()
        self.length = prompt.shape[1]
        if self._position is not None:  # the captured step reads this tensor: update in place
            self._position.fill_(self.length)
        return self.model._logits(prompt, self.cache)

    def next(self, sequence: Tensor) -> Tensor:
        """Logits after `sequence` [B, T], whose last token is the one drawn since the last call."""
        if self.cache is not None and self.length < self.block_size:
            logits = self._cached_step(sequence[:, -1:])
            self.length += 1
            return logits
        return self._window(sequence[:, -self.block_size :])

    def _cached_step(self, token: Tensor) -> Tensor:
        if not self.static:
            return self.model._logits(token, self.cache)
        if self._position is None:
            self._position = torch.full((1,), self.length, dtype=torch.long, device=token.device)

        def step() -> Tensor:
            logits = self.model._logits(self._inputs["step"], self.cache, self._position)
            self._position.add_(1)
            return logits

        return self._run("step", token, step)

    def _window(self, window: Tensor) -> Tensor:
        if not self.static or window.shape[1] < self.block_size:
            return self.model._logits(window, None)
        return self._run("window", window, lambda: self.model._logits(self._inputs["window"], None))

    def _run(self, kind: str, value: Tensor, fn: Callable[[], Tensor]) -> Tensor:
        """fn() on `value` copied into this kind's static input; on CUDA as a graph replay."""
        if kind not in self._inputs:
            self._inputs[kind] = value.clone()
        else:
            self._inputs[kind].copy_(value)
        if not self.use_graphs or self._graphs.get(kind, True) is None:
            return fn()
        if kind not in self._graphs:
            try:
                self._graphs[kind] = self._capture(fn)
            except RuntimeError as err:  # a kernel that reads the host (e.g. fp32 grouped_mm)
                log.warning(
                    "decoding: the %s step runs eagerly, not as a CUDA graph (%s)", kind, err
                )
                self._graphs[kind] = None
                return fn()
        graph, out = self._graphs[kind]
        graph.replay()
        return out.clone()

    def _capture(self, fn: Callable[[], Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm up on a side stream (undoing the position's advance), then capture fn."""
        start = None if self._position is None else self._position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
                if start is not None:
                    self._position.copy_(start)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        if start is not None:
            self._position.copy_(start)  # capturing ran nothing; replay advances it
        return graph, out
