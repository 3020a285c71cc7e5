"""What moekit does with each transformers MoE family: one table of router rules.

`patch_model` finds each MoE block's router by its class in `RULES` and runs the block on
moekit: the router's forward becomes moekit's routing as the rule describes it, and the
experts module's forward moekit's dispatch plan and kernels (`backend.run_experts`, the
experts in any layout transformers stores). The rest of the block (shared experts and their
gates, output scales, norms, how the block combines them) stays transformers' own code, so it
is exact by construction. Blocks that do not call their experts as `experts(x, top_k_index,
top_k_weights)` get moekit forwards of their own (`block`: Llama 4, Switch Transformers,
DBRX).

A rule, read top to bottom as the router computes:

    weight, bias   the router's [E, d] weight and its logits' bias (dotted paths on the
                   router; a bias path that resolves to None means no bias)
    pre_norm       a module of the router applied to the tokens first (Gemma 4), then
    input_scale    attributes multiplying them
    logit_scale    an attribute multiplying the logits; `softcap` tanh soft-capping of them
    score          "softmax" | "sigmoid" over the E logits, or "@attr": the router's own
                   score function (an `ACT2FN` entry)
    choose_on      the top-k is taken over "scores" or the raw "logits" ...
    choice_bias    ... plus this correction bias [E] (choice only, never the weights), or
                   "arg": the bias the block passes as the router's second argument
    groups         group-limited choice (num_group / topk_group of the router): a group's
                   score is the sum of its `group_best` best, other groups' experts filled
                   with `group_fill`
    hash           the choice is a table lookup `router.<hash>[input_ids]` (DeepSeek-V4)
    normalize      renormalise the k weights: sum + `eps` (or clamped at `norm_min`)
    scale          an attribute multiplying the weights ("1/top_k": divide by k);
                   `expert_scale` a per-expert [E] scale
    top_k          where k lives on the router

`normalize` and `groups` are flags: a constant, an attribute, "attr=value", or several joined
by "|" (any). Every value of this table is checked against transformers on a tiny model of its
family (`tests/test_hf.py::test_every_family_rule_equals_transformers`).

A block whose router is not in the table is left as transformers wrote it and named in a
warning with the reason (`patch_model(strict=True)` raises); its experts still run on moekit
where its family is on transformers' ExpertsInterface (`experts_implementation="moekit"`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["RULES", "SKIPPED", "FamilyRule"]


@dataclass(frozen=True)
class FamilyRule:
    """How one transformers router class (and the block around it) maps onto moekit."""

    family: str  # transformers' models/ folder
    weight: str = "weight"
    bias: str | None = None
    pre_norm: str | None = None
    input_scale: tuple[str, ...] = ()
    logit_scale: str | None = None
    softcap: str | None = None
    score: str = "softmax"  # "softmax" | "sigmoid" | "@attr"
    choose_on: str = "scores"  # "scores" | "logits"
    choice_bias: str | None = None  # attribute path, or "arg"
    groups: bool | str = False
    group_best: int = 2
    group_fill: float = float("-inf")
    hash: str | None = None
    normalize: bool | str = "norm_topk_prob"
    eps: float = 0.0
    norm_min: str | None = None
    scale: str | None = None
    expert_scale: str | None = None
    top_k: str = "top_k"
    block: str = "experts"  # "experts" | "llama4" | "switch" | "dbrx"

    def like(self, family: str, **changes) -> FamilyRule:
        """This rule for another family, with `changes`."""
        return replace(self, family=family, **changes)


# softmax over E, top-k, renormalised where the router says (Qwen3-MoE and its kin)
SOFTMAX = FamilyRule("qwen3_moe")
# top-k of the logits, softmax over those k: the same as softmax over E renormalised over k
SOFTMAX_TOP = FamilyRule("mixtral", normalize=True)
# sigmoid scores + correction bias, group-limited, renormalised, scaled (DeepSeek-V3 and kin)
DEEPSEEK_V3 = FamilyRule(
    "deepseek_v3",
    score="sigmoid",
    choice_bias="e_score_correction_bias",
    groups=True,
    eps=1e-20,
    scale="routed_scaling_factor",
)
# sigmoid + correction bias, no groups, always renormalised (MiniMax-M2 and kin)
SIGMOID_BIAS = DEEPSEEK_V3.like("minimax_m2", groups=False, normalize=True, eps=0.0, scale=None)
# softmax, optionally group-limited by each group's best expert, never renormalised
DEEPSEEK_V2 = FamilyRule(
    "deepseek_v2",
    groups="topk_method=group_limited_greedy",
    group_best=1,
    group_fill=0.0,
    normalize=False,
    scale="routed_scaling_factor",
)
# a norm and scales before the router's projection, softmax, renormalised, per-expert scales
GEMMA4 = SOFTMAX.like(
    "gemma4",
    weight="proj.weight",
    pre_norm="norm",
    input_scale=("scale", "scalar_root_size"),
    normalize=True,
    expert_scale="per_expert_scale",
    top_k="config.top_k_experts",
)

RULES: dict[str, FamilyRule] = {
    # softmax top-k
    "MixtralTopKRouter": SOFTMAX_TOP,
    "MiniMaxTopKRouter": SOFTMAX_TOP.like("minimax"),
    "Qwen3MoeTopKRouter": SOFTMAX,
    "Qwen2MoeTopKRouter": SOFTMAX.like("qwen2_moe"),
    "Qwen3NextTopKRouter": SOFTMAX.like("qwen3_next"),
    "Qwen3_5MoeTopKRouter": SOFTMAX.like("qwen3_5_moe", normalize=True),
    "Qwen3VLMoeTextTopKRouter": SOFTMAX.like("qwen3_vl_moe", normalize=True),
    "Qwen3OmniMoeThinkerTextTopKRouter": SOFTMAX.like("qwen3_omni_moe"),
    "OlmoeTopKRouter": SOFTMAX.like("olmoe"),
    "FlexOlmoTopKRouter": SOFTMAX.like("flex_olmo"),
    "MellumTopKRouter": SOFTMAX.like("mellum"),
    "LaraMiniTopKRouter": SOFTMAX.like("lara_mini"),
    "Qwen4ExpTextTopKRouter": SOFTMAX.like("qwen4_exp"),
    "JambaTopKRouter": SOFTMAX.like("jamba", normalize=False),
    "HunYuanMoEV1Gate": SOFTMAX.like("hunyuan_v1_moe", weight="wg.weight", normalize=True),
    "LongcatFlashTopkRouter": SOFTMAX.like(
        "longcat_flash",
        weight="classifier.weight",  # transformers' router leaves the classifier's bias out
        choice_bias="e_score_correction_bias",
        normalize=False,
        scale="routed_scaling_factor",
    ),
    "AriaTextTopKRouter": SOFTMAX_TOP.like("aria"),
    "GraniteMoeTopKRouter": SOFTMAX_TOP.like("granitemoe"),
    "GraniteMoeSWATopKRouter": SOFTMAX_TOP.like("granitemoe_swa"),
    "GraniteMoeSharedTopKRouter": SOFTMAX_TOP.like("granitemoeshared"),
    "GraniteMoeHybridTopKRouter": SOFTMAX_TOP.like("granitemoehybrid"),
    "GptOssTopKRouter": SOFTMAX_TOP.like("gpt_oss", bias="bias"),
    "OpenAIPrivacyFilterTopKRouter": SOFTMAX_TOP.like(
        "openai_privacy_filter", bias="bias", scale="1/top_k"
    ),
    "Cohere2MoeTopKRouter": SOFTMAX.like(
        "cohere2_moe",
        score="@expert_selection_fn",
        normalize="norm_topk_prob|expert_selection_fn=softmax",
    ),
    "Ernie4_5_MoeTopKRouter": SOFTMAX.like(
        "ernie4_5_moe",
        choice_bias="moe_statics.e_score_correction_bias",
        normalize=True,
        norm_min="norm_min",
    ),
    "Ernie4_5_VLMoeMoeTopKRouter": SOFTMAX.like(
        "ernie4_5_vl_moe",
        choice_bias="moe_statics.e_score_correction_bias",
        normalize=True,
        norm_min="norm_min",
    ),
    "Gemma4TextRouter": GEMMA4,
    "DiffusionGemmaTextRouter": GEMMA4.like("diffusion_gemma"),
    # softmax, group-limited
    "DeepseekV2TopkRouter": DEEPSEEK_V2,
    "UnlimitedOcrTextTopkRouter": DEEPSEEK_V2.like("unlimited_ocr"),
    "MistralLarge4TextTopkRouter": DEEPSEEK_V3.like(
        "mistral_large4", score="softmax", choice_bias=None, group_fill=0.0, normalize=True
    ),
    "DeepseekOcr2TextTopkRouter": DEEPSEEK_V2.like("deepseek_ocr2"),
    "Mistral4TopkRouter": DEEPSEEK_V3.like(
        "mistral4", score="softmax", choice_bias=None, group_fill=0.0
    ),
    # sigmoid + correction bias, group-limited (DeepSeek-V3's router, copied by many)
    "DeepseekV3TopkRouter": DEEPSEEK_V3,
    "DeepseekV32TopkRouter": DEEPSEEK_V3.like("deepseek_v32"),
    "Glm4MoeTopkRouter": DEEPSEEK_V3.like("glm4_moe"),
    "Glm4MoeLiteTopkRouter": DEEPSEEK_V3.like("glm4_moe_lite"),
    "GlmMoeDsaTopkRouter": DEEPSEEK_V3.like("glm_moe_dsa"),
    "AXK1TopkRouter": DEEPSEEK_V3.like("axk1"),
    "AXK2TopkRouter": DEEPSEEK_V3.like("axk2", groups="num_group", group_fill=0.0),
    "BailingHybridTopkRouter": DEEPSEEK_V3.like("bailing_hybrid"),
    "BeamTopKRouter": DEEPSEEK_V3.like("beam", scale=None),
    "Dots3NoteTextTopkRouter": DEEPSEEK_V3.like("dots3_note"),
    "ExaoneMoeTopkRouter": DEEPSEEK_V3.like("exaone_moe"),
    "HYV4TopkRouter": DEEPSEEK_V3.like("hy_v4"),
    "KimiLinearTopkRouter": DEEPSEEK_V3.like("kimi_linear"),
    "MiniCPM5MoeTopkRouter": DEEPSEEK_V3.like("minicpm5_moe"),
    "NemotronHTopkRouter": DEEPSEEK_V3.like("nemotron_h"),
    "Dots1TopkRouter": DEEPSEEK_V3.like("dots1"),
    "Glm4vMoeTextTopkRouter": DEEPSEEK_V3.like("glm4v_moe"),
    "Glm5NextTextTopkRouter": DEEPSEEK_V3.like("glm5_next"),
    "HYV4VLTopkRouter": DEEPSEEK_V3.like("hy_v4_vl"),
    "MiMoV2FlashTopkRouter": DEEPSEEK_V3.like("mimo_v2_flash"),
    "SolarOpenTopkRouter": DEEPSEEK_V3.like("solar_open"),
    # sigmoid + correction bias, no groups
    "MiniMaxM2TopKRouter": SIGMOID_BIAS.like("minimax_m2", choice_bias="arg"),
    "MiniMaxM3VLTopKRouter": SIGMOID_BIAS.like("minimax_m3_vl"),
    "Step3p7TopKRouter": SIGMOID_BIAS.like("step3p7"),
    "Lfm2MoeTopKRouter": SIGMOID_BIAS.like(
        "lfm2_moe",
        choice_bias="arg",  # None where the config turns the expert bias off
        normalize="norm_topk_prob",
        eps=1e-6,
        scale="routed_scaling_factor",
    ),
    "LagunaTopKRouter": SIGMOID_BIAS.like("laguna", softcap="router_logit_softcapping"),
    "AfmoeTokenChoiceRouter": SIGMOID_BIAS.like(
        "afmoe", weight="gate.weight", choice_bias="arg", eps=1e-20, scale="route_scale"
    ),
    "HYV3TopKRouter": SIGMOID_BIAS.like(
        "hy_v3", choice_bias="arg", eps=1e-20, scale="router_scaling_factor"
    ),
    "Inkling2TopKRouter": SIGMOID_BIAS.like(
        "inkling2", score="@score_fn", eps=1e-20, scale="routed_scaling_factor"
    ),
    "Inkling2LoopTopKRouter": SIGMOID_BIAS.like(
        "inkling2_loop", score="@score_fn", eps=1e-20, scale="routed_scaling_factor"
    ),
    "MuseSparkTopkRouter": SIGMOID_BIAS.like(
        "muse_spark", logit_scale="output_multiplier", scale="routed_scaling_factor"
    ),
    "DeepseekV4TopKRouter": SIGMOID_BIAS.like(
        "deepseek_v4", score="@score_fn", eps=1e-20, scale="routed_scaling_factor"
    ),
    "DeepseekV4HashRouter": SIGMOID_BIAS.like(
        "deepseek_v4",
        score="@score_fn",
        choice_bias=None,
        hash="tid2eid",
        eps=1e-20,
        scale="routed_scaling_factor",
    ),
    "Kolibri1TopKRouter": SIGMOID_BIAS.like(
        "kolibri1", choose_on="logits", normalize="norm_topk_prob"
    ),
    "Kolibri1_1TopKRouter": SIGMOID_BIAS.like(
        "kolibri1_1", choose_on="logits", normalize="norm_topk_prob"
    ),
    # sigmoid, no bias
    "FlintTopKRouter": FamilyRule("flint", score="sigmoid"),
    # sigmoid top-1 whose weight scales the expert's input, a shared expert beside
    "Llama4Router": FamilyRule("llama4", score="sigmoid", normalize=False, block="llama4"),
    # softmax top-k renormalised by a p-norm, in the block; experts of its own layout
    "DbrxRouter": FamilyRule("dbrx", weight="layer.weight", block="dbrx"),
    # top-1 with an expert capacity per sequence (seed 002's SwitchTransformer)
    "SwitchTransformersTop1Router": FamilyRule(
        "switch_transformers",
        weight="classifier.weight",
        bias="classifier.bias",
        normalize=False,
        top_k="1",
        block="switch",
    ),
}

# routers moekit leaves to transformers, and why
SKIPPED: dict[str, str] = {
    "InklingTopkRouter": "its shared experts are weighted by the router (a log-sigmoid "
    "softmax over routed and shared logits)",
    "PhimoeTopKRouter": "sparsemixer routing (a training-time gradient estimator)",
    "ZayaRouter": "an MLP router carrying state across layers, with a skip expert",
    "JetMoeTopKGating": "mixture-of-attention heads and experts of its own, not stacked",
    "NllbMoeTop2Router": "top-2 routing with a sampled second expert and padding masks",
    "ErgoTopkRouter": "its experts class wraps the interface's experts call with a per-route "
    'norm of its own (its experts run on moekit with experts_implementation="moekit")',
}
