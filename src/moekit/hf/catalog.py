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
from dataclasses import dataclass
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


# sizes of a tiny model: every config field of these names (any sub-config too) is set so
_SIZES = {
    "d_model": ("hidden_size", "d_model", "n_embd", "hidden_dim", "embed_dim", "dim"),
    "d_hidden": (
        "intermediate_size",
        "moe_intermediate_size",
        "ffn_dim",
        "d_ff",
        "ffn_hidden_size",
        "shared_expert_intermediate_size",
        "expert_ffn_size",
        "moe_ffn_hidden_size",
        "ffn_intermediate_size",
        "expert_intermediate_size",
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
    ),
    "num_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_n_heads"),
    "head_dim": (
        "head_dim",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "d_kv",
        "kv_channels",
        "qk_head_dim",
    ),
    "lora_rank": ("kv_lora_rank", "q_lora_rank"),
    "num_experts": (
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_num_experts",
        "num_routed_experts",
        "n_experts",
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
    "vocab_size": ("vocab_size",),
    "dense_layers": ("first_k_dense_replace", "num_dense_layers", "first_k_dense"),
}

_MOE_SWITCHES = ("enable_moe_block", "is_moe", "use_moe", "moe_enabled")
_GROUPS = ("n_group", "num_expert_group", "n_groups_routing")
_GROUPS_KEPT = ("topk_group", "topk_groups")


def _shrunk_fields(config, sizes: dict[str, int]) -> dict:
    """The fields of one config (not its sub-configs) set to the tiny sizes."""
    name_to_size = {field: sizes[size] for size, fields in _SIZES.items() for field in fields}
    fields = {}
    for key, value in config.to_dict().items():
        if isinstance(value, bool) or not isinstance(value, (int, type(None))):
            continue
        optional = key in _SIZES["lora_rank"] or key in _SIZES["num_shared"]
        if key in name_to_size and (value is not None or not optional):
            fields[key] = name_to_size[key]
        elif key.endswith("token_id") and value is not None and value >= sizes["vocab_size"]:
            fields[key] = sizes["vocab_size"] - 1
    for key in _MOE_SWITCHES:  # families whose MoE block is an option
        if getattr(config, key, None) is False:
            fields[key] = True
    if getattr(config, "decoder_sparse_step", None) not in (None, 0):
        fields["decoder_sparse_step"] = 1  # every layer an MoE layer
    for keys, size in ((_GROUPS, min(4, sizes["num_experts"])), (_GROUPS_KEPT, 2)):
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                fields[key] = size
    return fields


def tiny_config(config_class: type, **sizes: int):
    """An instance of `config_class` with its sizes shrunk (sub-configs too).

    Args:
        config_class: A transformers `PretrainedConfig` subclass.
        sizes: Overrides of `TINY` (d_model, d_hidden, num_layers, num_heads, num_kv_heads,
            head_dim, lora_rank, num_experts, top_k, vocab_size, dense_layers).
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
                kwargs[key] = tiny_config(sub_class, **sizes).to_dict()
        kwargs.update(_shrunk_fields(config_class(**kwargs), sizes))
        return config_class(**kwargs)


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
# layers of families whose first layers are dense and the attention of hybrid families
_ATTEMPTS = ({}, {"num_layers": 4}, {"num_layers": 8})
# families whose configs validate a size against a rule of their own
_FAMILY_SIZES = {"zaya": {"top_k": 1}, "kolibri1_1": {"head_dim": 16}}


def tiny_model(family: FamilyInfo | str, seed: int = 0, **sizes: int) -> nn.Module:
    """A tiny random model of `family` (a `FamilyInfo` or its name) that holds MoE experts,
    in eval mode.

    Tries the family's model classes (`model_classes`) with `tiny_config` sizes (`sizes` over
    `TINY`; 2, then 4, then 8 layers) and returns the first that builds, has an experts module
    and runs a forward on `dummy_inputs`. Raises `TinyModelError` with the reasons when none
    does.
    """
    family = _family_info(family)
    reasons: dict[str, str] = {}
    for attempt in _ATTEMPTS:
        for cls in model_classes(family):
            options = {**attempt, **_FAMILY_SIZES.get(family.name, {}), **sizes}
            try:
                torch.manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = cls(tiny_config(cls.config_class, **options)).eval()
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
                return cls(tiny_config(cls.config_class, **options)).eval()  # fresh RNG
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no model class"
    raise TinyModelError(f"{family.name}: {detail}")


def _reason(error: Exception) -> str:
    """One line: the error's type and the informative lines of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(line for line in lines if not line.startswith("Class validation error"))
    return f"{type(error).__name__}: {text[:240]}"


def dummy_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict:
    """Random token ids [batch, length] for `model` (decoder ids too for encoder-decoders),
    below half the vocabulary (clear of the special tokens `tiny_config` moves to its top)."""
    config = model.config
    vocab = getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", TINY["vocab_size"]
    )
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(2, vocab // 2), (batch, length), generator=generator)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.flip(1)
    return inputs


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
