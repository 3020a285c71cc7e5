"""Loading what `moekit finetune` trains: the tokenizer, the config and the model.

    load_tokenizer(model_dir, vocab_size)   the directory's (or hub id's) tokenizer, else bytes
    load_config(model_dir)                  the model's config, before any weight is read
    load_model(model_dir, dtype)            the causal LM on moekit's backend, patched

A model directory that is not one, a hub id while offline, a truncated or garbage safetensors
file: one line naming `--model`, never a traceback from deep in transformers.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .._extras import require
from .patch import holds_experts, patch_model

__all__ = ["ByteTokenizer", "load_config", "load_model", "load_tokenizer"]

log = logging.getLogger(__name__)


class ByteTokenizer:
    """UTF-8 bytes as token ids, for model directories without a tokenizer."""

    name_or_path = "bytes"
    eos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(
                f"the model directory has no tokenizer and its vocabulary ({vocab_size}) is too "
                "small for bytes (256): save a tokenizer with the model"
            )
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _is_hub_id(model_dir: Path) -> bool:
    return not model_dir.exists() and str(model_dir).count("/") == 1


def _check_source(model_dir: Path) -> bool:
    """Whether `model_dir` is local; a path that is neither a model directory nor a hub id
    is one line."""
    if model_dir.exists():
        if not (model_dir / "config.json").is_file():
            raise ValueError(
                f"--model: {model_dir} is not a saved transformers model (no config.json)"
            )
        return True
    if not _is_hub_id(model_dir):
        raise ValueError(f"--model: {model_dir} is neither a model directory nor a hub id")
    return False


def _offline_hint(error: Exception) -> str:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{first} (offline? a hub id needs the network or the files in the local cache)"


def load_config(model_dir: Path):
    """The model's transformers config, read before its weights (data errors come first)."""
    transformers = require("transformers", "hf", "moekit finetune")
    local = _check_source(model_dir)
    if not local:  # no retries against an unreachable hub: fail in seconds
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=local)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model: cannot load {model_dir}: {_offline_hint(error)}") from error


def load_tokenizer(model_dir: Path, vocab_size: int):
    """The directory's (or hub repository's) own tokenizer, else bytes."""
    names = ("tokenizer.json", "tokenizer_config.json")
    local = model_dir.exists()
    if not local or any((model_dir / name).is_file() for name in names):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=local)
        except (OSError, ValueError) as error:
            if local:
                raise ValueError(
                    f"--model: cannot load the tokenizer of {model_dir}: {error}"
                ) from error
            return ByteTokenizer(vocab_size)  # a hub model without a tokenizer
        tokenizer.model_max_length = 1 << 30  # rows are cut by moekit, not the tokenizer
        return tokenizer
    return ByteTokenizer(vocab_size)


def _from_pretrained(auto, model_dir: Path, options: dict) -> nn.Module:
    try:
        try:
            return auto.from_pretrained(str(model_dir), experts_implementation="moekit", **options)
        except (ValueError, TypeError) as error:  # a family off the interface takes no backend
            if "experts_implementation" not in str(error) and "moekit" not in str(error):
                raise
            return auto.from_pretrained(str(model_dir), **options)
    except (OSError, ValueError, RuntimeError) as error:  # offline, corrupt or truncated files
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "safetensors" in first.lower() or "header" in first.lower() or "deserializ" in first:
            first += " (a truncated or corrupt safetensors file)"
        raise ValueError(f"--model: cannot load {model_dir}: {first}") from error
    except Exception as error:  # safetensors' own SafetensorError is no OSError
        if type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(
            f"--model: cannot load {model_dir}: {error} (a truncated or corrupt safetensors file)"
        ) from error


def load_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """A saved transformers causal LM, its experts on moekit's backend where its family is
    on the ExpertsInterface, then patched; logs what runs where."""
    transformers = require("transformers", "hf", "moekit finetune")
    local = _check_source(model_dir)
    options = dict(dtype=dtype, local_files_only=local)  # a hub id: fetched, when online
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained(transformers.AutoModelForCausalLM, model_dir, options)
    blocks = [m for m in model.modules() if holds_experts(m)]
    if not blocks:
        log.warning("%s has no MoE blocks: fine-tuning it anyway, as a dense model", model_dir)
        return model
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patched = patch_model(model)
    for warning in record:
        log.warning("%s", warning.message)
    backend = getattr(model.config, "_experts_implementation", None) == "moekit"
    log.warning(
        "moekit engine: %d of %d MoE blocks patched (moekit's routing and experts)%s",
        patched,
        len(blocks),
        "; the others' experts on moekit's backend" if backend and patched < len(blocks) else "",
    )
    return model
