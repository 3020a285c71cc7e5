"""Where each tensor of a transformers model is in its safetensors files, by the family's own
checkpoint conversions (transformers' `conversion_mapping`: renamings, per-expert tensors
stacked and gate | up concatenated), read without transformers' loader.

    checkpoint_map(model, model_dir) -> CheckpointMap | str   (str: why it cannot be mapped)
      .rows(name, e) -> [a, b]          expert e of the stacked tensor `name`, in the model's
                                        layout, as the files store it (one read)
      .tensor(key), .rows_of(key, first, last), .mxfp4_expert(name, e)
      .opened()                         the files held open while reading (`hf.stream`)
    digest(rows) -> str                 sha256 of a tensor's bytes (`hf.verify`)

A dense tensor is under one key; a stacked expert tensor [E, a, b] under one key or as E
per-expert keys; gpt-oss's MXFP4 experts as `*_blocks` / `*_scales`. Conversions other than
renamings and expert merges (transposes, splits) are not mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .experts import QUANT_SPEC

__all__ = ["CheckpointMap", "checkpoint_map", "digest"]

_MAPPED_BYTES = 64 << 20  # read from the files between two closes (`CheckpointMap.opened`)


def digest(rows: Tensor) -> str:
    """sha256 of a tensor's bytes (its dtype as stored)."""
    return hashlib.sha256(rows.contiguous().view(torch.uint8).numpy()).hexdigest()  # no copy


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
