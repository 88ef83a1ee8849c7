"""Resumable training state: written every few epochs, read by the run (or trial) that resumes it.

`fit` keeps what it carries from one epoch to the next in a `TrainingState` (weights, optimizer,
schedule, random generators, best weights, early-stopping count, the epochs' metrics); every
`checkpoint_every` epochs its `capture()` is saved here, so a run killed at epoch 27 of 30 continues
from there, `restore()`d, not from epoch 1. Where the files live and when they go:
docs/stopping-and-outages.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT_DIR_ENV = "HARNESS_CHECKPOINT_DIR"


@dataclass
class TrainingState:
    """What `fit` carries from one epoch to the next, and so what a checkpoint holds: the
    schema of a checkpoint is `capture`'s keys, read back only by `restore`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler, or None
    lookahead: Any  # harness.training.Lookahead, or None
    generator: torch.Generator  # the data order's and the augmentation's random numbers
    device: torch.device
    epoch: int = 0  # the last epoch done
    steps: int = 0  # optimizer steps so far (the lookahead's and the one-cycle's clock)
    since_best: int = 0  # epochs without a new best, for early stopping
    history: list = field(default_factory=list)  # harness.training.EpochMetrics, one per epoch done
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    best_state: dict[str, torch.Tensor] | None = None  # the best weights so far, on the device

    def capture(self) -> dict:
        """The state as a dict of host tensors and plain values: a file that loads anywhere, with
        `torch.load(..., weights_only=True)`."""
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "since_best": self.since_best,
            "model": _cpu(self.model.state_dict()),
            "optimizer": _cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "lookahead": [t.cpu() for t in self.lookahead.slow] if self.lookahead else None,
            "generator": self.generator.get_state().cpu(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "history": [dataclasses.asdict(m) for m in self.history],
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "best_state": _cpu(self.best_state),
        }

    def restore(self, saved: dict, epoch_metrics: Callable[..., Any]) -> None:
        """Continue from `saved` (a `capture()`, from the same config): every object loaded in
        place, `history` rebuilt with `epoch_metrics` (harness.training.EpochMetrics)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.lookahead is not None:
            torch._foreach_copy_(self.lookahead.slow, [t.to(self.device) for t in saved["lookahead"]])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if self.device.type == "cuda" and saved.get("cuda_rng"):
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.epoch, self.steps, self.since_best = saved["epoch"], saved["steps"], saved["since_best"]
        self.history = [epoch_metrics(**m) for m in saved["history"]]
        self.best_epoch, self.best_val_accuracy = saved["best_epoch"], saved["best_val_accuracy"]
        self.best_state = {k: v.to(self.device) for k, v in saved["best_state"].items()}


def _cpu(state):
    """A (nested) state dict's tensors copied to the host: a checkpoint that loads anywhere."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    return state


def checkpoint_dir(uri: str | None) -> Path:
    from harness.tracking import artifact_root, tracking_uri  # here: `fit`, which imports this, knows no MLflow

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
