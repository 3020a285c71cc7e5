"""The "fine-tuning" tables: moekit's expert LoRA and fine-tune step against transformers + PEFT.

    bench_expert_lora(...)     one Qwen3-MoE-like MoE block, LoRA rank r on every expert's
                               gate/up and down: PEFT's own forward (transformers' grouped_mm
                               experts, W + BA folded per call) vs the patched block (moekit's
                               `LoraExperts`: the low-rank terms per expert on its rows);
                               fwd+bwd ms and peak memory
    bench_finetune_step(...)   one optimizer step of a tiny Qwen3-MoE-like model (d=256, 16
                               experts of h=256, top-4, 2 layers, 4 x 256 tokens): LoRA on the
                               experts and a full fine-tune, transformers (grouped_mm) + PEFT
                               vs moekit; tokens/s and peak memory

Random weights from configs (no downloads); every case in one run, interleaved; ratios are
moekit / transformers, measured in the same run.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import torch

from .hf_backends import SIZES
from .timing import interleaved_medians, peak_extra_bytes

# the Qwen3-MoE-like layer (d=2048, E=128, k=8, h=768, r=16, T=4096) scaled down for a
# 2-core CPU: a quarter of the width, half the experts and tokens
LORA_LAYER = dict(d_model=512, d_hidden=192, num_experts=64, top_k=8, tokens=2048, rank=16)
STEP_MODEL = SIZES  # the transformers backends table's model


class FinetuneResult(NamedTuple):
    case: str  # "expert LoRA layer", "LoRA step", "full step"
    ms: dict[str, float]  # "transformers" / "moekit" -> median ms
    peak_bytes: dict[str, int]
    tokens: int

    def ratio(self) -> float:
        return self.ms["moekit"] / self.ms["transformers"]

    def memory_ratio(self) -> float:
        return self.peak_bytes["moekit"] / max(1, self.peak_bytes["transformers"])


def _lora(model, rank: int):
    import peft

    from ..hf.lora import lora_targets

    parameters, _ = lora_targets(model, ("experts",))
    torch.manual_seed(0)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _patched(model):
    from ..hf import patch_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_model(model)
    return model


def _measure(label: str, cases: dict, modules: dict, tokens: int, rounds: int, warmup: int):
    ms = interleaved_medians(cases, rounds=rounds, warmup=warmup)
    peaks = {name: peak_extra_bytes(cases[name], modules[name]) for name in cases}
    return FinetuneResult(label, ms, peaks, tokens)


def bench_expert_lora(rounds: int = 3, warmup: int = 1, **shape) -> FinetuneResult:
    """fwd+bwd of one MoE block with expert LoRA: PEFT's forward vs moekit's (module doc)."""
    import transformers

    shape = {**LORA_LAYER, **shape}
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=shape["d_model"],
        moe_intermediate_size=shape["d_hidden"],
        num_experts=shape["num_experts"],
        num_experts_per_tok=shape["top_k"],
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=shape["d_model"] // 4,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Qwen3MoeForCausalLM(config)
    model.set_experts_implementation("grouped_mm")
    ours = _patched(_lora(copy.deepcopy(model), shape["rank"]))
    theirs = _lora(model, shape["rank"])
    x = torch.randn(1, shape["tokens"], shape["d_model"])

    def step(peft_model):
        block = peft_model.base_model.model.model.layers[0].mlp

        def run() -> None:
            peft_model.zero_grad(set_to_none=True)
            block(x).sum().backward()

        return run

    cases = {"transformers": step(theirs), "moekit": step(ours)}
    return _measure(
        "expert LoRA layer",
        cases,
        {"transformers": theirs, "moekit": ours},
        shape["tokens"],
        rounds,
        warmup,
    )


def bench_finetune_step(
    rounds: int = 3, warmup: int = 1, batch: int = 4, length: int = 256, rank: int = 16
) -> list[FinetuneResult]:
    """One AdamW step of a tiny Qwen3-MoE-like model, LoRA and full (module doc)."""
    from ..hf import tiny_model
    from ..hf.catalog import dummy_inputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tiny_model("qwen3_moe", **STEP_MODEL).train()
    base.set_experts_implementation("grouped_mm")
    ids = dummy_inputs(base, batch, length)["input_ids"]

    def step(model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()

        return run

    results = []
    for label, lora in (("LoRA step", True), ("full step", False)):
        theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
        if lora:
            theirs, ours = _lora(theirs, rank), _lora(ours, rank)
        ours = _patched(ours)  # after PEFT: the experts' LoRA in moekit's pass
        cases = {"transformers": step(theirs), "moekit": step(ours)}
        modules = {"transformers": theirs, "moekit": ours}
        results.append(_measure(label, cases, modules, batch * length, rounds, warmup))
    return results
