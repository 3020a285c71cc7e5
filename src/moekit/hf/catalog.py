"""The MoE families of the installed transformers, and tiny random models of them.

    moe_families() -> [FamilyInfo]   every models/<family>/modeling_*.py with an MoE block: its
                                     experts class(es) on transformers' `ExpertsInterface` (the
                                     `@use_experts_implementation` decorator) or not
    tiny_model(family, ...)          a small random model of a family built from its config
                                     class (sizes shrunk), or `TinyModelError` with the reason

Read from the installed package's source files, so a transformers release that adds a family
is enumerated with no change here. Building models needs transformers; listing needs only its
files.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import warnings
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .._extras import require

__all__ = ["FamilyInfo", "TinyModelError", "moe_families", "tiny_config", "tiny_model"]

# a class that holds experts or routes to them, by the names transformers gives them
_MOE_CLASS = re.compile(r"^class (\w*(?:MoE|Moe|SparseMoe|Experts|MoeBlock)\w*)\(", re.MULTILINE)
_DECORATED = re.compile(r"@use_experts_implementation(?:\(([^)]*)\))?\s*\nclass (\w+)\(")


@dataclass(frozen=True)
class FamilyInfo:
    """One model family of the installed transformers that has an MoE block."""

    name: str  # the models/ folder: "qwen3_moe"
    module: str  # "transformers.models.qwen3_moe.modeling_qwen3_moe"
    interface_experts: tuple[str, ...]  # experts classes decorated for the ExpertsInterface

    @property
    def on_interface(self) -> bool:
        return bool(self.interface_experts)


@cache
def moe_families() -> tuple[FamilyInfo, ...]:
    """The families whose modeling files define an MoE block, sorted by name."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        require("transformers", "hf", "moekit.hf")
    root = Path(spec.origin).parent / "models"
    families = []
    for path in sorted(root.glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        decorated = tuple(name for _, name in _DECORATED.findall(source))
        if decorated or _MOE_CLASS.search(source):
            module = f"transformers.models.{path.parent.name}.{path.stem}"
            families.append(FamilyInfo(path.parent.name, module, decorated))
    return tuple(families)


class TinyModelError(RuntimeError):
    """A family's model could not be built small from its config (the reason is the message)."""


# sizes of a tiny model: every config field of these names (any sub-config too) is set so; a
# field that a config aliases to one of these names (its `attribute_map`) is set so too
_SIZES = {
    "d_model": (
        "hidden_size",
        "d_model",
        "n_embd",
        "hidden_dim",
        "embed_dim",
        "dim",
        "out_hidden_size",  # a vision tower's output: the text model's hidden size
        "text_hidden_size",
    ),
    "d_hidden": (
        "intermediate_size",
        "moe_intermediate_size",
        "ffn_dim",
        "d_ff",
        "ffn_hidden_size",
        "shared_expert_intermediate_size",
        "expert_ffn_size",
        "expert_ffn_hidden_size",
        "moe_ffn_hidden_size",
        "ffn_intermediate_size",
        "expert_intermediate_size",
        "share_expert_dim",
        "mlp_only_intermediate_size",
        "shared_intermediate_size",
        "shared_experts_intermediate_size",
        "moe_shared_expert_intermediate_size",
        "first_dense_intermediate_size",
        "dense_intermediate_size",
        "intermediate_size_mlp",
        "moe_hidden_size",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "projection_intermediate_size",
    ),
    "num_layers": (
        "num_hidden_layers",
        "num_layers",
        "n_layer",
        "n_layers",
        "encoder_layers",
        "decoder_layers",
        "num_decoder_layers",
        "depth",
    ),
    "num_heads": (
        "num_attention_heads",
        "n_head",
        "n_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "num_heads",
        "mamba_n_heads",
        "mamba_num_heads",
        "linear_num_heads",
    ),
    "num_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_n_heads"),
    "head_dim": (
        "head_dim",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "d_kv",
        "kv_channels",
        "mamba_d_head",
        "mamba_head_dim",
        "linear_head_dim",
    ),
    "lora_rank": ("kv_lora_rank", "q_lora_rank", "o_lora_rank", "hc_lowrank"),
    "num_experts": (
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_num_experts",
        "num_routed_experts",
        "n_experts",
        "zero_expert_num",
    ),
    "top_k": (
        "num_experts_per_tok",
        "moe_topk",
        "num_experts_per_token",
        "moe_k",
        "router_topk",
        "top_k",
        "moe_top_k",
        "top_k_experts",
    ),
    "num_shared": ("n_shared_experts", "num_shared_experts"),
    "vocab_size": ("vocab_size", "vocab_size_per_layer_input"),
    "dense_layers": ("first_k_dense_replace", "num_dense_layers", "first_k_dense"),
    "d_state": ("mamba_d_state", "ssm_state_size"),  # a Mamba mixer's state, its head groups
    "ssm_groups": ("n_groups", "mamba_n_groups"),
    "window": ("sliding_window",),
    # a sparse-attention indexer: its query heads share one key head (they are at most a
    # GQA group of the attention's query heads), its head size, token budget and block size
    "index_heads": ("index_num_heads", "indexer_n_heads"),
    "index_kv_heads": ("indexer_kv_heads",),
    "index_head_dim": ("indexer_head_dim",),
    "index_topk": ("indexer_budget",),
    "index_block": ("indexer_compress_ratio",),
    "clip": ("clip_qkv",),  # a bound on the attention's q, k, v
}
# None in these means a feature left out (no LoRA, no shared experts, no sliding window, no
# indexer): kept so unless `tiny_config(optional=True)` (a model that needs them regardless)
_OPTIONAL = (
    "lora_rank",
    "num_shared",
    "window",
    "index_heads",
    "index_kv_heads",
    "index_head_dim",
    "index_topk",
    "index_block",
    "clip",
)
# set only where None (a window the model needs regardless), a real value kept
_FILL_ONLY = ("window",)
# sizes of other sizes: an indexer's query heads per key head, its head size
_DERIVED = {
    "index_heads": lambda s: max(1, s["num_heads"] // s["num_kv_heads"]),
    "index_head_dim": lambda s: s["head_dim"],
}

_DERIVED_HEADS = ("head_dim",)
_MOE_SWITCHES = ("enable_moe_block", "is_moe", "use_moe", "moe_enabled")
_GROUPS = ("n_group", "num_expert_group", "n_groups_routing")
_GROUPS_KEPT = ("topk_group", "topk_groups")
# per-layer schedules a config leaves None (its model reads them): every layer attends in full
# and is an MoE layer
_LAYER_SCHEDULES = {"layer_types": "full_attention", "mlp_layer_types": "sparse"}


def _shrunk_fields(config, sizes: dict[str, int], optional: bool = False) -> dict:
    """The fields of one config (not its sub-configs) set to the tiny sizes."""
    sizes = {**sizes, **{size: rule(sizes) for size, rule in _DERIVED.items()}}
    group_of = {field: size for size, names in _SIZES.items() for field in names}
    aliases = getattr(config, "attribute_map", None) or {}
    for alias, field in aliases.items():
        if alias in group_of:
            group_of.setdefault(field, group_of[alias])
    # a size the config derives itself is left to it, never passed back over the sizes it
    # derives from: a head_dim that is not a field of it (MLA's: nope + rope dims; qk_head_dim
    # is never set either), one it resolves from a default such as "auto"
    derived = set()
    if is_dataclass(config):
        given = {f.name: f for f in fields(config)}
        derived = {key for key in _DERIVED_HEADS if key not in given}
        derived |= {name for name, f in given.items() if isinstance(f.default, str)}
    values = config.to_dict()
    out = {}
    for key, value in values.items():
        if key in derived:
            continue
        size = group_of.get(key)
        if isinstance(value, list) and size and value and all(type(v) is int for v in value):
            out[key] = [sizes[size]] * len(value)  # one size per block (text, vision experts)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, type(None))):
            continue
        if size is not None:
            if value == 0 and size in ("head_dim", "d_hidden"):
                continue  # a size of 0: a part left out (NoPE: no rotary dims), kept so
            if value is None and size in _OPTIONAL and not optional:
                continue
            if value is not None and size in _FILL_ONLY:
                continue
            out[key] = sizes[size]
        elif key.endswith("token_id") and value is not None and value >= sizes["vocab_size"]:
            out[key] = sizes["vocab_size"] - 1
    for key in _MOE_SWITCHES:  # families whose MoE block is an option
        if getattr(config, key, None) is False:
            out[key] = True
    if getattr(config, "decoder_sparse_step", None) not in (None, 0):
        out["decoder_sparse_step"] = 1  # every layer an MoE layer
    for keys, size in ((_GROUPS, min(4, sizes["num_experts"])), (_GROUPS_KEPT, 2)):
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                out[key] = size
    layers = next((out[k] for k in _SIZES["num_layers"] if k in out), None)
    for key, kind in _LAYER_SCHEDULES.items():
        if key in values and values[key] is None and layers:
            out[key] = [kind] * layers
    if set(values.get("layer_types") or ()) == {"linear_attention"} and layers:
        # a hybrid's schedule of only recurrent layers: its last layer attends (the model builds
        # its attention mask from an attention layer, and the test reaches both kinds)
        out["layer_types"] = ["linear_attention"] * (layers - 1) + ["full_attention"]
    sections = _mrope_sections(config, {**values, **out})
    if sections is not None:
        out["rope_parameters"] = {**config.rope_parameters, "mrope_section": sections}
    return out


def _mrope_sections(config, values: dict) -> list[int] | None:
    """A multimodal RoPE's sections (time, height, width) for the shrunk sizes: they split the
    rotary frequencies (half the rotary dims of a head) among the axes, so they must sum to it."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return None
    ignored = getattr(config, "ignore_keys_at_rope_validation", None) or ()
    if "mrope_section" not in rope and "mrope_section" not in ignored:
        return None
    head = values.get("qk_rope_head_dim") or values.get("head_dim")
    if not head:
        heads = values.get("num_attention_heads") or getattr(config, "num_attention_heads", 0)
        head = (values.get("hidden_size") or 0) // heads if heads else 0
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    half = int(head * (factor or 1.0)) // 2
    if half <= 0:
        return None
    count = len(rope.get("mrope_section") or ()) or 3
    return [half // count + (i >= count - half % count) for i in range(count)]  # [1, 1, 2]


def tiny_config(config_class: type, *, optional: bool = False, **sizes: int):
    """An instance of `config_class` with its sizes shrunk (sub-configs too).

    Args:
        config_class: A transformers `PretrainedConfig` subclass.
        optional: Also set the sizes of optional parts the config leaves None (LoRA ranks, shared
            experts, a sliding window, a sparse-attention indexer), for models that need them.
        sizes: Overrides of `TINY` (d_model, d_hidden, num_layers, num_heads, num_kv_heads,
            head_dim, lora_rank, num_experts, top_k, num_shared, vocab_size, dense_layers,
            d_state, ssm_groups, window, index_kv_heads, index_topk, index_block, clip).
    """
    unknown = set(sizes) - set(TINY)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; expected some of {sorted(TINY)}")
    sizes = {**TINY, **sizes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {}
        for key, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
            if isinstance(sub_class, type):
                sub = tiny_config(sub_class, optional=optional, **sizes).to_dict()
                if "attn" in key and "rope_theta" not in sub and "rope_parameters" not in sub:
                    sub["rope_theta"] = _ROPE_THETA  # an attention sub-config holds RoPE's base
                kwargs[key] = sub
        kwargs.update(_shrunk_fields(config_class(**kwargs), sizes, optional))
        return config_class(**kwargs)


_ROPE_THETA = 10000.0
TINY = dict(
    d_model=32,
    d_hidden=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    lora_rank=16,
    num_experts=8,
    top_k=2,
    num_shared=1,
    vocab_size=128,
    dense_layers=0,
    d_state=16,
    ssm_groups=2,
    window=4,
    index_kv_heads=1,
    index_topk=4,
    index_block=2,
    clip=8,
)
_HEADS = ("ForCausalLM", "ForConditionalGeneration", "Model")


def model_classes(family: FamilyInfo) -> list[type]:
    """The family's model classes to build, best first: a causal LM over a plain (text)
    config, then any causal LM or conditional generator, then a bare model."""
    transformers = require("transformers", "hf", "moekit.hf")
    module = importlib.import_module(family.module)
    classes = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, transformers.PreTrainedModel)
        and cls.__module__ == module.__name__
        and not cls.__name__.endswith("PreTrainedModel")
    ]

    def rank(cls: type) -> tuple[int, int]:
        head = next((i for i, h in enumerate(_HEADS) if cls.__name__.endswith(h)), len(_HEADS))
        return (bool(getattr(cls.config_class, "sub_configs", None)), head)

    return sorted((c for c in classes if rank(c)[1] < len(_HEADS)), key=rank)


# tried in turn until a model builds, holds experts and runs: more layers reach the MoE
# layers of families whose first layers are dense and the attention of hybrid families; then
# the same with the optional parts set (`tiny_config(optional=True)`)
_ATTEMPTS = ({}, {"num_layers": 4}, {"num_layers": 8})
# families whose configs validate a size against a rule of their own
_FAMILY_SIZES = {
    "zaya": {"top_k": 1},
    "kolibri1_1": {"head_dim": 16},  # NVFP4 keys and values: head_dim a multiple of 16
    "mimo_v2_flash": {"num_kv_heads": 2},  # its sliding layers have twice the kv heads
}


def tiny_model(family: FamilyInfo | str, seed: int = 0, **sizes: int) -> nn.Module:
    """A tiny random model of `family` (a `FamilyInfo` or its name) that holds MoE experts,
    in eval mode.

    Tries the family's model classes (`model_classes`) with `tiny_config` sizes (`sizes` over
    `TINY`; 2, then 4, then 8 layers; then these again with the optional parts set) and returns
    the first that builds, has an experts module and runs a forward on `dummy_inputs`. Raises
    `TinyModelError` with the reasons when none does.
    """
    family = _family_info(family)
    reasons: dict[str, str] = {}
    for optional in (False, True):
        for attempt in _ATTEMPTS:
            for cls in model_classes(family):
                options = {**attempt, **_FAMILY_SIZES.get(family.name, {}), **sizes}
                try:
                    torch.manual_seed(seed)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        config = tiny_config(cls.config_class, optional=optional, **options)
                        model = cls(config).eval()
                        if not any(_holds_experts(m) for m in model.modules()):
                            raise TinyModelError("built, but with no experts module")
                        with torch.no_grad():
                            model(**dummy_inputs(model, 1, 4))
                except Exception as error:  # noqa: BLE001 - the reasons are reported
                    reasons[cls.__name__] = _reason(error)
                    continue
                torch.manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    config = tiny_config(cls.config_class, optional=optional, **options)
                    return cls(config).eval()  # fresh RNG
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no model class"
    raise TinyModelError(f"{family.name}: {detail}")


def _reason(error: Exception) -> str:
    """One line: the error's type and the informative lines of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(line for line in lines if not line.startswith("Class validation error"))
    return f"{type(error).__name__}: {text[:240]}"


def dummy_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict:
    """Random token ids [batch, length] for `model` (decoder ids too for encoder-decoders, token
    modalities for an MoE that routes by them), below half the vocabulary (clear of the special
    tokens `tiny_config` moves to its top)."""
    config = model.config
    vocab = getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", TINY["vocab_size"]
    )
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(2, vocab // 2), (batch, length), generator=generator)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.flip(1)
    if _MODALITY_IDS in inspect.signature(model.forward).parameters:
        # an MoE that routes tokens by modality (text and vision experts): the second half of the
        # tokens are marked vision tokens, so both sets of experts run
        inputs[_MODALITY_IDS] = (torch.arange(length) >= length // 2).int().expand(batch, -1)
    return inputs


_MODALITY_IDS = "moe_mm_token_type_ids"


def _holds_experts(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) or type(module).__name__.endswith("Experts")


def _family_info(family: FamilyInfo | str) -> FamilyInfo:
    if isinstance(family, FamilyInfo):
        return family
    for info in moe_families():
        if info.name == family:
            return info
    names = ", ".join(f.name for f in moe_families())
    raise ValueError(
        f"family={family!r} is not an MoE family of the installed transformers: {names}"
    )
