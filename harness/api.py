"""The harness from Python (a notebook, a script): what the commands do, as functions that return
results instead of printing them. `harness/cli.py` is a thin layer over these.

    import harness

    run = harness.train("fast", {"epochs": 2})          # RunResult: run_id, metrics, fit.history, model
    harness.tune("s1", space="fast", trials=8)          # the Optuna study
    harness.trials("s1")                                # its trials (Optuna's view), a DataFrame
    harness.compare("s1")                               # its trial runs (MLflow's view), best first
    harness.reproduce(run.run_id, seeds=3)              # SeedReport: the new runs and the comparison
    harness.confirm("s1", top=3, seeds=3)               # ConfirmResult: the table, verdict and champion

The stores are those of the commands: `tracking_uri` ($MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)
and `storage` ($HARNESS_STORAGE or sqlite:///mlruns/optuna.db). Settings (`overrides`) are `--set` items,
["epochs=2", "data.train_subset=5000"], or a dict, {"epochs": 2, "data.train_subset": 5000}. The modules
are imported when a function runs, so `import harness` loads neither torch, MLflow nor Optuna.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (annotations only)
    import optuna
    import pandas as pd

    from harness.config import Config
    from harness.experiment import RunResult
    from harness.reproduction import SeedReport
    from harness.studies.confirm import ConfirmResult

__all__ = ["train", "tune", "trials", "best", "compare", "reproduce", "confirm"]


def train(
    config: str | Config | None = None,
    overrides: list[str] | dict | None = None,
    *,
    data_dir: str | None = None,
    profile: str = "auto",
    tracking_uri: str | None = None,
    experiment: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Train and track one run, as `harness train`. `config`: a config's name in harness/configs/
    ("fast"), a YAML file, or a Config, taken as it is but for `data_dir` and `overrides` (default:
    harness/configs/default.yaml); `profile`: a file's quick (CPU) or full (GPU) budget, auto by device.
    The run lands in `experiment` (default: <dataset>-train)."""
    from harness import config as C

    if isinstance(config, C.Config):
        cfg = C.replace(config, {"data": {"root": data_dir}}) if data_dir else config
        cfg = C.replace(cfg, C.parse_overrides(_sets(overrides))) if overrides else cfg
    else:
        from harness.recipes import config_path

        cfg = C.load(config_path(config), _sets(overrides), data_dir, profile)
    from harness.experiment import run_experiment  # (torch, MLflow: after a bad setting was told in a second)

    return run_experiment(cfg, tracking_uri, experiment, progress=progress)


def tune(
    study: str,
    space: str = "cnn",
    trials: int = 20,
    *,
    config: str | None = None,
    overrides: list[str] | dict | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    **options,
) -> optuna.Study:
    """Run, resume or extend an Optuna study to `trials` complete and pruned trials, as `harness tune`;
    its trials are MLflow runs nested under its study run. `space`: a name in studies/spaces/ or a YAML
    file. `options`: the rest of harness.studies.options.TuneOptions (sampler="tpe", pruner="hyperband", seed=0,
    objectives="accuracy", profile="auto", workers=1, evaluate="background" or "inline", timeout=None)."""
    from harness.studies.driver import tune as run_study
    from harness.studies.options import TuneOptions

    with _keeping_plots():
        return run_study(
            TuneOptions(
                study=study,
                space=space,
                trials=trials,
                config=config,
                overrides=_sets(overrides),
                data_dir=data_dir,
                storage=storage,
                tracking_uri=tracking_uri,
                progress=progress,
                **options,
            )
        )


def trials(study: str, storage: str | None = None) -> pd.DataFrame:
    """A study's trials as Optuna keeps them, one row each: number, value(s), state, duration,
    params_<name>, and what the workers recorded (mlflow_run_id, val_ci, ...)."""
    from harness.studies.report import trials_table
    from harness.studies.results import load

    return trials_table(load(study, storage))


def best(study: str, storage: str | None = None) -> optuna.trial.FrozenTrial:
    """A study's best complete trial (two objectives: the most accurate on the Pareto front), as
    `harness best`; its run is `.user_attrs["mlflow_run_id"]`."""
    from harness.studies.results import best_trial, load

    return best_trial(load(study, storage))


def compare(
    study: str,
    storage: str | None = None,
    tracking_uri: str | None = None,
    sort: str = "val_accuracy",
    columns: list[str] | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    """A study's trial runs from MLflow, one row each, best first, as `harness compare`: validation
    and test accuracy with their 95% intervals, `vs_best` (best, or ~best where a single run cannot
    tell a trial from it), epochs, parameters, run_id and the searched parameters. `columns`: more
    metrics, params or tags by name; `top`: only the first rows."""
    from harness import config as C
    from harness.studies.report import compare_table
    from harness.studies.results import load
    from harness.tracking import client_for

    found = load(study, storage)  # first: a study that is not there creates no MLflow store
    try:
        table = compare_table(client_for(tracking_uri), found, sort=sort, columns=columns)
    except ValueError as e:  # a bad sort key
        raise C.ConfigError(str(e)) from None
    return table.head(top) if top else table


def reproduce(
    run_id: str,
    seeds: int | None = None,
    *,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> SeedReport:
    """Retrain a run from its logged config, as `harness reproduce`: with its own seed (`seeds` None;
    the table: each metric's original, reproduced value and difference), or with `seeds` new seeds
    (the table: their mean, intervals, and whether the original lies in their 95% prediction interval).
    `data_dir`: where the data is now, if not where the run found it."""
    from harness.reproduction import reproduce_once, reproduce_seeds

    if seeds is None:
        return reproduce_once(run_id, tracking_uri, data_dir, progress=progress)
    return reproduce_seeds(run_id, seeds, tracking_uri, data_dir, progress=progress)


def confirm(
    study: str,
    top: int = 3,
    seeds: int = 3,
    *,
    epochs: int = 0,
    overrides: list[str] | dict | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    **options,
) -> ConfirmResult:
    """Retrain a study's `top` trials with `seeds` new seeds each, as `harness confirm` (run again to
    resume): which configuration is best, with what confidence; the study's champion moves to it.
    `epochs`: each run's budget (0: its trial's). `options`: workers, heartbeat, evaluate, timeout, as for `tune`."""
    from harness.studies.confirm import confirm as run_confirmation
    from harness.studies.options import TuneOptions

    with _keeping_plots():
        return run_confirmation(
            TuneOptions(
                study=study,
                storage=storage,
                tracking_uri=tracking_uri,
                data_dir=data_dir,
                overrides=_sets(overrides),
                progress=progress,
                confirm_top=top,
                confirm_seeds=seeds,
                confirm_epochs=epochs,
                **options,
            )
        )


def _sets(overrides: list[str] | dict | None) -> list[str]:
    """`--set` items from a list of them or a dict of settings, nested or dotted (JSON is YAML)."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        import json

        from harness import config as C

        return [f"{k}={json.dumps(v)}" for k, v in C.flatten(overrides).items()]
    return list(overrides)


@contextmanager
def _keeping_plots():
    """A study's summary and confirmation figures switch matplotlib to Agg (studies/report.py and
    confirm.py: no window may open); the caller's backend comes back after, so a notebook's plots show.
    It is loaded first, as the caller's: a notebook's inline backend hooks its display in as it loads."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend(before)
    try:
        yield
    finally:
        if matplotlib.get_backend() != before:
            plt.switch_backend(before)
