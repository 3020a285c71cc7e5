"""Router health: the tokens each expert received, per MoE layer, as one set of metrics.

    RouterHealth(collapse_ratio, collapse_evals).report(load [L, E], step) -> metrics

Per layer i: `layer{i}_load_max_over_mean` (1 is perfect balance, E is every token on one
expert), `layer{i}_load_entropy` (of the load shares, over log E: 1 is uniform),
`layer{i}_dead_fraction` (experts that received no token), `layer{i}_expert{e}_load` (each
expert's share). A layer whose max/mean stays above `collapse_ratio` for `collapse_evals`
reports in a row gets a warning. `history` keeps the shares for the expert-load plot.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class RouterHealth:
    def __init__(self, collapse_ratio: float = 4.0, collapse_evals: int = 3) -> None:
        self.collapse_ratio, self.collapse_evals = collapse_ratio, collapse_evals
        self.history: list[dict] = []  # [{"step", "load": [L][E] shares}]
        self._collapsed: dict[int, int] = {}

    def report(self, load: Tensor | None, step: int) -> dict[str, float]:
        """Metrics of the token counts `load` [L, E] routed since the last report (rows of
        layers that saw no token are left out)."""
        if load is None or load.numel() == 0:
            return {}
        load = load.detach().double().cpu()  # [L, E]
        metrics, shares = {}, []
        for layer, counts in enumerate(load):
            total = counts.sum()
            if total <= 0:
                continue
            share = counts / total  # [E]
            num_experts = len(share)
            ratio = float(share.max() * num_experts)
            entropy = -(share * share.clamp_min(1e-12).log()).sum()
            metrics[f"layer{layer}_load_max_over_mean"] = ratio
            metrics[f"layer{layer}_load_entropy"] = (
                float(entropy / math.log(num_experts)) if num_experts > 1 else 1.0
            )
            metrics[f"layer{layer}_dead_fraction"] = float((counts == 0).double().mean())
            for e, value in enumerate(share.tolist()):
                metrics[f"layer{layer}_expert{e}_load"] = value
            shares.append(share.tolist())
            self._watch(layer, ratio)
        if shares and len(shares) == load.shape[0]:
            self.history.append({"step": step, "load": shares})
        return metrics

    def _watch(self, layer: int, ratio: float) -> None:
        run = self._collapsed.get(layer, 0) + 1 if ratio > self.collapse_ratio else 0
        self._collapsed[layer] = run
        if run == self.collapse_evals:
            log.warning(
                "MoE layer %d is collapsing: max/mean expert load %.1f > %.1f at %d "
                "evaluations in a row (raise the auxiliary loss coefficient)",
                layer,
                ratio,
                self.collapse_ratio,
                run,
            )

    def state(self) -> dict:
        return {
            "history": self.history,
            "collapsed": {str(k): v for k, v in self._collapsed.items()},
        }

    def restore(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self._collapsed = {int(k): v for k, v in state.get("collapsed", {}).items()}


def stack_loads(loads: list[Tensor]) -> Tensor | None:
    """Per-layer counts [E_i] -> [L, E] (None when the layers have different E, or none)."""
    if not loads or len({t.numel() for t in loads}) != 1:
        return None
    return torch.stack([t.detach().float().reshape(-1).cpu() for t in loads])
