"""The study run as a live row, the champion model in the Model Registry, and the HTML summary.

Real MLflow SQLite stores, real Optuna SQLite storages, real logged models. Two kinds of test:

- `update_study_run` called after each trial of a study whose trials are made by hand (runs with
  small logged torch models, values chosen), so every case is exact and quick: a better trial, a
  worse one, a pruned and a failed one, a best trial whose model comes later (a background
  finisher logs it after the trial), and one that logs no model at all.
- one real study through `harness tune` on generated CIFAR-10 (trials log their model):

      `driver.prepare`             the study and its study run, no trial yet
      enqueued                     lr 1e-6 (learns next to nothing), lr 0.01 (learns)
      `harness tune`               every queued trial; the champion is then loaded, printed,
                                   transferred and plotted
"""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import optuna
import pytest
import torch
from helpers import StudyEnv, new_tracking_uri, tiny_trial, write_cifar100
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from harness.checkpoints import load_run_model
from harness.studies.options import TuneOptions
from harness.studies.report import champion_version, model_name, update_study_run, write_summary
from harness.studies.results import best_trial
from harness.studies.study import prepare
from harness.tracking import MODEL_URI_TAG, RunLogger, client_for

STUDY = "live"
FIXED = tiny_trial("eval.log_model=true", "deterministic=true", "optimizer=adamw")
SPACE = """\
params:
  lr: {type: float, low: 1.0e-6, high: 0.05, log: true}
  model.dropout: {type: float, low: 0.0, high: 0.2}
"""
BAD = {"lr": 1.0e-6, "model.dropout": 0.0}
GOOD = {"lr": 0.01, "model.dropout": 0.0}
HTML = ("optimization_history", "param_importances", "parallel_coordinate", "slice")


# ----------------------------------------------------------------------------
# Studies made by hand


class HandStudy:
    """An Optuna study with its MLflow study run; `add` makes a trial run and its trial."""

    def __init__(self, tmp, template, name: str, objectives: str = "accuracy"):
        self.client = client_for(new_tracking_uri(tmp, template))
        self.study = optuna.create_study(
            study_name=name,
            storage=f"sqlite:///{tmp / 'optuna.db'}",
            directions=["maximize"] + (["minimize"] if "," in objectives else []),
        )
        self.parent = RunLogger.start(self.client, name, f"study-{name}", tags={"run_kind": "study"}).run_id
        self.study.set_user_attr("mlflow_parent_run_id", self.parent)
        self.study.set_user_attr("objectives", objectives)
        self.name = name
        self.settled: dict = {}  # as a worker keeps it

    def add(self, state=TrialState.COMPLETE, values=None, model: str = "yes", lr: float = 0.01) -> RunLogger:
        """model: yes (logged now), later (to come: `log_model(run)`), no (eval.log_model=false)."""
        run = RunLogger.start(self.client, self.name, "trial", tags={"run_kind": "trial"}, parent_run_id=self.parent)
        run.log_params({"eval.log_model": model != "no"})
        if model == "yes":
            log_model(run)
        self.study.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=values,
                params={"lr": lr},
                distributions={"lr": FloatDistribution(1e-4, 1.0, log=True)},
                user_attrs={"mlflow_run_id": run.run_id},
            )
        )
        return run

    def update(self) -> tuple[dict, object]:
        update_study_run(self.study, self.client, self.parent, settled=self.settled)
        return self.client.get_run(self.parent).data, champion_version(self.client, self.name)


def log_model(run: RunLogger) -> None:
    run.log_torch_model(torch.nn.Linear(4, 2), np.zeros((1, 4), dtype=np.float32))


def test_the_study_run_and_the_champion_follow_every_trial(tmp_path, empty_mlflow_db):
    s = HandStudy(tmp_path, empty_mlflow_db, "by-hand")
    first = s.add(values=[0.5])
    data, champion = s.update()
    assert data.tags["best_trial"] == "0" and data.tags["best_run_id"] == first.run_id
    assert data.metrics["best_val_accuracy"] == 0.5
    assert (data.metrics["trials_complete"], data.metrics["trials_pruned"], data.metrics["trials_fail"]) == (1, 0, 0)
    assert champion.run_id == first.run_id and champion.version == 1
    assert champion.source == s.client.get_run(first.run_id).data.tags[MODEL_URI_TAG]  # its LoggedModel
    assert data.tags["champion_model"] == "models:/by-hand@champion" and data.tags["champion_version"] == "1"

    s.add(state=TrialState.PRUNED, model="no")
    s.add(values=[0.4])  # worse: the champion stays, no new version
    data, champion = s.update()
    assert (data.metrics["trials_complete"], data.metrics["trials_pruned"]) == (2, 1)
    assert data.tags["best_trial"] == "0" and champion.version == 1

    later = s.add(values=[0.7], model="later")  # best, its model not logged yet
    data, champion = s.update()
    assert data.tags["best_trial"] == "3" and data.metrics["best_val_accuracy"] == 0.7
    assert champion.version == 1  # nothing to register yet ...
    log_model(later)
    s.add(state=TrialState.FAIL, model="no")
    data, champion = s.update()  # ... and after the next trial, there is
    assert data.metrics["trials_fail"] == 1
    assert champion.run_id == later.run_id and champion.version == 2 and data.tags["champion_version"] == "2"

    s.add(values=[0.9], model="no")  # best without a model (eval.log_model=false): the alias stays
    data, champion = s.update()
    assert data.tags["best_trial"] == "5" and champion.version == 2
    assert sorted(int(v.version) for v in s.client.search_model_versions("name = 'by-hand'")) == [1, 2]
    # step = trials finished: the study run charts the study's progress
    history = s.client.get_metric_history(s.parent, "best_val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (3, 0.5), (4, 0.7), (5, 0.7), (6, 0.9)]


def test_two_objectives_plot_the_pareto_front_as_html_and_pick_the_most_accurate(tmp_path, empty_mlflow_db):
    s = HandStudy(tmp_path, empty_mlflow_db, "front", objectives="accuracy,params")
    for i, values in enumerate(([0.6, 1000.0], [0.8, 5000.0], [0.5, 2000.0])):
        s.add(values=values, model="no", lr=0.01 * (i + 1))
    summary = write_summary(s.study, s.client, s.parent)
    assert summary["best_trial"] == 1 and "champion" not in summary  # no trial logged a model
    assert champion_version(s.client, "front") is None
    sizes = {a.path: a.file_size for a in s.client.list_artifacts(s.parent, "summary")}
    for name in ("pareto_front", *HTML):
        assert sizes.get(f"summary/{name}.html", 0) > 1_000_000, sizes  # plotly.js inside
    html = open(s.client.download_artifacts(s.parent, "summary/pareto_front.html", str(tmp_path))).read()
    assert '"x":[0.6,0.8]' in html and '"y":[1000.0,5000.0]' in html  # the front, as the plot's data


def test_registered_model_names_keep_the_study_name_where_mlflow_accepts_it():
    assert model_name("cifar10-cnn") == "cifar10-cnn" and model_name("a b@c") == "a b@c"
    assert model_name("team/cifar:v2") == "team-cifar-v2"  # MLflow refuses '/' and ':' in a name


# ----------------------------------------------------------------------------
# A real study


@pytest.fixture(scope="module")
def env(tmp_path_factory, cifar10_root, empty_mlflow_db):
    options = ("--sampler", "random", "--pruner", "none")
    env = StudyEnv(
        tmp_path_factory.mktemp("study_run"), cifar10_root, SPACE, FIXED, empty_mlflow_db, options=options, name=STUDY
    )
    # the study and its study run, no trial yet (as `harness tune` makes them)
    prepare(
        TuneOptions(
            study=STUDY,
            space=str(env.space),
            trials=0,
            storage=env.storage,
            sampler="random",
            pruner="none",
            overrides=list(FIXED),
            data_dir=str(env.data),
            tracking_uri=env.tracking,
        )
    )
    for params in (BAD, GOOD):
        env.study().enqueue_trial(params)
    # every queued trial (a new study may queue its base config first)
    assert env.tune(STUDY, len(env.study().trials)) == 0
    return env


def best_run(env) -> str:
    return best_trial(env.study()).user_attrs["mlflow_run_id"]


@pytest.mark.slow
def test_a_real_study_keeps_its_row_live_and_registers_its_best_model(env):
    trials = env.study().trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    by_params = {t.params["lr"]: t for t in trials}
    assert by_params[GOOD["lr"]].value > by_params[BAD["lr"]].value
    best = best_trial(env.study())
    parent = env.study().user_attrs["mlflow_parent_run_id"]
    client = env.client()
    run = client.get_run(parent)
    assert run.data.tags["best_trial"] == str(best.number) and run.data.metrics["trials_complete"] == len(trials)
    history = client.get_metric_history(parent, "best_val_accuracy")
    steps = list(range(1, len(trials) + 1))
    assert [m.step for m in history][: len(trials)] == steps  # after each trial (the summary adds one at the end)
    assert [m.value for m in history][: len(trials)] == pytest.approx([max(t.value for t in trials[:n]) for n in steps])
    champion = champion_version(client, STUDY)
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    assert champion.source == client.get_run(champion.run_id).data.tags[MODEL_URI_TAG]
    assert champion.tags["trial_number"] == str(best.number)
    assert run.data.tags["champion_model"] == f"models:/{STUDY}@champion"


@pytest.mark.slow
def test_the_champion_loads_with_mlflow_and_is_the_trials_network(env):
    mlflow.set_tracking_uri(env.tracking)
    model = mlflow.pytorch.load_model(f"models:/{STUDY}@champion")
    _, trained = load_run_model(env.client(), best_run(env))  # the trial's weights-only checkpoint
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained.eval()(x))


@pytest.mark.slow
def test_best_prints_the_champion_uri(env, capsys):
    champion = champion_version(env.client(), STUDY)
    code, out, err = env.cli(capsys, "best", "--study", STUDY, "--storage", env.storage, "--tracking-uri", env.tracking)
    assert code == 0, err
    assert f"champion model: models:/{STUDY}@champion (version {champion.version}, run {champion.run_id})" in out


@pytest.mark.slow
def test_transfer_from_the_champion_uri(env, capsys):
    c100 = write_cifar100(env.tmp / "data", n_train=300, n_test=100, seed=3, num_fine=15, num_coarse=5).root
    base = [
        "--target",
        "cifar100",
        "--modes",
        "probe",
        "--data-dir",
        str(c100),
        "--tracking-uri",
        env.tracking,
        "--set",
        "epochs=1",
        "--set",
        "eval.log_model=false",
        "--quiet",
    ]
    code, out, err = env.cli(capsys, "transfer", "--from", f"models:/{STUDY}@champion", *base)
    assert code == 0, err
    parent = out.strip().splitlines()[-1].split()[-1]
    tags = env.client().get_run(parent).data.tags
    assert tags["source_run_id"] == best_run(env)
    assert tags["source_study"] == STUDY
    for source, expected in (
        (f"models:/{STUDY}@nope", f"registered model '{STUDY}' has no alias 'nope'"),
        ("models:/nope@champion", "no registered model 'nope'"),
    ):
        code, out, err = env.cli(capsys, "transfer", "--from", source, *base)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], err


@pytest.mark.slow
def test_the_summary_has_self_contained_html_plots_holding_the_trials(env, capsys):
    code, out, err = env.cli(
        capsys, "report", "--study", STUDY, "--storage", env.storage, "--tracking-uri", env.tracking
    )
    assert code == 0, err
    champion = champion_version(env.client(), STUDY)
    assert f"'champion': 'models:/{STUDY}@champion (version {champion.version})'" in out
    parent = env.study().user_attrs["mlflow_parent_run_id"]
    client = env.client()
    sizes = {a.path: a.file_size for a in client.list_artifacts(parent, "summary")}
    for name in HTML:
        assert sizes.get(f"summary/{name}.html", 0) > 1_000_000, sizes  # plotly.js inside
        assert f"summary/{name}.png" in sizes
    html = open(client.download_artifacts(parent, "summary/optimization_history.html", str(env.tmp))).read()
    assert re.search(r"<script[^>]*\bsrc=", html) is None and "Plotly.newPlot" in html  # nothing to fetch
    values = [t.value for t in env.study().trials]
    assert '"y":' + json.dumps(values, separators=(",", ":")) in html  # the trials' values, as the plot's data
    # the report's recheck finds the champion in place: no new version
    assert len(client.search_model_versions(f"name = '{STUDY}'")) == int(champion.version)
