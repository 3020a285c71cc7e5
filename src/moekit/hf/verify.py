"""Expert weights checked against the files they were loaded from (`moekit info --hf DIR
--verify`, and `moekit finetune` after loading).

    verify_experts(model, model_dir) -> VerifyReport
        each stacked expert tensor of the model, expert by expert, against the same rows of
        the safetensors files (read as slices, one expert at a time): a mismatch is a
        `LoaderFault` naming the layer, the tensor and the expert, and what it looks like (a
        transposed expert, another expert's rows, something else); experts whose stored
        weights are exact copies of each other are reported (legitimate after upcycling)

A tensor the checkpoint stores under another name or layout (per-expert tensors transformers
fuses on load) cannot be compared row for row: it is listed as unverified, not guessed at.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .experts import layout_of, quantized, stored_weight
from .patch import experts_of, holds_experts

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


def _stored_name(name: str, files: dict[str, Path]) -> str | None:
    """The checkpoint's name of the model's tensor `name` (a task head's prefix may differ)."""
    plain = name.replace(".base_layer", "").removeprefix("base_model.model.")  # under PEFT
    for candidate in (name, plain, f"model.{plain}"):
        if candidate in files:
            return candidate
    return None


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _diagnose(loaded: torch.Tensor, stored, e: int, count: int) -> str:
    """What expert e's loaded rows are, where they are not the stored expert e."""
    want = stored(e).to(loaded.dtype)
    if loaded.shape[0] == loaded.shape[1] and torch.equal(loaded.T, want):
        return "transposed"
    for other in range(count):
        if other != e and torch.equal(loaded, stored(other).to(loaded.dtype)):
            return f"expert {other}'s rows of the file"
    return "different values"


# per-expert checkpoint names of a fused stack (transformers fuses them on load)
_PARTS = {
    "gate_up_proj": (("gate_proj", "w1"), ("up_proj", "w3")),
    "up_proj": (("up_proj", "w1"),),
    "down_proj": (("down_proj", "w2"),),
}


def _source(name: str, attr: str, layout, files: dict[str, Path], count: int):
    """(expert e -> its stored rows in the model's layout, where they are read from), or None
    where the checkpoint keeps the tensor in a form not compared row for row."""
    from safetensors import safe_open

    stored_name = _stored_name(name, files)
    if stored_name is not None:
        file = files[stored_name]

        def fused(e: int) -> torch.Tensor:
            with safe_open(file, "pt") as f:
                return f.get_slice(stored_name)[e]

        with safe_open(file, "pt") as f:
            shape = tuple(f.get_slice(stored_name).get_shape())
        return fused, file.name, shape
    if layout.is_transposed or (attr == "gate_up_proj" and not layout.is_concatenated):
        return None
    base = name.replace(".base_layer", "").removeprefix("base_model.model.").rsplit(".", 1)[0]
    for candidate in (base, f"model.{base}"):
        parts = []
        for choices in _PARTS[attr]:
            found = next((c for c in choices if f"{candidate}.0.{c}.weight" in files), None)
            parts.append(found)
        if all(parts):
            break
    else:
        return None

    def per_expert(e: int) -> torch.Tensor:
        rows = []
        for part in parts:
            key = f"{candidate}.{e}.{part}.weight"
            with safe_open(files[key], "pt") as f:
                rows.append(f.get_tensor(key))
        return torch.cat(rows)  # [gate | up] rows, as the fused stack holds them

    first = per_expert(0)
    return per_expert, files[f"{candidate}.0.{parts[0]}.weight"].name, (count, *first.shape)


def verify_tensor(
    block_name: str, attr: str, name: str, weight: torch.Tensor, layout, files, report
) -> None:
    """One stacked expert tensor `weight` [E, a, b] (the model's `name`, `attr` of the experts
    of block `block_name`) against the files, expert by expert, into `report`.

    Raises:
        LoaderFault: One line naming the layer, tensor and expert that differ.
    """
    count = weight.shape[0]
    source = _source(name, attr, layout, files, count)
    if source is None:
        report.unverified.append(name)
        return
    stored, where, shape = source
    if shape != tuple(weight.shape):
        flipped = (weight.shape[0], weight.shape[2], weight.shape[1])
        what = "transposed" if shape == flipped else "of another shape"
        raise LoaderFault(
            f"{block_name}: {attr} was loaded {what}: {tuple(weight.shape)} in the model, "
            f"{shape} in {where}"
        )
    seen: dict[str, int] = {}
    for e in range(count):
        want = stored(e)  # [a, b]: one expert read
        loaded = weight[e].detach().cpu()
        if not torch.equal(loaded, want.to(loaded.dtype)):
            what = _diagnose(loaded, stored, e, count)
            raise LoaderFault(
                f"{block_name}: {attr}, expert {e}: the loaded weights are not the file's "
                f"({what}; {where})"
            )
        digest = _digest(want)
        if digest in seen:
            report.duplicates.append((f"{block_name}.{attr}", seen[digest], e))
        seen.setdefault(digest, e)
        report.experts += 1
    report.checked.append(name)


def verify_experts(
    model: nn.Module, model_dir: Path, report: VerifyReport | None = None
) -> VerifyReport:
    """Compare the model's stacked expert tensors with the files, expert by expert, into
    `report` (a new one by default; tensors quantised as they loaded were checked then, into
    the report `hf.load.load_model` was given).

    Raises:
        LoaderFault: One line naming the layer, tensor and expert that differ.
    """
    files = files_of(Path(model_dir))
    names = {id(p): n for n, p in model.named_parameters()}
    report = VerifyReport() if report is None else report
    for block_name, block in model.named_modules():
        if not holds_experts(block) or (experts := experts_of(block)) is None:
            continue
        layout = layout_of(experts)
        for attr in (layout.up_name, "down_proj"):
            weight = stored_weight(experts, attr)
            if quantized(experts, attr) is not None:  # checked as it loaded (`hf.load`)
                continue
            if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.is_meta:
                continue
            name = names.get(id(weight), f"{block_name}.experts.{attr}")
            verify_tensor(block_name, attr, name, weight, layout, files, report)
    return report
