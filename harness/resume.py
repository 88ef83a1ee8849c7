"""Resumable training state: written every few epochs, read by the run (or trial) that resumes it.

Every `checkpoint_every` epochs `fit` hands this module its whole state (weights, optimizer,
schedule, random generators, best weights, early-stopping count, the epochs' metrics), so a run
killed at epoch 27 of 30 continues from there, not from epoch 1. Where the files live and when
they go: docs/stopping-and-outages.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.tracking import artifact_root, tracking_uri

CHECKPOINT_DIR_ENV = "HARNESS_CHECKPOINT_DIR"


def checkpoint_dir(uri: str | None) -> Path:
    if os.environ.get(CHECKPOINT_DIR_ENV):
        return Path(os.environ[CHECKPOINT_DIR_ENV]).expanduser()
    return Path(artifact_root(tracking_uri(uri)) or "mlruns") / "checkpoints"


def path_for(uri: str | None, run_id: str) -> Path:
    return checkpoint_dir(uri) / f"{run_id}.pt"


def save(path: Path, state: dict) -> None:
    """Written beside and renamed into place: a crash mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict | None:
    """The state saved at `path`, on the CPU (None if there is none)."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def adopt(uri: str | None, from_run: str, run_id: str) -> dict | None:
    """The state `from_run` left, now `run_id`'s (a re-queued trial's new run carries it on, and
    a later retry finds it under that run's id); None if it left none."""
    previous, own = path_for(uri, from_run), path_for(uri, run_id)
    state = load(previous)
    if state is not None and previous != own:
        os.replace(previous, own)
    return state


def discard(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            path.unlink(missing_ok=True)
