"""The "transformers backends" table: one forward+backward of a small transformers MoE model
per family with `experts_implementation` "eager", "grouped_mm" and "moekit", and the model
after `moekit.hf.patch_model` where the family has a rule, interleaved in one run.

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


def bench_hf_backends(
    families=FAMILIES, rounds: int = 5, warmup: int = 1, batch: int = 4, length: int = 256
) -> list[HFBackendResult]:
    """Median fwd+bwd ms of each family under each case (module docstring)."""
    from ..hf import RULES, patch_model, tiny_model
    from ..hf.catalog import dummy_inputs

    results = []
    for family in families:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_model(family, **SIZES).train()
        ids = dummy_inputs(model, batch, length)["input_ids"]
        cases = {}
        for name in ("eager", "grouped_mm", "moekit"):
            clone = copy.deepcopy(model)
            clone.set_experts_implementation(name)
            cases[name] = _step(clone, ids)
        if any(type(m).__name__ in RULES for m in model.modules()):
            patched = copy.deepcopy(model)
            patched.set_experts_implementation("grouped_mm")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch_model(patched)
            cases["patched"] = _step(patched, ids)
        ms = interleaved_medians(cases, rounds=rounds, warmup=warmup)
        results.append(HFBackendResult(family, {case: ms.get(case) for case in CASES}))
    return results
