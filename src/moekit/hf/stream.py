"""Streaming load: a saved transformers model built on the meta device and filled tensor by
tensor from its safetensors files, the experts quantised as they arrive, each rank's experts
only under expert parallelism.

    checkpoint_map(model, model_dir) -> CheckpointMap | str   (str: why it cannot be mapped)
        where each tensor of the model is in the files, by transformers' own renamings and
        expert merges (`conversion_mapping`): a dense tensor under one key, a stacked expert
        tensor [E, a, b] under one key or as E per-expert keys (gate | up concatenated)
      .rows(name, e) -> [a, b]          expert e of the stacked tensor `name`, in the model's
                                        layout, as the files store it (one read)
    stream_model(model_dir, config, dtype, quantize=None, shard=None, dequantize=False,
                 dense_shard=None) -> (model, None) or (None, why not: the caller loads
                                        with transformers then)

A stacked expert tensor is read one expert at a time: with `quantize` ("nf4", "int8") a few
experts are quantised at a time (`moekit.quant`), so the stack never exists in the compute
dtype; with `shard` (first expert, count) only those rows are read (safetensors slices), the
rest of the stack never leaves the file. Such a tensor's parameter is then a one-element
stand-in expanded to the full stack's shape and dtype (PEFT sizes an adapter for every expert
from it); the rows live beside it (`LOCAL` in the module's `__dict__`, or the quantised
buffers `<name>_qdata`/`_qscales` under `QUANT_SPEC`) and `expert_parallel` installs them.
With `dense_shard` (rank, ranks of FSDP2) every other weight holds only the rows
`fully_shard` keeps on that rank (`_fsdp_rows`).
The digest of each expert's rows as read (`DIGESTS`) is kept for `hf.verify`, which compares
it with the files independently of this reader.

Peak host memory is about the final model plus one expert (a few, quantising), never the
model in the compute dtype beside its quantised form. Families whose checkpoint conversions
are other than renamings and expert merges (transposes, splits) are not mapped: the caller
falls back to transformers' loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..quant import SCHEMES, QuantizedExperts
from .experts import QUANT_SPEC, layout_of
from .patch import experts_of, holds_experts

__all__ = [
    "DIGESTS",
    "LOCAL",
    "SHARD",
    "CheckpointMap",
    "checkpoint_map",
    "digest",
    "is_stand_in",
    "stacked_names",
    "stream_model",
]

log = logging.getLogger(__name__)

LOCAL = "_moekit_local"  # {name: this rank's rows [n, a, b]} behind a stand-in parameter
SHARD = "_moekit_shard"  # (first expert, count, E): the experts a module's rows are
DIGESTS = "_moekit_digests"  # {name: [sha256 of each local expert's rows as read]}
_QUANT_CHUNK = 4  # experts read and quantised at a time
_MAPPED_BYTES = 64 << 20  # read from the files between two closes (`CheckpointMap.opened`)


def digest(rows: Tensor) -> str:
    """sha256 of a tensor's bytes (its dtype as stored)."""
    return hashlib.sha256(rows.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def is_stand_in(t: Tensor) -> bool:
    """Whether `t` is a stand-in of a stacked tensor: one element expanded (no memory)."""
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


def stacked_names(experts: nn.Module) -> list[str]:
    """The experts module's tensors stacked over experts (dim 0 = E): weights, biases."""
    layout = layout_of(experts)
    names = [layout.up_name, "down_proj"]
    if layout.has_bias:
        names += [f"{layout.up_name}_bias", "down_proj_bias"]
    return names


@dataclass
class _PerExpert:
    """A stacked tensor stored as one key an expert and part: `templates[p].format(e=e)`,
    the parts concatenated on dim 0 of an expert's rows (gate | up)."""

    templates: list[str | None]
    experts: set[int] = field(default_factory=set)


@dataclass
class CheckpointMap:
    """Where each tensor of a model is in its safetensors files (module docstring)."""

    files: dict[str, Path]  # {file key: file}
    dense: dict[str, str]  # {model tensor name: file key}
    per_expert: dict[str, _PerExpert]  # {model tensor name: its per-expert keys}
    # {model tensor name: (blocks key, scales key)}: experts stored in MXFP4 (gpt-oss)
    mxfp4: dict[str, tuple[str, str]] = field(default_factory=dict)
    _handles: dict[Path, object] | None = field(default=None, repr=False)
    _mapped: int = field(default=0, repr=False)  # bytes read since the files were opened

    @contextlib.contextmanager
    def opened(self) -> Iterator[CheckpointMap]:
        """The files held open while reading (each header parsed once).

        safetensors maps a file into memory and returns views of the mapping: the pages read
        stay in the process's resident memory while the file is open. Held open, the files
        are closed and opened again after every `_MAPPED_BYTES` read, so those pages never
        add up to the checkpoint (the reader copies what it keeps)."""
        self._handles = {}
        try:
            yield self
        finally:
            self._release()
            self._handles = None

    def _release(self) -> None:
        for handle in (self._handles or {}).values():
            handle.__exit__(None, None, None)
        if self._handles:
            self._handles.clear()
        self._mapped = 0

    def _read(self, key: str, part: int | slice | None = None) -> Tensor:
        """The tensor under `key` (`part`: an index or a slice of dim 0), a view of the
        mapping."""
        from safetensors import safe_open

        path = self.files[key]
        if self._handles is None:  # not `opened`: open for this read
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(key) if part is None else f.get_slice(key)[part]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt").__enter__()
        f = self._handles[path]
        t = f.get_tensor(key) if part is None else f.get_slice(key)[part]
        self._mapped += t.nbytes
        if self._mapped > _MAPPED_BYTES:
            self._release()
        return t

    def tensor(self, key: str) -> Tensor:
        """The tensor under `key`, a copy (no view of the file's mapping)."""
        return self._read(key).clone()

    def rows_of(self, key: str, first: int, last: int) -> Tensor:
        """Rows first .. last - 1 (dim 0) of the tensor under `key` (a view of the mapping)."""
        return self._read(key, slice(first, last))

    def where(self, name: str) -> str:
        """The file a model tensor is read from (for messages)."""
        key = self.dense.get(name) or self.mxfp4.get(name, (None,))[0]
        if key is None:
            key = next(t.format(e=0) for t in self.per_expert[name].templates if t)
        return self.files[key].name

    def has(self, name: str) -> bool:
        return name in self.dense or name in self.per_expert or name in self.mxfp4

    def num_experts(self, name: str) -> int:
        if name in self.per_expert:
            return len(self.per_expert[name].experts)
        key = self.mxfp4[name][0] if name in self.mxfp4 else self.dense[name]
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_slice(key).get_shape()[0]

    def mxfp4_expert(self, name: str, e: int) -> tuple[Tensor, Tensor]:
        """Expert e's MXFP4 codes [d_out, d_in / 2] and exponents [d_out, d_in / 32]."""
        blocks, scales = self.mxfp4[name]
        codes = self._read(blocks, e)  # [d_out, d_in / 32, 16]
        return codes.reshape(codes.shape[0], -1), self._read(scales, e)

    def rows(self, name: str, e: int) -> Tensor:
        """Expert e's rows of the stacked tensor `name` in the model's layout, as stored (MXFP4:
        its codes then its exponents, bytes)."""
        if name in self.mxfp4:
            return torch.cat([t.reshape(-1) for t in self.mxfp4_expert(name, e)])
        key = self.dense.get(name)
        if key is not None:
            return self._read(key, e)
        parts = [self._read(t.format(e=e)) for t in self.per_expert[name].templates]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _files(model_dir: Path) -> dict[str, Path]:
    from .verify import files_of

    return files_of(model_dir)


def _merge_parts(converter) -> bool:
    """Whether a transformers WeightConverter only stacks per-expert tensors (and puts gate
    and up side by side): the conversions this reader performs itself."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    return ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def checkpoint_map(model: nn.Module, model_dir: Path | dict[str, Path]) -> CheckpointMap | str:
    """Where each of `model`'s parameters and persistent buffers is in the files, by the
    family's own conversion mapping; a str saying why not (a conversion this reader does not
    perform, a tensor the files lack)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        apply_renamings,
        rename_source_key,
    )

    files = model_dir if isinstance(model_dir, dict) else _files(Path(model_dir))
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    wanted = {  # PEFT's wrapped names as the files name them, its adapters left out
        name.replace(".base_layer", ""): t
        for name, t in model.state_dict(keep_vars=True).items()
        if ".lora_" not in name
    }
    for prefix, module in model.named_modules():  # weights held quantised: not parameters
        for name in module.__dict__.get(QUANT_SPEC, {}):
            wanted.setdefault(f"{prefix.replace('.base_layer', '')}.{name}", getattr(module, name))
    prefix = getattr(model, "base_model_prefix", None)
    dense: dict[str, str] = {}
    per_expert: dict[str, _PerExpert] = {}
    mxfp4: dict[str, tuple[str, str]] = {}
    for key in files:
        target, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
        if pattern is None:
            if target in wanted:
                dense[target] = key
            elif target.endswith("_blocks") and target.removesuffix("_blocks") in wanted:
                scales = key.removesuffix("_blocks") + "_scales"
                if scales in files:  # MXFP4 as gpt-oss stores it
                    mxfp4[target.removesuffix("_blocks")] = (key, scales)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        if not _merge_parts(converter):
            ops = ", ".join(type(op).__name__ for op in converter.operations)
            return f"its checkpoint's {pattern!r} is converted by {ops}"
        if target not in wanted:
            continue
        renamed = apply_renamings(key, renamings)
        found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        if found is None or not renamed.endswith(found.group(0)):
            return f"its checkpoint key {key!r} does not name an expert"
        e = int(found.group(1))
        part = converter.source_patterns.index(pattern)
        template = (
            renamed[: found.start(1)].replace("{", "{{").replace("}", "}}")
            + "{e}"
            + renamed[found.end(1) :]
        )
        entry = per_expert.setdefault(target, _PerExpert([None] * len(converter.source_patterns)))
        # the key as stored (renamings undone): the one whose expert index is e
        entry.templates[part] = _stored_template(key, e, template, renamed)
        entry.experts.add(e)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [
        name
        for name, t in wanted.items()
        if name not in dense
        and name not in per_expert
        and name not in mxfp4
        and name not in tied
        and t.is_meta
    ]
    if missing:
        return f"the files have no tensor for {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        )
    for name, entry in per_expert.items():
        if None in entry.templates or entry.experts != set(range(len(entry.experts))):
            return f"the files hold {name} for experts {sorted(entry.experts)[:8]}, not 0..E-1"
    return CheckpointMap(files, dense, per_expert, mxfp4)


def _stored_template(key: str, e: int, template: str, renamed: str) -> str:
    """The file key of every expert, from one key whose expert is e: where renamings changed
    the key, its stored form with the expert index replaced."""
    if key == renamed:
        return template
    marker = f".{e}."
    index = key.rfind(marker)
    head, tail = key[:index], key[index + len(marker) :]
    return head.replace("{", "{{").replace("}", "}}") + ".{e}." + tail


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers (RoPE
    frequencies, computed in `__init__`, not stored) real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _params_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype, experts_implementation="moekit"
            )
        except (ValueError, TypeError) as error:  # a family off the interface takes no backend
            if "experts_implementation" not in str(error) and "moekit" not in str(error):
                raise
            return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    found = {}
    for block in (m for m in model.modules() if holds_experts(m)):
        experts = experts_of(block)
        if experts is not None and hasattr(experts, "has_gate"):
            found[id(experts)] = experts
    return found


def _stand_in(shape, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=requires_grad)


def _read_rows(cmap: CheckpointMap, name: str, e: int) -> Tensor:
    """Expert e's rows of `name` as the loader reads them (tests inject faults here)."""
    return cmap.rows(name, e)


def _expert(cmap: CheckpointMap, name: str, e: int, full: Tensor, hashes: list[str]) -> Tensor:
    """Expert e's rows of `name` in `full`'s dtype, their digest (as stored) into `hashes`."""
    rows = _read_rows(cmap, name, e)
    if tuple(rows.shape) != tuple(full.shape[1:]):
        raise ValueError(
            f"{name}: expert {e} is {tuple(rows.shape)} in {cmap.where(name)}, the model "
            f"expects {tuple(full.shape[1:])}"
        )
    hashes.append(digest(rows))
    return rows.to(full.dtype)


def _fill_mxfp4(
    experts: nn.Module,
    name: str,
    full_name: str,
    cmap: CheckpointMap,
    shard: tuple[int, int],
    hashes: list[str],
) -> None:
    """A stacked weight the checkpoint stores in MXFP4, kept so (`quant`'s "mxfp4")."""
    layout, full = layout_of(experts), experts._parameters[name]
    num_experts, a, b = full.shape
    d_in, d_out = (a, b) if layout.is_transposed else (b, a)  # the bank's [E, d_in, d_out]
    codes, exponents = [], []
    for e in range(shard[0], shard[0] + shard[1]):
        blocks, scales = cmap.mxfp4_expert(full_name, e)
        if blocks.shape != (d_out, d_in // 2) or scales.shape != (d_out, d_in // 32):
            raise ValueError(
                f"{full_name}: expert {e}'s MXFP4 blocks {tuple(blocks.shape)} and scales "
                f"{tuple(scales.shape)} in {cmap.where(full_name)} do not hold a "
                f"[{d_in}, {d_out}] weight"
            )
        hashes.append(digest(torch.cat([blocks.reshape(-1), scales.reshape(-1)])))
        codes.append(blocks)
        exponents.append(scales)
    experts.register_buffer(f"{name}_qdata", torch.stack(codes))
    experts.register_buffer(f"{name}_qscales", torch.stack(exponents))
    spec = ("mxfp4", (shard[1], d_in, d_out), full.dtype)
    experts.__dict__.setdefault(QUANT_SPEC, {})[name] = spec
    experts._parameters[name] = _stand_in(full.shape, full.dtype, False)


def _dequantized_mxfp4(
    experts: nn.Module, name: str, full_name: str, cmap: CheckpointMap, shard: tuple[int, int]
) -> Tensor:
    """The rows of a stacked weight stored in MXFP4, dequantised an expert at a time into
    the parameter's layout and dtype."""
    from ..quant import _mxfp4_expert

    layout, full = layout_of(experts), experts._parameters[name]
    rows = torch.empty((shard[1], *full.shape[1:]), dtype=full.dtype)
    for i, e in enumerate(range(shard[0], shard[0] + shard[1])):
        weight = _mxfp4_expert(*cmap.mxfp4_expert(full_name, e), full.dtype)  # [d_in, d_out]
        rows[i] = weight if layout.is_transposed else weight.T
    return rows


def _fill_experts(
    experts: nn.Module,
    prefix: str,
    cmap: CheckpointMap,
    quantize: str | None,
    shard: tuple[int, int] | None,
    dequantize: bool = False,
) -> None:
    """Each stacked tensor of an experts module, read one expert (a few) at a time."""
    layout = layout_of(experts)
    for name in stacked_names(experts):
        full = experts._parameters[name]  # meta [E, a, b] (or [E, b]: a bias)
        num_experts, dtype = full.shape[0], full.dtype
        first, count = shard if shard is not None else (0, num_experts)
        hashes: list[str] = []

        def read(e: int, name=name, full=full, hashes=hashes) -> Tensor:
            return _expert(cmap, f"{prefix}{name}", e, full, hashes)

        experts.__dict__.setdefault(DIGESTS, {})[name] = hashes
        experts.__dict__[SHARD] = (first, count, num_experts)
        if f"{prefix}{name}" in cmap.mxfp4 and not dequantize:
            _fill_mxfp4(experts, name, f"{prefix}{name}", cmap, (first, count), hashes)
            continue
        if quantize is not None and name in (layout.up_name, "down_proj"):
            parts = []
            for start in range(first, first + count, _QUANT_CHUNK):
                stop = min(start + _QUANT_CHUNK, first + count)
                bank = torch.stack([read(e) for e in range(start, stop)])  # [c, a, b]
                bank = bank if layout.is_transposed else bank.transpose(1, 2)  # [c, in, out]
                parts.append(QuantizedExperts.quantize(bank, quantize))
            experts.register_buffer(f"{name}_qdata", torch.cat([q.data for q in parts]))
            experts.register_buffer(f"{name}_qscales", torch.cat([q.scales for q in parts]))
            shape = (count, *parts[0].shape[1:])
            experts.__dict__.setdefault(QUANT_SPEC, {})[name] = (quantize, shape, dtype)
            experts._parameters[name] = _stand_in(full.shape, dtype, False)
            continue
        if f"{prefix}{name}" in cmap.mxfp4:  # dequantised: a plain weight
            rows = _dequantized_mxfp4(experts, name, f"{prefix}{name}", cmap, (first, count))
            experts.__dict__[DIGESTS].pop(name)  # nothing as stored to compare it with
        else:
            rows = torch.empty((count, *full.shape[1:]), dtype=dtype)
            for i, e in enumerate(range(first, first + count)):
                rows[i] = read(e)
        if count == num_experts:
            experts._parameters[name] = nn.Parameter(rows, requires_grad=full.requires_grad)
        else:  # this rank's rows behind a stand-in of the stack; `expert_parallel` installs
            experts.__dict__.setdefault(LOCAL, {})[name] = rows
            experts._parameters[name] = _stand_in(full.shape, dtype, full.requires_grad)


def _fsdp_rows(
    cmap: CheckpointMap, key: str, param: Tensor, dense_shard: tuple[int, int]
) -> Tensor:
    """A parameter of which only the rows FSDP2 keeps on rank `dense_shard[0]` of
    `dense_shard[1]` are read (dim 0 cut in chunks of ceil(n / ranks), as `fully_shard` cuts
    it). The rest of the tensor is allocated, never written: its pages are never touched, so
    they never become resident, and `fully_shard` copies out this rank's chunk and drops it."""
    rank, ranks = dense_shard
    rows = param.shape[0]
    size = -(-rows // ranks)
    first, last = min(rank * size, rows), min((rank + 1) * size, rows)
    value = torch.empty(param.shape, dtype=param.dtype)
    if last > first:
        value[first:last] = cmap.rows_of(key, first, last).to(param.dtype)
    return value


def stream_model(
    model_dir: Path,
    config,
    dtype: torch.dtype,
    quantize: str | None = None,
    shard: tuple[int, int] | None = None,
    dequantize: bool = False,
    dense_shard: tuple[int, int] | None = None,
) -> tuple[nn.Module | None, str | None]:
    """The causal LM of `model_dir` read tensor by tensor (module docstring); (None, why)
    where its checkpoint is not mapped (`checkpoint_map`).

    Args:
        quantize: "nf4" or "int8": the experts' up and down projections stored so as they
            are read (`hf.quantize`'s buffers), the parameters stand-ins.
        shard: (rank, ranks) of an expert-parallel group: rank's E / ranks experts of every
            MoE block only.
        dequantize: experts the checkpoint stores in MXFP4 dequantised into plain weights
            (an expert at a time; the config then says nothing of quantisation), not kept so.
        dense_shard: (rank, ranks) of FSDP2's data-parallel group: of every parameter outside
            the experts only the rows FSDP2 keeps on this rank (`_fsdp_rows`); the model is
            fit for `fully_shard` over that group and nothing else.
    """
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(
            f"--quantize-experts must be one of {', '.join(SCHEMES)}, got {quantize!r}"
        )
    model = _meta_model(config, dtype)
    cmap = checkpoint_map(model, Path(model_dir))
    if isinstance(cmap, str):
        return None, cmap
    experts_modules = _experts_modules(model)
    with cmap.opened():
        for prefix, module in model.named_modules():
            prefix = f"{prefix}." if prefix else ""
            if id(module) in experts_modules:
                local = None
                if shard is not None:
                    size = module.down_proj.shape[0] // shard[1]
                    local = (shard[0] * size, size)
                _fill_experts(module, prefix, cmap, quantize, local, dequantize)
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                key = cmap.dense.get(f"{prefix}{name}")
                if key is None:
                    continue  # tied: set by `tie_weights` below
                if dense_shard is None or id(module) in experts_modules or param.dim() == 0:
                    value = cmap.tensor(key).to(param.dtype)
                else:
                    value = _fsdp_rows(cmap, key, param, dense_shard)
                module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                key = cmap.dense.get(f"{prefix}{name}")
                if buffer is not None and key is not None:
                    module._buffers[name] = cmap.tensor(key).to(buffer.dtype)
    if cmap.mxfp4 and dequantize:
        model.config.quantization_config = None
        del model.config.quantization_config
    elif cmap.mxfp4:
        log.warning(
            "%d expert weights read as stored in MXFP4 (kept so, dequantised an expert at a "
            "time); the other weights in %s",
            len(cmap.mxfp4),
            dtype,
        )
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"--model {model_dir}: no weights in the files for {left[0]}")
    model.eval()
    return model, None
