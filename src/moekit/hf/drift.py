"""Routing drift of a fine-tune: per MoE layer, how much of the base model's routing the
model keeps, on a fixed calibration batch (`moekit finetune` measures it at every
evaluation).

    routing_drift(model, forward, batch, topo, out, lora, resuming) -> RoutingDrift | None
                                           a fine-tune's, its base set up (below)
    RoutingDrift(model, forward, batch, topo, base).measure() -> {"routing_overlap": mean,
        "layer{l}_routing_overlap": ...}   the mean over the batch's real tokens of the
                                           fraction of each token's top-k experts the base
                                           model also chose (1: the base's routing)

The base: a LoRA model with its adapter disabled (`base="adapter"`: the same model, no second
copy), or the routes the model took before its first step (`base` a [b, T, L, k] tensor: a
full fine-tune's, kept in the run directory for a resume). Under torchrun each rank routes its
part of the batch; the sums are reduced over the ranks. A layer below `warn` is logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..parallel import training as par
from .replay import _overlap, record_routing

__all__ = ["RoutingDrift", "base_routes_path", "counts_kept", "routing_drift"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def counts_kept(routers: list) -> Iterator[None]:
    """Forwards inside leave the routers' token counts (`Router.counts`) as they were."""
    saved = [r.counts for r in routers]
    try:
        yield
    finally:
        for router, counts in zip(routers, saved, strict=True):
            router.counts = counts


def routing_drift(
    model: nn.Module,
    forward: Callable[[object], object],
    batch,
    topo: par.Topology,
    out: Path,
    lora: bool,
    resuming: bool,
    warn: float = 0.5,
) -> RoutingDrift | None:
    """A fine-tune's drift measure: LoRA's base is the model with its adapter disabled; a full
    run's the routes it takes now, before its first step (saved for a resume, read back on
    one). None, with a warning, where it cannot be measured."""
    base: Tensor | str = "adapter"
    if not lora:
        path = base_routes_path(out, topo.rank)
        if resuming:
            if not path.is_file():
                log.warning("routing drift: no base routes in %s (not measured)", path)
                return None
            base = torch.load(path)
        else:
            try:
                base = RoutingDrift(model, forward, batch, topo, "").routes()
            except ValueError as error:  # a family that routes some tokens apart
                log.warning("routing drift not measured: %s", error)
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(base.to(torch.int32), path)
    return RoutingDrift(model, forward, batch, topo, base, warn)


def base_routes_path(out: Path, rank: int) -> Path:
    """Where a full fine-tune keeps its base routes (each rank its part of the batch)."""
    return out / "routing_base" / f"rank{rank}.pt"


class RoutingDrift:
    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[object], object],
        batch,
        topo: par.Topology,
        base: Tensor | str,
        warn: float = 0.5,
    ) -> None:
        self.model, self.forward, self.batch, self.topo = model, forward, batch, topo
        self.base, self.warn = base, warn

    def routes(self, adapter: bool = True) -> Tensor:
        """[b, T, L, k] this rank's routes on the batch (`adapter` False: adapter disabled)."""
        off = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), off, record_routing(self.model) as rec:
                self.forward(self.batch)
        finally:
            self.model.train(was)
        return rec.routes

    def measure(self) -> dict[str, float]:
        """The overlap per layer and its mean over the layers (a collective under torchrun)."""
        base = self.routes(adapter=False) if isinstance(self.base, str) else self.base
        now = self.routes()
        mask = self.batch.attention_mask.bool().cpu()  # [b, T] the real tokens
        overlap = _overlap(now, base)[mask]  # [tokens, L]
        sums = torch.cat([overlap.double().sum(0), torch.tensor([float(overlap.shape[0])])])
        total = par.all_reduce_sum([sums.to(self.topo.device)], self.topo.data_group)[0].cpu()
        per_layer = (total[:-1] / total[-1].clamp_min(1.0)).tolist()
        metrics = {f"layer{l}_routing_overlap": v for l, v in enumerate(per_layer)}
        metrics["routing_overlap"] = sum(per_layer) / len(per_layer)
        low = [(l, v) for l, v in enumerate(per_layer) if v < self.warn]
        if low and self.topo.is_main:
            log.warning(
                "routing drift: %s of the base model's top-k choices kept (below --drift-warn "
                "%.2f on the calibration batch)",
                ", ".join(f"MoE layer {l} {v:.2f}" for l, v in low),
                self.warn,
            )
        return metrics
