"""A study's summary on its MLflow study run, and the tables `harness best` / `compare` print."""
from __future__ import annotations

import warnings

import matplotlib
import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.tracking import RunLogger
from studies.driver import best_trial
from studies.space import WIDTH_KEYS

PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "slice": optuna.visualization.matplotlib.plot_slice,
}
OBJECTIVE_NAMES = {"accuracy": ["val_accuracy"], "accuracy,params": ["val_accuracy", "num_params"],
                   "accuracy,latency": ["val_accuracy", "latency_ms"]}


def _figure(axes):
    """Optuna's matplotlib plots return an Axes or an array of them."""
    return axes.figure if hasattr(axes, "figure") else axes.flat[0].figure


def trials_table(study: optuna.Study) -> pd.DataFrame:
    df = study.trials_dataframe(attrs=("number", "value" if len(study.directions) == 1 else "values",
                                       "state", "duration", "params", "user_attrs"))
    return df.rename(columns=lambda c: c.removeprefix("user_attrs_"))


def write_summary(study: optuna.Study, client, parent_run_id: str) -> dict:
    """Optuna's plots, the trials table and the best trial, logged on the study run."""
    matplotlib.use("Agg")  # Optuna plots through pyplot; never open a window
    run = RunLogger(client, parent_run_id)
    objectives = study.user_attrs.get("objectives", "accuracy")
    names = OBJECTIVE_NAMES.get(objectives, ["objective"])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    run.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    run.log_table(trials_table(study), "summary/trials.csv")
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
        pareto = pd.DataFrame([{"number": t.number, **dict(zip(names, t.values)), **t.params,
                                "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in study.best_trials])
        run.log_table(pareto, "summary/pareto_front.csv")
    summary = {"trials": counts}
    if complete:
        best = best_trial(study)
        summary.update(best_trial=best.number, best_run_id=best.user_attrs.get("mlflow_run_id"),
                       best_value=best.values[0])
        run.set_tags({"best_trial": best.number, "best_run_id": summary["best_run_id"]})
        run.log_metrics({"best_val_accuracy": best.values[0]})
    return summary


def compare_table(client, study: optuna.Study, sort: str = "val_accuracy", columns: list[str] | None = None) -> pd.DataFrame:
    """One row per trial run from `mlflow.search_runs`, newest metrics, sorted best first."""
    import mlflow

    parent = study.user_attrs.get("mlflow_parent_run_id")
    exp = client.get_experiment_by_name(study.user_attrs.get("mlflow_experiment", study.study_name))
    if not parent or exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(client.tracking_uri)
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    if runs.empty:
        return runs
    table = pd.DataFrame({
        "trial": runs["tags.trial_number"].astype(int),
        "state": runs["tags.trial_state"],
        # pruned trials never reach best_val_accuracy: show their last validation accuracy
        "val_accuracy": runs["metrics.best_val_accuracy"].fillna(runs["metrics.val_accuracy"])
        if "metrics.best_val_accuracy" in runs else runs.get("metrics.val_accuracy"),
        "test_accuracy": runs.get("metrics.test_accuracy"),
        "epochs": runs.get("metrics.epochs_trained"),
        "params": runs.get("metrics.num_params").astype("Int64") if "metrics.num_params" in runs else None,
        "run_id": runs["run_id"],
    })
    searched = {("model.widths" if n in WIDTH_KEYS else n) for t in study.get_trials(deepcopy=False) for n in t.params}
    for key in sorted(searched):
        if f"params.{key}" in runs:
            table[key] = _numeric(runs[f"params.{key}"])
    for col in columns or []:
        for prefix in ("metrics.", "params.", "tags."):
            if prefix + col in runs:
                table[col] = runs[prefix + col]
    if sort not in table:
        raise ValueError(f"bad --sort {sort!r}: choose one of {', '.join(table.columns)}")
    ascending = sort in ("trial", "params", "epochs")
    return table.sort_values(sort, ascending=ascending, na_position="last").reset_index(drop=True)


def _numeric(column: pd.Series) -> pd.Series:
    """MLflow params come back as strings; numbers sort and print better as numbers."""
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column
