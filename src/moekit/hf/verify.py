"""Expert weights checked against the files they were loaded from (`moekit info --hf DIR
--verify`, and `moekit finetune` after loading).

    verify_experts(model, model_dir) -> VerifyReport
        each stacked expert tensor the model holds, expert by expert, against the same rows of
        the safetensors files (read as slices, one expert at a time): a mismatch is a
        `LoaderFault` naming the layer, the tensor and the expert, and what it looks like (a
        transposed expert, another expert's rows, something else); experts whose stored
        weights are exact copies of each other are reported (legitimate after upcycling)

Where each tensor is in the files comes from the family's own conversion mapping
(`hf.checkpoint.checkpoint_map`: renamings, per-expert tensors fused on load), read independently
of the loader. Under expert parallelism each rank checks the experts it holds (rows first ..
first + n - 1 against the same rows of the files); rows held quantised by the digests of
the rows as they were read, before quantising. A checkpoint stored in a layout that map does
not cover is listed as unverified, never guessed at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointMap, checkpoint_map, digest
from .experts import layout_of, quantized, stored_weight
from .patch import experts_of, holds_experts
from .stream import DIGESTS, SHARD, is_stand_in

__all__ = ["LoaderFault", "VerifyReport", "files_of", "verify_experts", "verify_tensor"]


class LoaderFault(ValueError):
    """Loaded expert weights that differ from the files."""


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)  # tensor names compared expert by expert
    experts: int = 0  # expert slices compared
    unverified: list[str] = field(default_factory=list)  # not stored under the model's name
    duplicates: list[tuple[str, int, int]] = field(default_factory=list)  # (tensor, e, e')

    def summary(self) -> str:
        line = f"{self.experts} expert slices of {len(self.checked)} tensors equal the files"
        if self.unverified:
            line += f"; {len(self.unverified)} stored otherwise, not verified"
        if self.duplicates:
            pairs = ", ".join(f"{n} experts {a}={b}" for n, a, b in self.duplicates[:4])
            line += f"; exact copies (fine after upcycling): {pairs}"
        return line


def files_of(model_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model directory (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    found = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            found |= dict.fromkeys(f.keys(), file)
    return found


def _diagnose(loaded_digest: str, stored, e: int, count: int, loaded=None) -> str:
    """What expert e's loaded rows are, where they are not the stored expert e: compared by
    value (`loaded`, the rows as held) or, for rows held quantised, by the digest of the rows
    as they were read."""
    want = stored(e)
    if loaded is not None and loaded.dim() == 2 and loaded.shape[0] == loaded.shape[1]:
        if torch.equal(loaded.T, want.to(loaded.dtype)):
            return "transposed"
    elif want.dim() == 2 and digest(want.T) == loaded_digest:
        return "transposed"
    for other in range(count):
        rows = stored(other)
        same = (
            torch.equal(loaded, rows.to(loaded.dtype))
            if loaded is not None
            else digest(rows) == loaded_digest
        )
        if other != e and same:
            return f"expert {other}'s rows of the file"
    return "different values"


def verify_tensor(
    block_name: str,
    attr: str,
    name: str,
    weight: torch.Tensor | None,
    cmap: CheckpointMap,
    report: VerifyReport,
    first: int = 0,
    digests: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """One stacked expert tensor against the files, expert by expert, into `report`: `weight`
    [n, a, b] holds experts first .. first + n - 1 of the model's tensor `name` (`attr` of the
    experts of block `block_name`); for rows held quantised, `weight` is None and `digests`
    the sha256 of each expert's rows as they were read. `dtype`: the dtype the rows were
    loaded in, where they are held in another since (float32 master weights of bfloat16).

    Raises:
        LoaderFault: One line naming the layer, tensor and expert that differ.
    """
    if not cmap.has(name):
        report.unverified.append(name)
        return
    count = cmap.num_experts(name)
    if weight is not None:
        shape = (count, *cmap.rows(name, 0).shape)
        full = (count, *weight.shape[1:])
        if tuple(full) != shape:
            flipped = (count, weight.shape[2], weight.shape[1]) if weight.dim() == 3 else None
            what = "transposed" if shape == flipped else "of another shape"
            raise LoaderFault(
                f"{block_name}: {attr} was loaded {what}: {tuple(full)} in the model, "
                f"{shape} in {cmap.where(name)}"
            )
    held = weight.shape[0] if weight is not None else len(digests)
    seen: dict[str, int] = {}
    for i in range(held):
        e = first + i
        want = cmap.rows(name, e)  # [a, b]: one expert read
        wanted = digest(want)
        if weight is not None:
            loaded = weight[i].detach().cpu()
            if dtype is not None and dtype != loaded.dtype:
                loaded = loaded.to(dtype)
            same, loaded_digest = torch.equal(loaded, want.to(loaded.dtype)), None
        else:
            loaded, loaded_digest = None, digests[i]
            same = loaded_digest == wanted
        if not same:
            what = _diagnose(loaded_digest, lambda x: cmap.rows(name, x), e, count, loaded)
            raise LoaderFault(
                f"{block_name}: {attr}, expert {e}: the loaded weights are not the file's "
                f"({what}; {cmap.where(name)})"
            )
        if wanted in seen:
            report.duplicates.append((f"{block_name}.{attr}", seen[wanted], e))
        seen.setdefault(wanted, e)
        report.experts += 1
    report.checked.append(name)


def _plain(name: str) -> str:
    """A model tensor's name without PEFT's wrapping (`base_model.model.`, `.base_layer`)."""
    return name.replace(".base_layer", "").removeprefix("base_model.model.")


def verify_experts(
    model: nn.Module,
    model_dir: Path,
    report: VerifyReport | None = None,
    dtype: torch.dtype | None = None,
) -> VerifyReport:
    """Compare the expert rows the model holds with the same rows of the files, expert by
    expert, into `report` (a new one by default): under expert parallelism this rank's
    experts; rows held quantised by the digests of the rows as they were read (`hf.stream`;
    those quantised by transformers' loader were checked as they arrived, into the report
    `hf.load.load_model` was given). `dtype`: the dtype the model was loaded in, where its
    trained tensors are held in another since (`verify_tensor`).

    Raises:
        LoaderFault: One line naming the layer, tensor and expert that differ.
    """
    report = VerifyReport() if report is None else report
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cmap = checkpoint_map(base, files_of(Path(model_dir)))
    names = {id(p): _plain(n) for n, p in base.named_parameters()}
    for block_name, block in base.named_modules():
        if not holds_experts(block) or (experts := experts_of(block)) is None:
            continue
        if not hasattr(experts, "has_gate"):
            continue
        layout = layout_of(experts)
        block_name = _plain(block_name)
        first = experts.__dict__.get(SHARD, (0,))[0]
        for attr in (layout.up_name, "down_proj"):
            name = f"{block_name}.experts.{attr}"
            if isinstance(cmap, str):  # a checkpoint hf.stream does not map
                report.unverified.append(name)
                continue
            if quantized(experts, attr) is not None:
                digests = experts.__dict__.get(DIGESTS, {}).get(attr)
                if digests is not None:  # read by hf.stream; else checked as it loaded
                    verify_tensor(block_name, attr, name, None, cmap, report, first, digests)
                continue
            weight = stored_weight(experts, attr)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.is_meta:
                continue
            if is_stand_in(weight):  # rows not installed yet (`expert_parallel`)
                continue
            name = names.get(id(weight), name)
            verify_tensor(block_name, attr, name, weight, cmap, report, first, None, dtype)
    return report
