"""Checkpoints: safetensors for tensors, JSON for everything else, no pickle anywhere.

A checkpoint is a directory `ckpt-<step>` holding
  model.safetensors      the model's state dict
  optimizer.safetensors  the optimizer's per-parameter state, flattened as state.<i>.<key>
  state.json             config, tokenizer, step, RNG states, history, optimizer param groups
  manifest.json          sha256 and size of the files above, written last (`publish`)
It is written under a temporary name in the same directory, flushed, then renamed in one step,
so a crash leaves either the complete checkpoint or none. Loading verifies the manifest; a
truncated or altered checkpoint raises `CheckpointError`, and `latest_checkpoint` falls back to
the newest one that verifies.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    state: dict  # everything else (JSON)
    param_groups: list  # the optimizer's

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def optimizer(self) -> dict:
        """The optimizer state dict, ready for load_state_dict (read from disk now)."""
        return self.optimizer_slices({})

    def optimizer_slices(self, rows: dict[int, slice]) -> dict:
        """The optimizer state dict with only `rows[i]` (the first dimension) of parameter i's
        tensors that have one (an expert shard's Adam moments): each rank reads its own part."""
        tensors = {}
        with safe_open(self.path / "optimizer.safetensors", "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                index = int(name.split(".", 2)[1])
                part = f.get_slice(name)
                keep = rows.get(index)
                sliced = keep is not None and len(part.get_shape()) > 0
                tensors[name] = part[keep] if sliced else f.get_tensor(name)
        return _unflatten_optimizer(tensors, copy.deepcopy(self.param_groups))


def encode_bytes(t: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text for JSON."""
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `ckpt-<step>` atomically into run_dir and keep the `keep` newest.

    Args:
        model_state, optimizer_state: `state_dict()`s (of a model, of its optimizer).
        state: Everything else, JSON-serialisable.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    tmp = run_dir / f".tmp-ckpt-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # 1. the payload
    model_state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(model_state, tmp / "model.safetensors")
    optim_tensors, groups = _flatten_optimizer(optimizer_state)
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups}))
    return publish(tmp, final, keep)


def publish(tmp: Path, final: Path, keep: int = 2) -> Path:
    """Seal the checkpoint written in directory `tmp` and publish it as `final` (a
    `ckpt-<step>` beside it): a manifest of every file in it (sha256 and size), written last
    and flushed with them, then one rename; older checkpoints beyond the `keep` newest and
    leftovers of killed writers are removed."""
    run_dir = final.parent
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        str(p.relative_to(tmp)): {"sha256": _digest(p), "bytes": p.stat().st_size} for p in files
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for path in (*files, tmp / "manifest.json"):
        _fsync(path)
    # one rename publishes it (an older copy of the same step is moved aside first)
    if final.exists():
        stale = run_dir / f".stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(run_dir)
    _prune(run_dir, keep)
    return final


def _prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in run_dir.glob(".tmp-ckpt-*"):  # from a writer that was killed
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool = False) -> None:
    """Create the run directory `out`, refusing what would lose or mix up a run: a path that
    is a file or cannot be created, and a directory holding another run's checkpoints
    without --resume (or --overwrite, which removes them first)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a run directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the run directory ({err})") from err
    found = list_checkpoints(out)
    if found and not resume:
        if not overwrite:
            raise ValueError(
                f"--out {out} holds a run ({found[-1].name}): pass --resume to continue it, "
                "or --overwrite to start over there"
            )
        for path in found:
            shutil.rmtree(path)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoint directories of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify(path: Path, required: tuple[str, ...] = FILES) -> None:
    """Raise CheckpointError unless the `required` files are there and every file matches
    the manifest."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: missing or unreadable manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: the manifest is not a table of files")
    for name in (*required, *(n for n in manifest if n not in required)):
        entry = manifest.get(name)
        file = path / name
        if not isinstance(entry, dict) or not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != entry.get("bytes") or _digest(file) != entry.get("sha256"):
            raise CheckpointError(
                f"checkpoint {path}: {name} does not match its sha256 (truncated or corrupted)"
            )


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    verify(path)
    state = json.loads((path / "state.json").read_text())
    groups = state.pop("param_groups")
    model = load_file(path / "model.safetensors")
    return Checkpoint(path, model, state, groups)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of a run that verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A run directory (its newest valid checkpoint) or one checkpoint directory."""
    path = Path(path)
    if _NAME.match(path.name):
        return load_checkpoint(path)
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"--checkpoint {path}: no valid checkpoint found")
    return found
