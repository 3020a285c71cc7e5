"""The "transformers backends" tables: one forward+backward of a small transformers MoE model
per family with `experts_implementation` "eager", "grouped_mm" and "moekit", and the model
after `moekit.hf.patch_model` where the family has a rule, interleaved in one run; then the
same step under `torch.compile(model, fullgraph=True)` (inductor) for "grouped_mm" (transformers'
compiled path), "moekit" and "patched", with eager "moekit" beside them (`bench_hf_compiled`).

Models come from `moekit.hf.tiny_model` at d=256, 16 experts of h=256, top-4, 2 layers, 4 x 256
tokens, random weights (no downloads); times are medians, ratios against "grouped_mm"
(transformers' default), measured in the same run.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import torch

from .timing import interleaved_medians

FAMILIES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe")
SIZES = dict(
    d_model=256,
    d_hidden=256,
    num_experts=16,
    top_k=4,
    num_layers=2,
    num_heads=8,
    num_kv_heads=8,
    head_dim=32,
    lora_rank=64,
    vocab_size=1024,
)
CASES = ("eager", "grouped_mm", "moekit", "patched")


class HFBackendResult(NamedTuple):
    family: str
    ms: dict[str, float | None]  # case -> median ms (None: the case does not apply)


def _step(model, ids: torch.Tensor):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return run


def _models(family: str, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The family's small model (`SIZES`) in train mode, one copy per case name: an experts
    implementation, or "patched" (`patch_model`, where the family has a rule)."""
    from ..hf import RULES, patch_model, tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family, **SIZES).train()
        models = {}
        for name in names:
            clone = copy.deepcopy(model)
            if name != "patched":
                clone.set_experts_implementation(name)
            elif any(type(m).__name__ in RULES for m in model.modules()):
                patch_model(clone)
            else:
                continue
            models[name] = clone
    return models


def bench_hf_backends(
    families=FAMILIES, rounds: int = 5, warmup: int = 1, batch: int = 4, length: int = 256
) -> list[HFBackendResult]:
    """Median fwd+bwd ms of each family under each case (module docstring)."""
    from ..hf.catalog import dummy_inputs

    results = []
    for family in families:
        models = _models(family, CASES)
        ids = dummy_inputs(models["eager"], batch, length)["input_ids"]
        cases = {name: _step(model, ids) for name, model in models.items()}
        ms = interleaved_medians(cases, rounds=rounds, warmup=warmup)
        results.append(HFBackendResult(family, {case: ms.get(case) for case in CASES}))
    return results


COMPILED_FAMILIES = ("qwen3_moe", "gpt_oss")  # moekit's fused path; the general path
COMPILED_CASES = ("moekit eager", "grouped_mm", "moekit", "patched")


def bench_hf_compiled(
    families=COMPILED_FAMILIES, rounds: int = 5, warmup: int = 2, batch: int = 4, length: int = 256
) -> list[HFBackendResult]:
    """Median fwd+bwd ms of `torch.compile(model, fullgraph=True)` (inductor) per family:
    "grouped_mm" (transformers' compiled path), "moekit" (the backend), "patched", and
    "moekit eager" uncompiled; the warmup calls compile (at least one)."""
    from ..hf.catalog import dummy_inputs

    results = []
    for family in families:
        torch._dynamo.reset()  # each model's graphs of its own, within dynamo's recompile limit
        models = _models(family, ("moekit", "grouped_mm", "patched"))
        ids = dummy_inputs(models["moekit"], batch, length)["input_ids"]
        cases = {"moekit eager": _step(models["moekit"], ids)}
        for name, model in models.items():
            cases[name] = _step(torch.compile(model, fullgraph=True), ids)
        ms = interleaved_medians(cases, rounds=rounds, warmup=max(1, warmup))
        results.append(HFBackendResult(family, {case: ms.get(case) for case in COMPILED_CASES}))
    return results
