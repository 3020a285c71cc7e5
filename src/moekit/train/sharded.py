"""Sharded checkpoints: torch.distributed.checkpoint (DCP) under the run's `ckpt-<step>` names.

A checkpoint is a directory `ckpt-<step>` holding
  dcp/             DCP's files: each rank writes its pieces of the tensors (`__<rank>_0.distcp`),
                   `.metadata` maps every tensor's global shape to the pieces
  state.json       everything else (config, step, RNG states, history), written by rank 0
  manifest.json    sha256 and size of every file, written last (`train.files.publish`)
Every rank writes into `.tmp-ckpt-<step>-dcp`; after all have, rank 0 seals and renames it, so
a job killed at any point leaves the previous checkpoints and no half-written `ckpt-` directory.
The tensors are DTensors of their global shape (or plain tensors in one process), so a
checkpoint written by N ranks at expert-parallel size R loads at any other N and R.

    save_sharded(run_dir, step, tensors, state, topo, keep)  -> the checkpoint's path
    latest_sharded(run_dir) -> (path, state) | None          the newest that verifies
    load_sharded(path, tensors, topo)                        DCP fills `tensors` in place
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp

from ..parallel.training import Topology
from .files import CheckpointError, list_checkpoints, publish, verify

log = logging.getLogger(__name__)

REQUIRED = ("state.json", "dcp/.metadata")


def save_sharded(
    run_dir: Path, step: int, tensors: dict, state: dict, topo: Topology, keep: int = 2
) -> Path:
    """Write checkpoint `ckpt-<step>` (a collective under torchrun: every rank calls it).

    Args:
        tensors: A (nested) dict of tensors and DTensors (`hf.distributed.training_state`).
        state: JSON-serialisable; rank 0's is written.
    """
    final = run_dir / f"ckpt-{step:08d}"
    tmp = run_dir / f".tmp-ckpt-{step:08d}-dcp"
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    topo.wait()
    with _quiet():
        dcp.save(
            tensors,
            checkpoint_id=str(tmp / "dcp"),
            process_group=topo.control_group,
            no_dist=not topo.distributed,
        )
    topo.wait()  # every rank's pieces are on disk
    if topo.is_main:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        publish(tmp, final, keep)
    topo.wait()
    return final


def latest_sharded(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest sharded checkpoint of a run that verifies, with its state; corrupt or
    incomplete ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path, (*REQUIRED, *_pieces(path)))
            return path, json.loads((path / "state.json").read_text())
        except (CheckpointError, ValueError) as err:
            log.warning("skipping %s", err)
    return None


def _pieces(path: Path) -> list[str]:
    """The files DCP's `.metadata` says hold the tensors (each must be in the manifest: on a
    filesystem that rank 0 saw only in part, a checkpoint must not verify)."""
    try:
        metadata = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
    except Exception as err:  # noqa: BLE001 - a missing or unreadable .metadata, as verify says
        raise CheckpointError(f"checkpoint {path}: unreadable DCP metadata ({err})") from err
    return sorted({f"dcp/{item.relative_path}" for item in metadata.storage_data.values()})


def load_sharded(path: Path, tensors: dict, topo: Topology) -> None:
    """Fill `tensors` (the same structure `save_sharded` wrote, at this run's sharding) from
    checkpoint `path`, in place.

    Raises:
        CheckpointError: the checkpoint holds other tensors, or of other shapes.
    """
    try:
        with _quiet():
            dcp.load(
                tensors,
                checkpoint_id=str(path / "dcp"),
                process_group=topo.control_group,
                no_dist=not topo.distributed,
            )
    except (RuntimeError, ValueError, KeyError) as err:  # DCP's CheckpointException: RuntimeError
        raise CheckpointError(
            f"checkpoint {path}: does not fit this run's tensors ({str(err).splitlines()[0]})"
        ) from err


@contextlib.contextmanager
def _quiet():
    """DCP in one process warns that it assumes one process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield
