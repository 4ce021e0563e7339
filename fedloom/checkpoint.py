"""The run's state tree on disk: one file, written atomically.

``save`` writes to a temporary sibling, fsyncs it, renames it over the old
checkpoint and fsyncs the directory, so a kill at any moment leaves either the
previous checkpoint or the new one, whole. ``load`` reads tensors and plain
containers only (``torch.load(weights_only=True)``): a checkpoint can never run
code. Random streams need no saved positions: every stream is keyed by the
seed, the round and the client (``fedloom.core.rng``), so the round counter is
their position.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedloom.tracking.rundir import replace_atomically

CHECKPOINT = "checkpoint.pt"
TEMPORARY = ".checkpoint.pt.*.tmp"  # what a kill mid-write may leave (``replace_atomically``'s name)


def save(path: Path, state: dict[str, Any]) -> None:
    """Write the state tree to ``path`` atomically (the old checkpoint or the new one survives any kill)."""
    replace_atomically(path, lambda tmp: torch.save(state, tmp))
    _fsync_directory(path.parent)


def load(path: Path) -> dict[str, Any]:
    """Read a state tree written by ``save`` (tensors and plain containers only); ValueError naming the file if
    it is not one."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # a file that is not a checkpoint: say which, do not guess
        raise ValueError(f"{path} is not a readable fedloom checkpoint ({type(err).__name__}: {err})") from None


def remove_orphans(run_dir: Path) -> list[Path]:
    """Temporary files a killed writer left behind (never the checkpoint itself)."""
    orphans = sorted(run_dir.glob(TEMPORARY))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
