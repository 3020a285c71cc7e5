"""Loading what `moekit finetune` trains: the tokenizer, the config and the model.

    load_tokenizer(model_dir, vocab_size)   the directory's (or hub id's) tokenizer, else bytes
    load_config(model_dir)                  the model's config, before any weight is read
    load_model(model_dir, dtype)            the causal LM on moekit's backend, patched

A model directory that is not one, a hub id while offline, a truncated or garbage safetensors
file: one line naming `--model`, never a traceback from deep in transformers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
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


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _hub_offline() -> str | None:
    """Why the hub cannot be asked now (None: it can). huggingface_hub reads its timeouts at
    import and, finding no file in the cache, retries an unreachable hub for ~25 s with
    backoff: a refused or timed-out connection here sends moekit to the cache at once."""
    from huggingface_hub import constants

    from ..train.tracking import server_unreachable

    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE
        return "HF_HUB_OFFLINE is set"
    problem = server_unreachable(constants.ENDPOINT)
    return None if problem is None else f"the hub {constants.ENDPOINT}: {problem}"


def _not_cached(model_dir: Path, offline: str) -> str:
    return (
        f"--model {model_dir}: a hub id not in the local cache, and the hub cannot be asked "
        f"({offline}); download it where there is a network, or give a model directory"
    )


def load_config(model_dir: Path):
    """The model's transformers config, read before its weights (data errors come first)."""
    transformers = require("transformers", "hf", "moekit finetune")
    local = _check_source(model_dir)
    offline = None if local else _hub_offline()
    try:
        return transformers.AutoConfig.from_pretrained(
            str(model_dir), local_files_only=local or offline is not None
        )
    except (OSError, ValueError) as error:
        if offline:
            raise ValueError(_not_cached(model_dir, offline)) from error
        raise ValueError(f"--model: cannot load {model_dir}: {_first_line(error)}") from error


def load_tokenizer(model_dir: Path, vocab_size: int):
    """The directory's (or hub repository's) own tokenizer, else bytes."""
    names = ("tokenizer.json", "tokenizer_config.json")
    local = model_dir.exists()
    if not local or any((model_dir / name).is_file() for name in names):
        from transformers import AutoTokenizer

        cached = local or _hub_offline() is not None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=cached)
        except (OSError, ValueError) as error:
            if local:
                raise ValueError(
                    f"--model: cannot load the tokenizer of {model_dir}: {error}"
                ) from error
            return ByteTokenizer(vocab_size)  # a hub model without a tokenizer
        if not local and not tokenizer.encode("text"):  # one transformers built from the
            return ByteTokenizer(vocab_size)  # config alone: a repository without its files
        tokenizer.model_max_length = 1 << 30  # rows are cut by moekit, not the tokenizer
        return tokenizer
    return ByteTokenizer(vocab_size)


def _damaged_weights(model_dir: Path) -> str | None:
    """The first safetensors file of `model_dir` whose header does not read, and why."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else ():
        try:
            with safe_open(str(path), "pt"):  # the header, checked against the file's size
                pass
        except Exception as error:  # safetensors' SafetensorError is no OSError
            return f"{path.name} is truncated or corrupt ({_first_line(error)})"
    return None


def _from_pretrained(auto, model_dir: Path, options: dict) -> nn.Module:
    try:
        try:
            return auto.from_pretrained(str(model_dir), experts_implementation="moekit", **options)
        except (ValueError, TypeError) as error:  # a family off the interface takes no backend
            if "experts_implementation" not in str(error) and "moekit" not in str(error):
                raise
            return auto.from_pretrained(str(model_dir), **options)
    except Exception as error:  # offline, corrupt or truncated files; SafetensorError too
        corrupt = type(error).__name__ == "SafetensorError" or "deserializ" in str(error)
        if not (corrupt or isinstance(error, (OSError, ValueError, RuntimeError))):
            raise
        damaged = _damaged_weights(model_dir)
        if damaged is not None:
            raise ValueError(
                f"--model {model_dir}: {damaged}; save or download the model again"
            ) from error
        first = _first_line(error)
        if corrupt:
            first += " (a truncated or corrupt safetensors file)"
        raise ValueError(f"--model: cannot load {model_dir}: {first}") from error


def _release_freed_memory() -> None:
    """Ask glibc to return freed heap pages to the OS (`malloc_trim`; a no-op elsewhere): the
    loader's transient stacks otherwise stay resident under the steps that follow."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


@contextlib.contextmanager
def _quantizing(scheme: str, model_dir: Path | None, report) -> Iterator[None]:
    """While transformers loads a model: each stacked expert tensor, as it arrives (one
    layer's stack at a time, after transformers' own conversions), checked against the files
    (`hf.verify`, where the model is a local directory) and stored quantised
    (`QuantizedExperts`), the parameter a one-element stand-in of its shape: the experts
    never exist whole in the compute dtype."""
    from transformers import core_model_loading

    from ..quant import QuantizedExperts
    from .checkpoint import checkpoint_map
    from .experts import QUANT_SPEC, layout_of
    from .verify import files_of, verify_tensor

    original = core_model_loading.set_param_for_module
    files = files_of(model_dir) if model_dir is not None else None
    found = {}  # the checkpoint map, made at the first stack

    def set_param(model, target_name, value, loading_info, hf_quantizer):
        module_path, _, name = target_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        layout = layout_of(module) if hasattr(module, "has_gate") else None
        if layout is None or name not in (layout.up_name, "down_proj") or value.dim() != 3:
            return original(model, target_name, value, loading_info, hf_quantizer)
        if files is not None and report is not None:
            if "map" not in found:
                found["map"] = checkpoint_map(model, files)
            if isinstance(found["map"], str):  # a layout the map does not cover
                report.unverified.append(target_name)
            else:
                block = module_path.rpartition(".")[0]
                verify_tensor(block, name, target_name, value, found["map"], report)
        bank = value if layout.is_transposed else value.transpose(1, 2)  # [E, d_in, d_out]
        quant = QuantizedExperts.quantize(bank, scheme)
        module.register_buffer(f"{name}_qdata", quant.data)
        module.register_buffer(f"{name}_qscales", quant.scales)
        module.__dict__.setdefault(QUANT_SPEC, {})[name] = (scheme, quant.shape, quant.dtype)
        # its shape and dtype in one element (PEFT sizes its LoRA from it, on its device);
        # `quantize_experts` leaves a meta tensor in its place before anything runs
        stand_in = torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
        return original(model, target_name, stand_in, loading_info, hf_quantizer)

    # one tensor at a time, as transformers loads for its own on-the-fly quantisers: its
    # threads would materialise several full-precision stacks before the hook quantises one
    was = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    core_model_loading.set_param_for_module = set_param
    try:
        yield
    finally:
        core_model_loading.set_param_for_module = original
        if was is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = was


def _streamed(model_dir: Path, dtype: torch.dtype, quantize, shard, dequantize, dense_shard):
    """`hf.stream.stream_model`, its errors in load_model's words."""
    from .stream import stream_model

    config = load_config(model_dir)
    damaged = _damaged_weights(model_dir)
    if damaged is not None:
        raise ValueError(f"--model {model_dir}: {damaged}; save or download the model again")
    try:
        return stream_model(model_dir, config, dtype, quantize, shard, dequantize, dense_shard)
    except (OSError, RuntimeError) as error:
        first = _first_line(error)
        if type(error).__name__ == "SafetensorError" or "deserializ" in first:
            first += " (a truncated or corrupt safetensors file)"
        raise ValueError(f"--model: cannot load {model_dir}: {first}") from error


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    quantize: str | None = None,
    report=None,
    shard: tuple[int, int] | None = None,
    dequantize: bool = False,
    dense_shard: tuple[int, int] | None = None,
) -> nn.Module:
    """A saved transformers causal LM, its experts on moekit's backend where its family is
    on the ExpertsInterface, then patched; logs what runs where.

    A model directory is read tensor by tensor (`hf.stream`): `quantize` ("nf4", "int8") the
    experts stored so as they are read, `shard` (rank, ranks) one expert-parallel rank's
    experts only. A hub id, or a checkpoint `hf.stream` does not map, loads with
    transformers: `quantize` then stores each stacked tensor as it arrives (`_quantizing`,
    checked against the files into `report`, a `hf.verify.VerifyReport`), and `shard` is
    left to `expert_parallel`. `dequantize`: experts the checkpoint stores quantised (gpt-oss's
    MXFP4) as plain weights in `dtype` (a base to merge an adapter into). `dense_shard` (rank,
    ranks): of the other parameters only the rows FSDP2 keeps on this rank are read (a model
    for `fully_shard` over those ranks; transformers' loader reads them whole)."""
    transformers = require("transformers", "hf", "moekit finetune")
    local = _check_source(model_dir)
    model = None
    if local:
        model, why = _streamed(model_dir, dtype, quantize, shard, dequantize, dense_shard)
        if model is None:
            log.warning("%s: read with transformers' loader (%s)", model_dir, why)
    if model is None:
        cached = local or _hub_offline() is not None  # a hub id: fetched, when online
        options = dict(dtype=dtype, local_files_only=cached)
        if cached and not local:  # transformers asks the hub for a PEFT adapter_config.json
            options["adapter_kwargs"] = {"local_files_only": True}
        streaming = contextlib.nullcontext()
        if quantize is not None:
            streaming = _quantizing(quantize, model_dir if local else None, report)
        with warnings.catch_warnings(), streaming:
            warnings.simplefilter("ignore")
            model = _from_pretrained(transformers.AutoModelForCausalLM, model_dir, options)
    if quantize is not None:
        _release_freed_memory()  # the loader's freed full-precision stacks, back to the OS
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
