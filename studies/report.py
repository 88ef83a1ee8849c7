"""A study's summary on its MLflow study run, and the tables `harness best` / `compare` print.

Two levels. `update_study_run` runs after every trial and is cheap: trial counts, the best value,
trial and run, and the champion model in the Model Registry, so the MLflow runs table shows a
live study on one row. `write_summary` runs when a study ends (and on `harness report`): the same,
plus the trials table and Optuna's plots, as PNG and as self-contained interactive HTML.
"""

from __future__ import annotations

import re
import sys
import time
import warnings

import matplotlib
import mlflow
import optuna
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from harness.studies.results import best_trial, not_told_apart
from harness.studies.space import builds_widths
from harness.tags import MLFLOW_EXPERIMENT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_ID, RUN_KIND, TRIAL_NUMBER, TRIAL_STATE
from harness.tracking import MODEL_URI_TAG, RunLogger, error_line

PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "slice": optuna.visualization.matplotlib.plot_slice,
}
HTML_PLOTS = {
    "optimization_history": optuna.visualization.plot_optimization_history,
    "param_importances": optuna.visualization.plot_param_importances,
    "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
    "slice": optuna.visualization.plot_slice,
}
OBJECTIVE_NAMES = {
    "accuracy": ["val_accuracy"],
    "accuracy,params": ["val_accuracy", "num_params"],
    "accuracy,latency": ["val_accuracy", "latency_ms"],
}
CHAMPION = "champion"  # the registry alias of a study's best model
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _figure(axes):
    """Optuna's matplotlib plots return an Axes or an array of them."""
    return axes.figure if hasattr(axes, "figure") else axes.flat[0].figure


def trials_table(study: optuna.Study) -> pd.DataFrame:
    df = study.trials_dataframe(
        attrs=(
            "number",
            "value" if len(study.directions) == 1 else "values",
            "state",
            "duration",
            "params",
            "user_attrs",
        )
    )
    return df.rename(columns=lambda c: c.removeprefix("user_attrs_"))


def model_name(study_name: str) -> str:
    """A study's registered model: the study's name, '/' and ':' (which MLflow refuses) as '-'."""
    return re.sub(r"[/:]", "-", study_name)


def champion_uri(study_name: str) -> str:
    return f"models:/{model_name(study_name)}@{CHAMPION}"


def champion_version(client, study_name: str):
    """The model version the study's `champion` alias points at; None where there is none."""
    try:
        return client.get_model_version_by_alias(model_name(study_name), CHAMPION)
    except MlflowException:
        return None


def update_study_run(
    study: optuna.Study, client, parent_run_id: str, recheck: bool = False, settled: dict | None = None
) -> dict:
    """The study run's live state: trial counts, best value, trial and run, and the champion model.

    Cheap enough for every trial: one read of the trials (and Optuna's best-trial query) and one
    batched MLflow call; the registry is asked only when the best trial changed since the caller
    last looked (`settled`, the caller's own: study run id -> the best trial's run whose champion is
    settled; None: always), or with `recheck` (which also heals a champion two workers moved out of order).
    Metrics are logged at step = trials finished, so the study run charts the study's progress.
    A registry call that fails prints one line and the study goes on (the next update tries again).
    """
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in COUNTED}
    step, now = sum(counts.values()), int(time.time() * 1000)
    metrics = [Metric(f"trials_{k}", v, now, step) for k, v in counts.items()]
    summary: dict = {"trials": counts}
    best = best_trial(study) if counts["complete"] else None
    run_id, tags = None, []
    if best is not None:
        run_id = best.user_attrs.get(MLFLOW_RUN_ID)
        summary.update(best_trial=best.number, best_run_id=run_id, best_value=best.values[0])
        metrics.append(Metric("best_val_accuracy", best.values[0], now, step))
        tags = [RunTag("best_trial", str(best.number)), RunTag("best_run_id", str(run_id))]
    client.log_batch(parent_run_id, metrics=metrics, tags=tags)
    settled = {} if settled is None else settled
    if run_id and (recheck or settled.get(parent_run_id) != run_id):
        try:
            version, done = settle_champion(client, study, best, parent_run_id)
        except MlflowException as e:
            print(
                f"harness: champion model of study {study.study_name} not registered: {error_line(e)}", file=sys.stderr
            )
            return summary  # (asked again after the next trial)
        if done:
            settled[parent_run_id] = run_id
        if version is not None:
            summary["champion"] = f"{champion_uri(study.study_name)} (version {version.version})"
    return summary


def settle_champion(client, study: optuna.Study, best: optuna.trial.FrozenTrial, parent_run_id: str):
    """Point the study's `champion` alias at the best trial's model, registering it as a new version.

    The model is the one the trial's run recorded (tag `model_uri`, `models:/<model_id>`); a trial
    that logs none (eval.log_model=false) leaves the alias where it is. Returns the champion's
    version (None: none yet) and whether this best trial is settled: not while its model may still
    come (a background finisher logs it after the trial), so the next update looks again.
    """
    run_id = best.user_attrs[MLFLOW_RUN_ID]
    current = champion_version(client, study.study_name)
    if study.user_attrs.get("confirmed_champion") or (current is not None and current.run_id == run_id):
        return current, True  # (a confirmed champion is moved by the next confirmation only)
    run = client.get_run(run_id)
    uri = run.data.tags.get(MODEL_URI_TAG)
    if not uri:
        return current, run.data.params.get("eval.log_model") == "False"
    tags = {"study": study.study_name, TRIAL_NUMBER: str(best.number), "val_accuracy": f"{best.values[0]:.6g}"}
    version = register_champion(
        client,
        study.study_name,
        run_id,
        uri,
        tags,
        parent_run_id,
        description=f"trial {best.number} of study {study.study_name}",
    )
    return version, True


def register_champion(client, study_name: str, run_id: str, uri: str, tags: dict, parent_run_id: str, description: str):
    """Register the model `uri` of `run_id` as a new version of the study's model and point the
    `champion` alias at it; the study run names it (tags `champion_model`, `champion_version`)."""
    name = model_name(study_name)
    if champion_version(client, study_name) is None:
        try:
            client.create_registered_model(
                name,
                tags={"study": study_name},
                description=f"Best trials of Optuna study {study_name}; alias {CHAMPION}: the best so far",
            )
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # (or another worker registered it first)
                raise
    mlflow.set_tracking_uri(client.tracking_uri)  # MLflow's SQL registry resolves models:/<id> through it
    version = client.create_model_version(
        name,
        uri,
        run_id=run_id,
        model_id=uri.removeprefix("models:/"),
        await_creation_for=0,
        tags=tags,
        description=description,
    )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    client.log_batch(
        parent_run_id,
        tags=[RunTag("champion_model", champion_uri(study_name)), RunTag("champion_version", str(version.version))],
    )
    return version


def write_summary(study: optuna.Study, client, parent_run_id: str) -> dict:
    """The live state (`update_study_run`), the trials table and Optuna's plots, on the study run."""
    matplotlib.use("Agg")  # Optuna plots through pyplot; never open a window
    summary = update_study_run(study, client, parent_run_id, recheck=True)
    run = RunLogger(client, parent_run_id)
    objectives = study.user_attrs.get("objectives", "accuracy")
    names = OBJECTIVE_NAMES.get(objectives, ["objective"])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    run.log_table(trials_table(study), "summary/trials.csv")
    ranked = compare_table(client, study)
    if not ranked.empty:  # the trials with their intervals, those that cannot be told from the best marked
        run.log_table(ranked, "summary/compare.csv")
        run.log_text(ranked.to_markdown(index=False, floatfmt=".4f") + "\n", "summary/compare.md")
    if len(study.directions) == 1:
        for name, plot in PLOTS.items():
            if len(complete) < (2 if name == "param_importances" else 1):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    run.log_figure(_figure(plot(study)), f"summary/{name}.png")
                except (ValueError, RuntimeError, ZeroDivisionError):
                    pass  # e.g. importances when every trial shares its parameters
    elif complete:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=names)
        run.log_figure(_figure(axes), "summary/pareto_front.png")
        pareto = pd.DataFrame(
            [
                {
                    "number": t.number,
                    **dict(zip(names, t.values)),
                    **t.params,
                    MLFLOW_RUN_ID: t.user_attrs.get(MLFLOW_RUN_ID),
                }
                for t in study.best_trials
            ]
        )
        run.log_table(pareto, "summary/pareto_front.csv")
    log_html_plots(run, study, names, len(complete))
    return summary


def log_html_plots(run: RunLogger, study: optuna.Study, names: list[str], complete: int) -> list[str]:
    """Optuna's interactive plotly plots as `summary/<name>.html`, each self-contained.

    plotly.js is embedded in every file (about 4.8 MB): the MLflow UI previews HTML artifacts in a
    sandboxed iframe, and these machines are often offline, so a CDN script would not load. Two
    objectives: the Pareto front, and the other plots on the first (accuracy).
    """
    multi = len(study.directions) > 1
    on_accuracy = {"target": lambda t: t.values[0]} if multi else {}
    plots = {**HTML_PLOTS, **({"pareto_front": optuna.visualization.plot_pareto_front} if multi else {})}
    logged = []
    for name, plot in plots.items():
        if complete < (2 if name == "param_importances" else 1):
            continue
        kwargs = {"target_names": names} if name == "pareto_front" else {**on_accuracy, "target_name": names[0]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fig = plot(study, **kwargs)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # as for the PNGs
        run.log_text(fig.to_html(include_plotlyjs=True, full_html=True), f"summary/{name}.html")
        logged.append(f"summary/{name}.html")
    return logged


def compare_table(
    client, study: optuna.Study, sort: str = "val_accuracy", columns: list[str] | None = None
) -> pd.DataFrame:
    """One row per trial run from `mlflow.search_runs`, newest metrics, sorted best first."""
    import mlflow

    parent = study.user_attrs.get(MLFLOW_PARENT_RUN_ID)
    exp = client.get_experiment_by_name(study.user_attrs.get(MLFLOW_EXPERIMENT, study.study_name))
    if not parent or exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(client.tracking_uri)
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.{RUN_KIND} = 'trial'"
    )
    if runs.empty or f"tags.{TRIAL_NUMBER}" not in runs:  # (no run a harness worker made)
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "trial": runs[f"tags.{TRIAL_NUMBER}"].astype(int),
            "state": runs[f"tags.{TRIAL_STATE}"],
            # pruned trials never reach best_val_accuracy: show their last validation accuracy
            "val_accuracy": runs["metrics.best_val_accuracy"].fillna(runs["metrics.val_accuracy"])
            if "metrics.best_val_accuracy" in runs
            else runs.get("metrics.val_accuracy"),
            "val_ci_low": runs.get("metrics.best_val_accuracy_ci_low"),
            "val_ci_high": runs.get("metrics.best_val_accuracy_ci_high"),
            "vs_best": "",
            "test_accuracy": runs.get("metrics.test_accuracy"),
            "test_ci_low": runs.get("metrics.test_accuracy_ci_low"),
            "test_ci_high": runs.get("metrics.test_accuracy_ci_high"),
            "epochs": runs.get("metrics.epochs_trained"),
            "params": runs.get("metrics.num_params").astype("Int64") if "metrics.num_params" in runs else None,
            "run_id": runs["run_id"],
        }
    )
    searched = {("model.widths" if builds_widths(n) else n) for t in study.get_trials(deepcopy=False) for n in t.params}
    for key in sorted(searched):
        if f"params.{key}" in runs:
            table[key] = _numeric(runs[f"params.{key}"])
    for col in columns or []:
        found = [prefix + col for prefix in ("metrics.", "params.", "tags.") if prefix + col in runs]
        if not found:
            raise ValueError(f"bad --column {col!r}: no metric, param or tag of that name on the study's trial runs")
        table[col] = runs[found[0]]
    if sort not in table:
        raise ValueError(f"bad --sort {sort!r}: choose one of {', '.join(table.columns)}")
    table["vs_best"] = mark_best(table, study)
    ascending = sort in ("trial", "params", "epochs")
    return table.sort_values(sort, ascending=ascending, na_position="last").reset_index(drop=True)


def mark_best(table: pd.DataFrame, study: optuna.Study) -> list[str]:
    """`best` on the best trial's row, `~best` on the rows of the trials whose 95% validation interval
    overlaps its own (`results.not_told_apart`)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return [""] * len(table)
    best = best_trial(study)
    tied = set(not_told_apart(study, best))
    return [
        "" if state != "COMPLETE" else "best" if n == best.number else "~best" if n in tied else ""
        for n, state in zip(table["trial"], table["state"])
    ]


def _numeric(column: pd.Series) -> pd.Series:
    """MLflow params come back as strings; numbers sort and print better as numbers."""
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column
