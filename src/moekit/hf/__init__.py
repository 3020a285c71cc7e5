"""transformers' MoE models on moekit's engine.

    experts_implementation="moekit"   the experts of any family on transformers'
                                      `ExpertsInterface`, on moekit's plan and kernels
                                      (`backend`; registered by `import moekit.hf`)
    patch_model(model)                MoE blocks' routers and experts on moekit's routing, plan
                                      and kernels, by the family rules of `families`
    moe_from_hf / moe_to_hf           a block's weights into a standalone `moekit.MoE` and back
    moe_families / tiny_model         the installed transformers' MoE families, tiny models
    lora_path_calls(model)            how many grouped passes computed PEFT LoRA on the
                                      experts in moekit (backend or patch), per model
    record_routing / replay_routing   each token's experts recorded in a rollout, replayed in
                                      the training forward (`replay`: RL's routing replay)
    routing_overlap(a, b, batch)      how much of two models' routing agrees, per layer

`import moekit` never imports transformers; `import moekit.hf` does where it is installed (to
register the backend).
"""

from __future__ import annotations

import importlib.util

from .backend import lora_path_calls
from .catalog import FamilyInfo, TinyModelError, moe_families, tiny_config, tiny_model
from .convert import moe_from_hf, moe_to_hf
from .families import RULES, SKIPPED, FamilyRule
from .patch import is_patched, patch_model, unpatch_model
from .quantize import quantize_experts
from .replay import (
    RolloutRoutes,
    from_sglang,
    from_vllm,
    record_routing,
    replay_routing,
    router_mismatch,
    routing_overlap,
)

__all__ = [
    "RULES",
    "RolloutRoutes",
    "SKIPPED",
    "FamilyInfo",
    "FamilyRule",
    "TinyModelError",
    "is_patched",
    "lora_path_calls",
    "moe_families",
    "moe_from_hf",
    "moe_to_hf",
    "patch_model",
    "from_sglang",
    "from_vllm",
    "quantize_experts",
    "record_routing",
    "replay_routing",
    "router_mismatch",
    "routing_overlap",
    "tiny_config",
    "tiny_model",
    "unpatch_model",
]

if importlib.util.find_spec("transformers") is not None:
    from . import backend

    backend.register()
