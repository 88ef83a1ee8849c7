"""Looking a study up after (or while) it runs: the study, its best trial, that trial's run."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from harness.studies.options import StudyError
from harness.studies.study import existing_storage, storage_for
from harness.tags import MLFLOW_RUN_ID
from harness.tracking import redact
from harness.uncertainty import overlaps


def load(study_name: str, storage: str | None = None) -> optuna.Study:
    url = existing_storage(storage, study_name)
    opened = storage_for(url)
    try:
        return optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened)]
        raise StudyError(
            f"study {study_name!r} not found in {redact(url)}; studies there: "
            f"{', '.join(names) or 'none'} (pass --storage if it lives elsewhere)"
        ) from None


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best trial; for two objectives, the most accurate one on the Pareto front."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        raise StudyError(f"study {study.study_name} has no complete trial yet: run `harness tune` first")
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


def not_told_apart(study: optuna.Study, best: optuna.trial.FrozenTrial) -> list[int]:
    """The complete trials whose 95% validation interval (user attr `val_ci`) overlaps `best`'s: single
    runs that cannot be told apart from it (a screen; `harness confirm` tests it with seeds)."""
    ci = best.user_attrs.get("val_ci")
    if not ci:
        return []
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number != best.number and t.user_attrs.get("val_ci") and overlaps(t.user_attrs["val_ci"], ci)
    ]


def best_run_id(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> str:
    trial = best_trial(load(study_name, storage))
    run_id = trial.user_attrs.get(MLFLOW_RUN_ID)
    if not run_id:
        raise StudyError(f"best trial {trial.number} of study {study_name} has no MLflow run id")
    return run_id
