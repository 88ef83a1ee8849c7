"""`harness confirm`: retrain a study's top configurations with new seeds, and say which is best
with what confidence.

    confirm(TuneOptions(study="cifar10-cnn", confirm_top=3, confirm_seeds=3))

The runs are trials of the confirmation study (studies/plans.py), run by the same workers as
tuning. Once they are done (and evaluated), the study run gets the table (Markdown, CSV), every
run's figures (`confirmation/runs.csv`) and a figure of the means with their intervals, and the
study's `champion` alias moves to the configuration with the best mean validation accuracy.
What the numbers mean: docs/uncertainty.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.finisher import drain
from harness.studies.driver import run_workers
from harness.studies.options import StudyError, TuneOptions
from harness.studies.plans import confirmation_name
from harness.studies.report import champion_uri, champion_version, register_champion
from harness.studies.results import load
from harness.tags import CONFIRMS_TRIAL, MLFLOW_RUN_ID, TRIAL_NUMBER
from harness.tracking import MODEL_URI_TAG, RunLogger
from harness.uncertainty import ALPHA, distinguishable, mean_interval, welch_p


@dataclass
class ConfirmResult:
    table: pd.DataFrame  # one row per configuration, best mean validation accuracy first
    runs: pd.DataFrame  # one row per confirmation run
    verdict: str  # one sentence: which configurations can be told apart
    champion: str | None  # models:/<study>@champion, or None where no run logged its model
    champion_run_id: str | None
    epochs: int | None = None  # each run's epochs, where not its trial's own (`--epochs`)

    def describe(self) -> str:
        budget = f"{self.epochs} epochs each" if self.epochs else "each at its trial's budget"
        return f"{int(self.table['n'].min())} new seeds per configuration, {budget}"

    def markdown(self) -> str:
        return self.table.to_markdown(index=False, floatfmt=".4f") + "\n\n" + self.verdict + "\n"


def confirm(opts: TuneOptions) -> ConfirmResult:
    """Run (or resume) the confirmation of `opts.study`'s top `confirm_top` trials, then report it."""
    if opts.confirm_top < 1 or opts.confirm_seeds < 2:
        raise StudyError(
            f"confirmation needs --top >= 1 and --seeds >= 2 (an interval needs two seeds), "
            f"not --top {opts.confirm_top} --seeds {opts.confirm_seeds}"
        )
    copts = replace(
        opts,
        study=confirmation_name(opts.study),
        confirms=opts.study,
        trials=opts.confirm_top * opts.confirm_seeds,
        sampler="random",
        pruner="none",
        objectives="accuracy",
    )
    study, client, parent = run_workers(copts)
    drain(opts.tracking_uri)  # test accuracies of runs evaluated in the background
    return report_confirmation(study, load(opts.study, opts.storage), client, parent)


def report_confirmation(study: optuna.Study, tuning: optuna.Study, client, parent: str) -> ConfirmResult:
    """The confirmation's table, figure and champion, logged on the tuning study's run."""
    runs = confirmation_runs(study, client)
    if runs.empty:
        raise StudyError(f"study {study.study_name} has no finished confirmation run yet: run the same command")
    table = confirmation_table(runs, study.user_attrs.get("original_values") or {})
    verdict = verdict_line(table)
    logger = RunLogger(client, parent)
    logger.log_table(table, "confirmation/table.csv")
    logger.log_table(runs, "confirmation/runs.csv")
    logger.log_figure(means_figure(table, runs), "confirmation/means.png")
    best = table.iloc[0]
    logger.set_tags({"confirmed_trial": int(best["trial"]), "confirmation": verdict})
    logger.log_metrics(
        {
            "confirmed_val_accuracy_mean": best["val_mean"],
            "confirmed_test_accuracy_mean": best["test_mean"],
            "confirmation_runs": len(runs),
        }
    )
    champion, run_id = settle_confirmed_champion(client, tuning, runs, best, parent)
    epochs = (study.user_attrs.get("plan") or {}).get("epochs")
    result = ConfirmResult(table, runs, verdict, champion, run_id, epochs)
    logger.log_text(result.markdown(), "confirmation/table.md")
    return result


def confirmation_runs(study: optuna.Study, client) -> pd.DataFrame:
    """One row per complete confirmation trial: the trial it confirms, its seed, val and test accuracy."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = t.user_attrs.get(MLFLOW_RUN_ID)
        metrics = client.get_run(run_id).data.metrics if run_id else {}
        rows.append(
            {
                "trial": t.user_attrs[CONFIRMS_TRIAL],
                "seed": t.user_attrs["seed"],
                "val_accuracy": t.value,
                "test_accuracy": metrics.get("test_accuracy", math.nan),
                "run_id": run_id,
            }
        )
    return pd.DataFrame(rows, columns=["trial", "seed", "val_accuracy", "test_accuracy", "run_id"])


def confirmation_table(runs: pd.DataFrame, original: dict | None = None) -> pd.DataFrame:
    """Per configuration: mean and 95% t interval of val and test accuracy, and Welch's test of its
    validation accuracies against the best configuration's (the best mean). Best first."""
    rows = []
    for trial, group in runs.groupby("trial"):
        val, test = mean_interval(group["val_accuracy"]), mean_interval(group["test_accuracy"])
        rows.append(
            {
                "trial": int(trial),
                "n": val.n,
                "val_mean": val.mean,
                "val_ci_low": val.low,
                "val_ci_high": val.high,
                "test_mean": test.mean,
                "test_ci_low": test.low,
                "test_ci_high": test.high,
            }
        )
    table = pd.DataFrame(rows).sort_values(["val_mean", "trial"], ascending=[False, True]).reset_index(drop=True)
    best = runs.loc[runs["trial"] == table.loc[0, "trial"], "val_accuracy"]
    p = [welch_p(runs.loc[runs["trial"] == t, "val_accuracy"], best) for t in table["trial"]]
    table["p_vs_best"] = [math.nan] + p[1:]
    table["verdict"] = ["best"] + ["worse" if distinguishable(q) else "not distinguishable" for q in p[1:]]
    if original:
        table.insert(1, "tuning_val", [original.get(str(t), math.nan) for t in table["trial"]])
    return table


def verdict_line(table: pd.DataFrame) -> str:
    """The sentence a researcher reads first: which configurations cannot be told apart."""
    n = int(table["n"].min())
    tied = [int(t) for t, v in zip(table["trial"], table["verdict"]) if v in ("best", "not distinguishable")]
    best = int(table.loc[0, "trial"])
    if len(table) == 1:
        return f"trial {best}: one configuration confirmed at n={n} (nothing to tell it apart from)"
    if len(tied) == 1:
        return (
            f"trial {best} is best: every other confirmed configuration is worse "
            f"(Welch's t-test, p < {ALPHA:g}, n={n} seeds each)"
        )
    names = ", ".join(str(t) for t in tied[:-1]) + f" and {tied[-1]}"
    return (
        f"trials {names}: not distinguishable at n={n} (Welch's t-test, p >= {ALPHA:g}); "
        f"trial {best} has the best mean validation accuracy"
    )


def means_figure(table: pd.DataFrame, runs: pd.DataFrame):
    """Each configuration's mean with its 95% interval, and its seeds as dots; val and test side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * len(table) + 2), sharey=True)
    labels = [f"trial {t}" for t in table["trial"]]
    for ax, what in zip(axes, ("val", "test")):
        for i, row in table.iterrows():
            colour = (
                "tab:green"
                if row["verdict"] == "best"
                else ("tab:blue" if row["verdict"] == "not distinguishable" else "tab:grey")
            )
            err = [[row[f"{what}_mean"] - row[f"{what}_ci_low"]], [row[f"{what}_ci_high"] - row[f"{what}_mean"]]]
            ax.errorbar(row[f"{what}_mean"], i, xerr=err, fmt="o", color=colour, capsize=4, markersize=7)
            seeds = runs.loc[runs["trial"] == row["trial"], f"{what}_accuracy"]
            ax.scatter(seeds, [i + 0.18] * len(seeds), marker="x", color=colour, s=30, alpha=0.8)
        ax.set_title(f"{what} accuracy: mean, 95% t interval, seeds (x)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(table)), labels)
    axes[0].set_ylim(len(table) - 0.5, -0.5)  # best first, at the top (the axes share y)
    fig.suptitle(
        f"Confirmation: {int(table['n'].min())} seeds per configuration "
        "(green: best mean; blue: not distinguishable from it; grey: worse)"
    )
    fig.tight_layout()
    return fig


def settle_confirmed_champion(client, tuning: optuna.Study, runs: pd.DataFrame, best: pd.Series, parent: str):
    """Register the best configuration's run nearest its mean as the champion; the tuning study's live
    updates leave the alias there from now on (its user attr `confirmed_champion`)."""
    mine = runs[runs["trial"] == best["trial"]].copy()
    mine["distance"] = (mine["val_accuracy"] - best["val_mean"]).abs()
    chosen = mine.sort_values(["distance", "seed"]).iloc[0]
    uri = client.get_run(chosen["run_id"]).data.tags.get(MODEL_URI_TAG)
    summary = {
        "trial": int(best["trial"]),
        "run_id": chosen["run_id"],
        "n": int(best["n"]),
        "val_mean": float(best["val_mean"]),
        "val_ci": [float(best["val_ci_low"]), float(best["val_ci_high"])],
        "test_mean": float(best["test_mean"]),
    }
    tuning.set_user_attr("confirmed_champion", summary)
    if not uri:
        return None, chosen["run_id"]
    current = champion_version(client, tuning.study_name)
    if current is not None and current.run_id == chosen["run_id"]:  # (reported again: already registered)
        return champion_uri(tuning.study_name), chosen["run_id"]
    tags = {
        "study": tuning.study_name,
        TRIAL_NUMBER: str(int(best["trial"])),
        "seed": str(int(chosen["seed"])),
        "confirmed": "true",
        "n": str(int(best["n"])),
        "val_accuracy_mean": f"{best['val_mean']:.6g}",
        "val_accuracy_ci95": f"[{best['val_ci_low']:.6g}, {best['val_ci_high']:.6g}]",
        "test_accuracy_mean": f"{best['test_mean']:.6g}",
    }
    register_champion(
        client,
        tuning.study_name,
        chosen["run_id"],
        uri,
        tags,
        parent,
        description=f"trial {int(best['trial'])} of study {tuning.study_name}, confirmed with "
        f"{int(best['n'])} seeds (seed {int(chosen['seed'])})",
    )
    return champion_uri(tuning.study_name), chosen["run_id"]
