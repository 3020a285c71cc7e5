"""What moekit covers of a transformers MoE model, read-only: `moekit info --hf MODEL_DIR`.

coverage(model) -> [BlockCoverage]      each MoE block: its classes, whether the experts
                                        backend and `patch_model` cover it, and why not
saved_coverage(path) -> (config, rows)  the same for a saved model directory, built from
                                        its config on the meta device (no weights read);
                                        the experts' stored dtypes come from its
                                        safetensors headers (quantised weights: not covered)
format_coverage(rows) -> str
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .experts import layout_of, unsupported_weights
from .patch import experts_of, holds_experts, patch_reason, router_of

__all__ = ["BlockCoverage", "coverage", "format_coverage", "saved_coverage"]


@dataclass(frozen=True)
class BlockCoverage:
    """One MoE block of a model."""

    name: str  # its module path
    block: str  # class names
    router: str
    experts: str
    backend: str | None  # None: experts_implementation="moekit" runs its experts; else why not
    patch: str | None  # None: patch_model runs it on moekit; else why not


def _backend_reason(block: nn.Module) -> str | None:
    experts = experts_of(block)
    if experts is None or not hasattr(experts, "has_gate"):
        return "its experts are not on transformers' ExpertsInterface"
    return unsupported_weights(experts, layout_of(experts))


def coverage(model: nn.Module, stored: dict[str, str] | None = None) -> list[BlockCoverage]:
    """Each MoE block of `model` (one row per block, in module order).

    Args:
        model: A transformers model (real or on the meta device).
        stored: Optional {parameter name: stored dtype} of a checkpoint: an expert weight
            stored in a quantised dtype makes its block uncovered.
    """
    rows = []
    for name, block in model.named_modules():
        if not holds_experts(block):
            continue
        router, _ = router_of(block)
        if router is None:
            router = getattr(block, "router", None) or getattr(block, "gate", None)
        experts = experts_of(block)
        backend, patch = _backend_reason(block), patch_reason(block)
        quantised = _quantised(name, stored or {})
        if quantised is not None:
            backend = patch = quantised
        rows.append(
            BlockCoverage(
                name,
                type(block).__name__,
                type(router).__name__ if isinstance(router, nn.Module) else "-",
                type(experts).__name__ if isinstance(experts, nn.Module) else "-",
                backend,
                patch,
            )
        )
    return rows


def _quantised(block_name: str, stored: dict[str, str]) -> str | None:
    """Why a block's stored expert weights are not readable, or None. Keys match with or
    without the model's first prefix (a head model's `model.` saved from its bare model)."""
    prefixes = (f"{block_name}.experts.", f"{block_name.partition('.')[2]}.experts.")
    for key, dtype in stored.items():
        if key.startswith(prefixes) and dtype not in ("F32", "F16", "BF16", "F64"):
            return f"{key} is stored as {dtype}: quantised expert weights are not supported"
    return None


def _stored_dtypes(path: Path) -> dict[str, str]:
    """{tensor name: dtype} from the safetensors headers of a model directory."""
    from safetensors import safe_open

    dtypes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                dtypes[key] = handle.get_slice(key).get_dtype()
    return dtypes


def saved_coverage(path: str | Path):
    """(config, coverage rows) of a saved transformers model directory, without its weights.

    Raises:
        ValueError: `path` is not a directory with a transformers config.json.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--hf: {path} is not a saved transformers model (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"--hf: cannot read {path / 'config.json'}: {error}") from error
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # no causal LM head for this config: the bare model
            model = AutoModel.from_config(config)
    rows = coverage(model, _stored_dtypes(path))
    quantization = getattr(config, "quantization_config", None)
    if quantization:  # weights quantised on load even where the files hold floats
        method = dict(quantization).get("quant_method", "a quantization_config")
        reason = (
            f"the checkpoint is quantised ({method}): quantised expert weights are not supported"
        )
        rows = [replace(r, backend=reason, patch=reason) for r in rows]
    return config, rows


def format_coverage(rows: list[BlockCoverage]) -> str:
    """The rows as text: a line per block, then a summary."""
    if not rows:
        return "no MoE blocks"
    lines = []
    for row in rows:
        backend = "✓" if row.backend is None else f"✗ ({row.backend})"
        patch = "✓" if row.patch is None else f"✗ ({row.patch})"
        lines.append(
            f"{row.name}: {row.block} (router {row.router}, experts {row.experts})\n"
            f"    backend {backend}\n    patch   {patch}"
        )
    backend = sum(r.backend is None for r in rows)
    patch = sum(r.patch is None for r in rows)
    lines.append(
        f"{len(rows)} MoE blocks: {backend} on the experts backend "
        f'(experts_implementation="moekit"), {patch} patched by moekit.hf.patch_model'
    )
    return "\n".join(lines)
