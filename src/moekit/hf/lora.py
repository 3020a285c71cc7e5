"""LoRA adapters of `moekit finetune`: PEFT's, on the parts of an MoE model a user names.

lora_targets(model, ("experts", "router", "attention")) -> (target_parameters,
                                                          target_modules)
add_lora(model, rank, alpha, targets) -> the PeftModel, patched (the experts' LoRA inside
                                         moekit's grouped pass: `blocks.LoraExperts`)
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from .._extras import require
from ..train.finetune_config import TARGETS
from .parallel import adapters_cut_as_made
from .patch import experts_of, holds_experts, patch_model, router_of

__all__ = ["TARGETS", "add_lora", "lora_targets"]

log = logging.getLogger(__name__)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _suffix(model: nn.Module, module: nn.Module) -> str:
    """`module`'s name below its decoder layer: "mlp.experts" of "model.layers.0.mlp.experts"."""
    name = next(n for n, m in model.named_modules() if m is module)
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1] + 1 :] if digits else parts[-2:])


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(target_parameters, target_modules) of PEFT for the named parts of the model."""
    parameters, modules = set(), set()
    for block in (m for m in model.modules() if holds_experts(m)):
        if "experts" in targets and (experts := experts_of(block)) is not None:
            prefix = _suffix(model, experts)
            for name, param in experts.named_parameters(recurse=False):
                if param.dim() == 3:
                    parameters.add(f"{prefix}.{name}")
        router, rule = router_of(block)
        if "router" in targets and router is not None:
            parameters.add(f"{_suffix(model, router)}.{rule.weight}")
    if "attention" in targets:
        modules = {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _ATTENTION
        }
    if not parameters and not modules:
        raise ValueError(
            f"--lora-targets {','.join(targets)} names nothing in this model (its MoE blocks' "
            "experts and routers, or attention q/k/v/o projections)"
        )
    return sorted(parameters), sorted(modules)


def add_lora(
    model: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...]
) -> nn.Module:
    """`model` with a PEFT LoRA adapter of `rank` on `targets`, patched."""
    peft = require("peft", "hf", "moekit finetune --lora-rank")
    parameters, modules = lora_targets(model, targets)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_parameters=parameters or None,
        target_modules=modules or None,
    )
    log.warning("LoRA rank %d on %s", rank, ", ".join(parameters + modules))
    # an expert-parallel rank's loader read its experts only: their factors cut as made
    with warnings.catch_warnings(), adapters_cut_as_made(peft):
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, config)
        patch_model(model)  # the experts' LoRA inside moekit's grouped pass (`LoraExperts`)
    return model
