"""What `harness tune` is asked for: its options, their choices, and the error a study raises.

Light on purpose: the command line builds its parser from these without importing Optuna.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.errors import HarnessError

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "nsga2")
PRUNERS = ("hyperband", "median", "none")
OBJECTIVES = ("accuracy", "accuracy,params", "accuracy,latency")


class StudyError(HarnessError, RuntimeError):
    """A study that cannot start or go on; the message is one line naming the fix."""


@dataclass
class TuneOptions:
    study: str
    space: str = "cnn"
    trials: int = 20  # the study's target: complete + pruned trials (run again to resume)
    timeout: float | None = None  # seconds for this worker
    storage: str | None = None
    sampler: str = "tpe"
    pruner: str = "hyperband"
    seed: int = 0
    objectives: str = "accuracy"
    profile: str = "auto"  # quick (CPU) | full (GPU) | auto
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    data_dir: str | None = None
    tracking_uri: str | None = None
    workers: int = 1  # worker processes on this machine
    heartbeat: int = 30  # seconds between trial heartbeats; a trial silent for 3x is failed
    evaluate: str = "background"  # a trial's evaluation: by the worker's finisher process, or inline
    progress: bool = True
    device: str | None = None  # this worker's device, over the config's (`--workers` spreads them over GPUs)
    confirms: str | None = None  # set: this is the confirmation study of that tuning study (studies/plans.py)
    confirm_top: int = 0  # the top trials to confirm (0: none after tuning)
    confirm_seeds: int = 3  # new seeds per confirmed trial
    confirm_epochs: int = 0  # epochs of each confirmation run (0: the trial's own budget)


def directions(objectives: str) -> list[str]:
    """The study's directions for `--objectives`: accuracy up, then parameters or latency down."""
    if objectives not in OBJECTIVES:
        raise StudyError(f"bad --objectives {objectives!r}: choose one of {', '.join(OBJECTIVES)}")
    return ["maximize"] + (["minimize"] if "," in objectives else [])
