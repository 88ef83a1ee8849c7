"""`harness confirm`: the top trials retrained with new seeds, on real stores in a temporary folder.

One tuning study is built for the module, its trials fixed so the answer is known:

    trial 0  lr 0.05   (the base config itself: a study's first trial)
    trial 1  lr 0.05   the same configuration again: only seeds can tell them apart, and none does
    trial 2  lr 1e-6   a network that learns nothing: clearly worse

Its confirmation (top 3 x 3 seeds) must call 0 and 1 not distinguishable, 2 worse, and move the
study's champion to trial 0 or 1.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from helpers import StudyEnv, harness_env, tiny_trial, wait_until
from mlflow import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from harness.studies.plans import confirmation_name
from harness.studies.report import champion_version

SPACE = """\
params:
  lr: {type: categorical, choices: [0.05, 1.0e-6]}
"""
FIXED = tiny_trial("eval.log_model=true")


class Env(StudyEnv):
    def confirm_args(self, study: str, top: int, seeds: int) -> list[str]:
        return [
            "confirm",
            "--study",
            study,
            "--top",
            str(top),
            "--seeds",
            str(seeds),
            "--quiet",
            "--data-dir",
            str(self.data),
            "--heartbeat",
            "1",
            *self.stores(),
        ]

    def make_study(self, study: str) -> None:
        assert self.tune(study, 0) == 0  # the study, its run and its first trial (the base config)
        tuning = self.study(study)
        tuning.enqueue_trial({"lr": 0.05})
        tuning.enqueue_trial({"lr": 1e-6})
        assert self.tune(study, 3) == 0

    def confirmation_runs(self, study: str) -> list:
        return self.runs(study, "confirmation")


@pytest.fixture(scope="module")
def env(tmp_path_factory, cifar10_root, empty_mlflow_db):
    options = ("--sampler", "random", "--pruner", "none", "--evaluate", "inline")
    return Env(tmp_path_factory.mktemp("confirm"), cifar10_root, SPACE, FIXED, empty_mlflow_db, options=options)


@pytest.fixture(scope="module")
def confirmed(env):
    env.make_study("known")
    code = main(env.confirm_args("known", 3, 3) + ["--evaluate", "inline"])
    return code


@pytest.mark.slow
def test_confirmation_tells_seeds_from_configurations(env, confirmed, capsys):
    assert confirmed == 0
    tuning = optuna.load_study(study_name="known", storage=env.storage)
    assert [t.params["lr"] for t in tuning.trials] == [0.05, 0.05, 1e-6]
    runs = env.confirmation_runs("known")
    assert len(runs) == 9 and {r.info.status for r in runs} == {"FINISHED"}
    parent = tuning.user_attrs["mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}  # nested in the study's tree
    pairs = {(int(r.data.tags["confirms_trial"]), int(r.data.tags["seed"])) for r in runs}
    assert pairs == {(t, s) for t in (0, 1, 2) for s in (1, 2, 3)}  # new seeds: the trials ran seed 0

    client = MlflowClient(env.tracking)
    table = pd.read_csv(client.download_artifacts(parent, "confirmation/table.csv", str(env.tmp)))
    assert table["trial"].tolist()[:2] in ([0, 1], [1, 0]) and table["trial"].tolist()[2] == 2
    assert table["verdict"].tolist() == ["best", "not distinguishable", "worse"]
    assert table.loc[2, "p_vs_best"] < 0.05 and table.loc[1, "p_vs_best"] >= 0.05
    assert (table["n"] == 3).all() and (table["val_ci_low"] <= table["val_mean"]).all()
    assert table.loc[0, "val_mean"] - table.loc[2, "val_mean"] > 0.3
    md = client.download_artifacts(parent, "confirmation/table.md", str(env.tmp))
    assert "not distinguishable at n=3" in open(md).read()
    artifacts = {f.path for f in client.list_artifacts(parent, "confirmation")}
    assert {"confirmation/means.png", "confirmation/runs.csv"} <= artifacts

    # the champion: a confirmation run of the best mean's configuration, tagged with its mean and n
    version = champion_version(client, "known")
    best_runs = {r.info.run_id for r in runs if int(r.data.tags["confirms_trial"]) == table.loc[0, "trial"]}
    assert version.run_id in best_runs
    assert version.tags["n"] == "3" and float(version.tags["val_accuracy_mean"]) == pytest.approx(
        table.loc[0, "val_mean"], abs=1e-5
    )
    assert tuning.user_attrs["confirmed_champion"]["run_id"] == version.run_id

    # `harness compare`: each trial's interval, the two identical ones marked as not told apart
    assert main(["compare", "--study", "known", *env.stores(), "--csv", str(env.tmp / "compare.csv")]) == 0
    ranked = pd.read_csv(env.tmp / "compare.csv").fillna("").set_index("trial")
    assert sorted(ranked.loc[[0, 1], "vs_best"]) == ["best", "~best"] and ranked.loc[2, "vs_best"] == ""
    assert (ranked["val_ci_low"] <= ranked["val_accuracy"]).all()
    assert (ranked["val_accuracy"] <= ranked["val_ci_high"]).all()

    # the printed output says it plainly; `harness best` names the confirmed result
    capsys.readouterr()
    assert main(["best", "--study", "known", *env.stores()]) == 0
    out = capsys.readouterr().out
    assert f"confirmed best: trial {table.loc[0, 'trial']}" in out and "n=3" in out


@pytest.mark.slow
def test_confirmation_resumes_as_it_was(env, confirmed, capsys):
    """Run again, the confirmation runs nothing more and prints the same table."""
    before = len(env.confirmation_runs("known"))
    client = MlflowClient(env.tracking)
    versions = len(client.search_model_versions("name = 'known'"))
    assert main(env.confirm_args("known", 3, 3)) == 0
    out = capsys.readouterr().out
    assert "not distinguishable at n=3" in out and "champion: models:/known@champion" in out
    assert len(env.confirmation_runs("known")) == before
    assert len(client.search_model_versions("name = 'known'")) == versions  # its champion is not registered again
    # another plan for the same study: refused in one line, before any run
    assert main(env.confirm_args("known", 2, 3)) == 2
    err = capsys.readouterr().err.strip()
    assert "confirmed before" in err and "--top 3 --seeds 3" in err and "\n" not in err
    assert main([*env.confirm_args("known", 3, 3), "--epochs", "2"]) == 2  # another budget: another plan
    err = capsys.readouterr().err.strip()
    assert "(their own epochs), not" in err and "(2 epochs)" in err and "\n" not in err


def test_confirm_needs_two_seeds_and_a_study(env, capsys):
    assert main(env.confirm_args("known", 3, 1)) == 2
    assert "--seeds >= 2" in capsys.readouterr().err
    assert main(env.confirm_args("nope", 3, 3)) == 2  # no such study (or no storage yet): one line
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err


@pytest.mark.slow
def test_a_stopped_confirmation_resumes_to_exactly_k_times_n_runs(env, tmp_path):
    env.make_study("stopped")
    log = tmp_path / "confirm.log"
    again = [*env.confirm_args("stopped", 2, 3), "--epochs", "1"]  # one epoch each: the trials trained two
    args = [sys.executable, "-m", "harness.cli", *again]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=harness_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    storage = env.storage

    def complete() -> int:
        try:
            study = optuna.load_study(study_name=confirmation_name("stopped"), storage=storage)
        except KeyError:
            return 0
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    wait_until(lambda: complete() >= 2, "two finished confirmation runs", [proc], [log])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert complete() < 6
    assert main(again) == 0  # the same command resumes it
    finished = [r for r in env.confirmation_runs("stopped") if r.info.status == "FINISHED"]
    assert {r.data.metrics["epochs_trained"] for r in finished} == {1}
    pairs = sorted((int(r.data.tags["confirms_trial"]), int(r.data.tags["seed"])) for r in finished)
    assert pairs == sorted((t, s) for t in (0, 1) for s in (1, 2, 3))  # exactly K x N, each once
    assert all(r.info.status in ("FINISHED", "KILLED") for r in env.confirmation_runs("stopped"))


@pytest.mark.slow
def test_reproduce_with_seeds_reports_the_distribution(env, confirmed, capsys):
    tuning = optuna.load_study(study_name="known", storage=env.storage)
    run_id = tuning.trials[0].user_attrs["mlflow_run_id"]
    capsys.readouterr()
    assert (
        main(
            [
                "reproduce",
                run_id,
                "--seeds",
                "2",
                "--quiet",
                "--data-dir",
                str(env.data),
                "--tracking-uri",
                env.tracking,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    client = MlflowClient(env.tracking)
    exp = client.get_run(run_id).info.experiment_id
    copies = client.search_runs([exp], f"tags.reproduces = '{run_id}'")
    assert sorted(r.data.tags["seed"] for r in copies) == ["1", "2"] and all(
        r.info.status == "FINISHED" for r in copies
    )
    assert "best_val_accuracy" in out and "predict_low" in out
    assert "95% prediction interval" in out and ("inside" in out or "OUTSIDE" in out)
    assert main(["reproduce", run_id, "--seeds", "1", "--tracking-uri", env.tracking]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
