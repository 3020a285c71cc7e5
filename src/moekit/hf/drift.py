"""Routing drift of a fine-tune: per MoE layer, how much of the base model's routing the
model keeps, on a fixed calibration batch (`moekit finetune` measures it at every
evaluation).

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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..parallel import training as par
from .replay import _overlap, record_routing

__all__ = ["RoutingDrift", "base_routes_path"]

log = logging.getLogger(__name__)


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
