"""What moekit does with each transformers MoE block: one table of family rules.

`patch_model` runs a block whose class is in `RULES` on moekit's routing, dispatch plan and
experts (the experts in any layout transformers stores, `hf/experts.py`). A rule says:

    router        "softmax": softmax over the E logits, top-k, renormalised over the k or not
                  (`normalize`); "sigmoid": sigmoid scores + a correction bias, group-limited
                  top-k (DeepSeek-V3), times `routed_scaling_factor`
    normalize     the router's attribute that says whether to renormalise, or a constant
    router_attr   where the router lives in the block ("gate", "router")
    router_bias   whether the router's logits have a bias (gpt-oss)
    shared        the attribute of the always-on shared expert MLP, and `shared_gate` of its
                  sigmoid gate (Linear d -> 1), or None
    jitter        the block attribute of a multiplicative input jitter in training (Mixtral)
    returns       what the block returns: "hidden" or "hidden, scores" (gpt-oss: the hidden
                  states and the routing weights [N, k])

A block not in the table is left as transformers wrote it, named in a warning with the
reason (`patch_model(strict=True)` raises); its experts still run on moekit where its family
is on transformers' ExpertsInterface (`experts_implementation="moekit"`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RULES", "FamilyRule"]


@dataclass(frozen=True)
class FamilyRule:
    """How one transformers MoE block class maps onto moekit."""

    family: str  # transformers' models/ folder
    router: str = "softmax"  # "softmax" | "sigmoid"
    normalize: str | bool = "norm_topk_prob"  # router attribute, or a constant
    router_attr: str = "gate"
    router_bias: bool = False
    shared: str | None = None
    shared_gate: str | None = None
    jitter: str | None = None
    returns: str = "hidden"  # "hidden" | "hidden, scores"


RULES: dict[str, FamilyRule] = {
    "MixtralSparseMoeBlock": FamilyRule("mixtral", normalize=True, jitter="jitter_noise"),
    "Qwen2MoeSparseMoeBlock": FamilyRule(
        "qwen2_moe", shared="shared_expert", shared_gate="shared_expert_gate"
    ),
    "Qwen3MoeSparseMoeBlock": FamilyRule("qwen3_moe"),
    "OlmoeSparseMoeBlock": FamilyRule("olmoe"),
    "DeepseekV3MoE": FamilyRule("deepseek_v3", router="sigmoid", shared="shared_experts"),
    # top-k of the biased logits, softmax over those k == softmax over E renormalised over k
    "GptOssMLP": FamilyRule(
        "gpt_oss",
        normalize=True,
        router_attr="router",
        router_bias=True,
        returns="hidden, scores",
    ),
}
