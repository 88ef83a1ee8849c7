"""What a study's trial trains: a config sampled from the search space (tuning), or a top trial's
config again with a new seed (confirmation). The worker's loop (studies/worker.py) is the same
for both, so a confirmation is resumable, safe under SIGTERM/SIGKILL and spread over workers
exactly as a tuning study is.

A confirmation is an Optuna study of its own, `<study>:confirm`, in the study's storage: one
trial per (configuration, seed), queued by whoever creates it, each carrying the trial it confirms
and its seed. Its runs nest under the tuning study's run (run_kind `confirmation`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import optuna
from optuna.trial import TrialState

from harness import config as C
from harness.reproduction import new_seeds
from harness.studies.options import StudyError, TuneOptions
from harness.studies.report import update_study_run
from harness.studies.space import Space, sample
from harness.tags import CONFIRMS_RUN, CONFIRMS_TRIAL, MLFLOW_EXPERIMENT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_ID, RUN_KIND
from harness.tracking import open_client

CONFIRM_SUFFIX = ":confirm"


class Plan(Protocol):
    run_kind: str

    def has_work(self, trial: optuna.Trial) -> bool: ...
    def config(self, trial: optuna.Trial) -> C.Config: ...
    def tags(self, trial: optuna.Trial) -> dict: ...
    def run_name(self, trial: optuna.Trial) -> str: ...
    def after_trial(self, study: optuna.Study, client, parent_run_id: str) -> None: ...


@dataclass
class SearchPlan:
    """Tuning: each trial's config is `base` with the space's parameters sampled by Optuna."""

    space: Space
    base: C.Config
    study: str
    run_kind: str = "trial"
    settled: dict = field(default_factory=dict)  # the champion this worker settled (update_study_run)

    def has_work(self, trial) -> bool:
        return True

    def config(self, trial) -> C.Config:
        return sample(self.space, trial, self.base)

    def tags(self, trial) -> dict:
        return {"study": self.study, RUN_KIND: self.run_kind}

    def run_name(self, trial) -> str:
        return f"trial-{trial.number}"

    def after_trial(self, study, client, parent_run_id) -> None:
        """The study run's row, live: counts, best trial, champion."""
        update_study_run(study, client, parent_run_id, settled=self.settled)


@dataclass
class ConfirmationPlan:
    """Confirmation: the config of the run a queued trial confirms, with the trial's seed."""

    configs: dict[int, C.Config]  # tuning trial number -> its run's config
    study: str  # the tuning study
    run_kind: str = "confirmation"

    def has_work(self, trial) -> bool:  # (a trial Optuna made fresh once the queue was empty has none)
        return trial.user_attrs.get(CONFIRMS_TRIAL) in self.configs

    def config(self, trial) -> C.Config:
        return C.replace(self.configs[trial.user_attrs[CONFIRMS_TRIAL]], {"seed": trial.user_attrs["seed"]})

    def tags(self, trial) -> dict:
        a = trial.user_attrs
        return {
            "study": self.study,
            RUN_KIND: self.run_kind,
            CONFIRMS_TRIAL: a[CONFIRMS_TRIAL],
            CONFIRMS_RUN: a[CONFIRMS_RUN],
            "seed": a["seed"],
        }

    def run_name(self, trial) -> str:
        return f"confirm-{trial.user_attrs['confirms_trial']}-seed{trial.user_attrs['seed']}"

    def after_trial(self, study, client, parent_run_id) -> None:
        """Nothing: the study run's row is the tuning study's; a confirmation reports at its end."""


def confirmation_name(study: str) -> str:
    return study + CONFIRM_SUFFIX


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The `k` complete trials with the best first objective (validation accuracy), best first."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise StudyError(f"study {study.study_name} has no complete trial to confirm: run `harness tune` first")
    return sorted(done, key=lambda t: (-t.values[0], t.number))[:k]


def prepare_plan(opts: TuneOptions):
    """(plan, base config, study, study run id, MLflow client) for a tuning or a confirmation worker."""
    if opts.confirms:
        return prepare_confirmation(opts)
    from harness.studies.study import prepare

    space, base, study, parent, client = prepare(opts)
    return SearchPlan(space, base, opts.study), base, study, parent, client


def prepare_confirmation(opts: TuneOptions):
    """Create or join `opts.study` (= `<tuning study>:confirm`), queueing its runs when creating it."""
    from harness.checkpoints import load_run_config
    from harness.studies.results import load
    from harness.studies.study import create_or_join, open_storage

    os.environ.pop("MLFLOW_RUN_ID", None)
    tuning = load(opts.confirms, opts.storage)
    parent = tuning.user_attrs.get(MLFLOW_PARENT_RUN_ID)
    if not parent:
        raise StudyError(f"study {opts.confirms} has no MLflow study run: it was not made by `harness tune`")
    top = top_trials(tuning, opts.confirm_top)
    client = open_client(opts.tracking_uri)
    configs = {t.number: _rerun_config(load_run_config(client, _run_id(t)), opts) for t in top}
    study, created = create_or_join(
        opts.study, open_storage(opts), ["maximize"], optuna.samplers.RandomSampler(), optuna.pruners.NopPruner()
    )
    plan = {"trials": [t.number for t in top], "seeds": opts.confirm_seeds, "epochs": opts.confirm_epochs or None}
    if created:
        for key, value in {
            "confirms": opts.confirms,
            RUN_KIND: "confirmation",
            "plan": plan,
            MLFLOW_EXPERIMENT: tuning.user_attrs.get(MLFLOW_EXPERIMENT, opts.confirms),
            MLFLOW_PARENT_RUN_ID: parent,
            "original_values": {str(t.number): t.values[0] for t in top},
        }.items():
            study.set_user_attr(key, value)
        for t in top:
            for seed in new_seeds(configs[t.number].seed, opts.confirm_seeds):
                study.enqueue_trial({}, user_attrs={CONFIRMS_TRIAL: t.number, CONFIRMS_RUN: _run_id(t), "seed": seed})
    elif study.user_attrs.get("plan") != plan:
        stored = study.user_attrs.get("plan") or {}
        was = f"--top {len(stored.get('trials') or [])} --seeds {stored.get('seeds')}"
        was += f" --epochs {stored['epochs']}" if stored.get("epochs") else ""
        raise StudyError(
            f"study {opts.confirms} was confirmed before with trials {stored.get('trials')} x {stored.get('seeds')} "
            f"seeds ({stored.get('epochs') or 'their own'} epochs), not {plan['trials']} x {plan['seeds']} "
            f"({plan['epochs'] or 'their own'} epochs): rerun with {was} to resume it, or delete study "
            f"{opts.study!r} to start over"
        )
    base = next(iter(configs.values()))
    return ConfirmationPlan(configs, opts.confirms), base, study, parent, client


def _run_id(trial: optuna.trial.FrozenTrial) -> str:
    run_id = trial.user_attrs.get(MLFLOW_RUN_ID)
    if not run_id:
        raise StudyError(f"trial {trial.number} has no MLflow run to confirm")
    return run_id


def _rerun_config(cfg: C.Config, opts: TuneOptions) -> C.Config:
    """A top trial's config as logged, on this machine's data and device, with the --set changes."""
    d = C.to_dict(cfg)
    if opts.overrides:
        d = C.merge(d, C.parse_overrides(opts.overrides))
    if opts.confirm_epochs:
        d["epochs"] = opts.confirm_epochs
    if opts.data_dir:
        d["data"]["root"] = opts.data_dir
    if opts.device:
        d["device"] = opts.device
    return C.from_dict(d)
