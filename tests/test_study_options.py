"""`harness tune` options no other test runs: the default Hyperband pruner, a worker's stop after three
failures in a row, `--timeout`, a failed worker under `--workers 2`, the qmc and cmaes samplers, the
`accuracy,latency` objective, and `compile=true`.

Real stores (an Optuna SQLite storage, an MLflow SQLite store) in each test's own folder, the
generated CIFAR-10 of conftest, trials of a few seconds (two tiny stages, a few hundred images).
Every study starts from the same base config, CONFIG: its first trial is that config's own values
(the study's starting point), GOOD below, which learns well in one epoch.
"""

from __future__ import annotations

import gc
import math
import re
import signal
import weakref

import optuna
import pandas as pd
import pytest
from helpers import TINY_SPACE, StudyEnv, tiny_trial
from mlflow import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from harness.interrupts import Stopped, release, stop_cleanly
from harness.studies.options import TuneOptions
from harness.studies.plans import prepare_plan
from harness.studies.worker import Worker

# every test here runs whole studies (20-90 s each on 2 busy cores): out of the fast subset
pytestmark = pytest.mark.slow

# the base config of every study (`--config`): adamw at 0.01 with no schedule learns the generated data in an epoch
CONFIG = """\
optimizer: adamw
lr: 0.01
schedule: none
weight_decay: 0.0
model: {widths: [8, 16], head_width: 16, dropout: 0.0}
"""
# the budget of every trial, as in test_studies.py
FIXED = tiny_trial("deterministic=true", drop=("model.widths",))  # the config's widths
ONE_EPOCH = tiny_trial("deterministic=true", "epochs=1", drop=("model.widths",))
SPACE = TINY_SPACE
GOOD = {"optimizer": "adamw", "lr": 0.01, "model.dropout": 0.0}  # = CONFIG's values: the first trial
DEAD = {**GOOD, "lr": 1.0e-7}  # learns nothing: near chance after an epoch
FAILING = {"optimizer": "sgd", "lr": 1.0e6, "momentum": 0.9, "model.dropout": 0.0}  # a non-finite loss in epoch 1
# two continuous parameters: what CMA-ES and QMC sample jointly (one would be sampled independently)
SPACE_2D = """\
params:
  lr: {type: float, low: 0.005, high: 0.05, log: true}
  label_smoothing: {type: float, low: 0.0, high: 0.2}
"""
BOUNDS_2D = {"lr": (0.005, 0.05), "label_smoothing": (0.0, 0.2)}


@pytest.fixture
def env(tmp_path, cifar10_root, empty_mlflow_db, monkeypatch) -> StudyEnv:
    """One study's stores, space and base config in a folder of its own (a copy of a migrated empty
    MLflow store: no migrations here); trials evaluated inline (no finisher process for trials of a second)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    options = ("--seed", "0", "--evaluate", "inline")
    return StudyEnv(tmp_path, cifar10_root, SPACE, FIXED, empty_mlflow_db, config=CONFIG, options=options)


def harness_lines(err: str) -> list[str]:
    """The CLI's own messages on stderr (Optuna's log lines and workers' tracebacks aside)."""
    return [line for line in err.splitlines() if line.startswith("harness:")]


# ----------------------------------------------------------------------------
# Pruning


def test_the_default_hyperband_pruner_prunes_a_trial_that_learns_nothing(env, capsys):
    """No --pruner: Hyperband (min resource 1 epoch, at most `epochs`, reduction 3).

    With two epochs it has one bracket whose only rung is epoch 1; while fewer than six trials have reached
    the rung, a trial goes past it only with the best accuracy there, ties included. Trial 0 (CONFIG) and
    trial 1 (the same values, deterministic) tie and both go on; trial 2, at lr 1e-7, stays near chance: pruned.
    """
    code, out, err = env.tune_output(capsys, "hb", 1)
    assert code == 0, err
    for params in (GOOD, DEAD):
        env.study("hb").enqueue_trial(params)
    code, out, err = env.tune_output(capsys, "hb", 3)
    assert code == 0, err
    study = env.study("hb")
    assert env.study_run("hb").data.tags["pruner"] == "hyperband"  # what the study ran with, by default
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].params == trials[1].params == GOOD
    assert trials[0].intermediate_values == trials[1].intermediate_values  # the tie that lets trial 1 on
    pruned = trials[2]
    assert pruned.params["lr"] == pytest.approx(1e-7)
    assert list(pruned.intermediate_values) == [1]  # pruned at the rung, epoch 1
    assert pruned.intermediate_values[1] < trials[0].intermediate_values[1]
    run = env.run_of(pruned)
    assert run.data.tags["trial_state"] == "PRUNED" and run.data.tags["stopped_by"] == "TrialPruned"
    assert [m.step for m in env.client().get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert env.study_run("hb").data.metrics["trials_pruned"] == 1


def test_a_trial_is_never_pruned_after_its_last_epoch(env, capsys):
    """One-epoch trials: Hyperband's rung, epoch 1, is their last. The dead trial has spent its whole
    budget by then: it completes with its poor value instead of being hidden as pruned."""
    code, out, err = env.tune_output(capsys, "last", 1, fixed=ONE_EPOCH)
    assert code == 0, err
    for params in (GOOD, DEAD):
        env.study("last").enqueue_trial(params)
    code, out, err = env.tune_output(capsys, "last", 3, fixed=ONE_EPOCH)
    assert code == 0, err
    trials = env.study("last").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[2].value < trials[0].value


# ----------------------------------------------------------------------------
# Failures and limits


def test_three_failures_in_a_row_stop_the_worker_with_the_last_reason_and_the_study_resumes(env, capsys):
    code, out, err = env.tune_output(capsys, "failing", 1)
    assert code == 0, err
    for _ in range(3):
        env.study("failing").enqueue_trial(FAILING)
    code, out, err = env.tune_output(capsys, "failing", 5)
    assert code == 2
    lines = harness_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(
        "harness: error: 3 trials in a row failed, the last with NonFiniteLoss: non-finite training loss"
    ), lines[0]
    assert "run the same command to resume" in lines[0]
    study = env.study("failing")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3  # no fourth started
    assert study.trials[3].user_attrs["fail_reason"] in lines[0]  # the last one's reason
    for t in study.trials[1:]:
        assert env.run_of(t).info.status == "FAILED"
    parent = env.study_run("failing")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_fail"] == 3
    # the same command resumes: the failures don't count towards the target, two more trials run
    code, out, err = env.tune_output(capsys, "failing", 3)
    assert code == 0, err
    states = [t.state for t in env.study("failing").trials]
    assert states[:4] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3
    assert len(states) == 6 and all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states[4:])
    assert env.study_run("failing").info.status == "FINISHED"


def one_trial_worker(env, study: str, wrap) -> Worker:
    """A worker in this process on `study` (made already) for one trial, its plan wrapped by `wrap`."""
    opts = TuneOptions(
        study=study,
        space=str(env.space),
        config=str(env.config),
        trials=1,
        storage=env.storage,
        tracking_uri=env.tracking,
        data_dir=str(env.data),
        overrides=list(FIXED),
        evaluate="inline",
        progress=False,
    )
    plan, _, optuna_study, parent, client = prepare_plan(opts)
    return Worker(opts, wrap(plan), optuna_study, parent, client)


class ConvertsTheStop:
    """A trial's plan whose config step is a library that catches a stop and raises its own error
    (the chaos benchmark's FAIL without a retry, within 0.1 s of a SIGTERM)."""

    def __init__(self, plan):
        self.plan, self.run_kind = plan, plan.run_kind

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def config(self, trial):
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt as e:
            raise RuntimeError("interrupted") from e


def test_a_stop_a_library_turned_into_an_error_still_requeues_its_trial(env, capsys):
    code, out, err = env.tune_output(capsys, "converted", 0)
    assert code == 0, err
    worker = one_trial_worker(env, "converted", ConvertsTheStop)
    restore = stop_cleanly()
    try:
        with pytest.raises(Stopped):
            worker.run()
    finally:
        release()
        restore()
    failed, retry = env.study("converted").trials
    assert failed.state == TrialState.FAIL and "interrupted" in failed.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING  # queued again: the next worker resumes it
    assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(retry) == failed.number


class LosesItsFirstTrial:
    """A plan under which another worker fails the first trial as lost (as its stale-trial check does
    when this worker's heartbeat comes late) while this worker is about to train it."""

    def __init__(self, plan, storage: str):
        self.plan, self.run_kind, self.storage = plan, plan.run_kind, storage

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def config(self, trial):
        cfg = self.plan.config(trial)  # (sampled first: a lost trial takes no more parameters)
        if trial.number == 0:
            other = optuna.load_study(study_name=trial.study.study_name, storage=self.storage)
            other.tell(trial.number, state=TrialState.FAIL)
        return cfg


def test_a_worker_whose_trial_was_taken_for_lost_ends_its_run_and_goes_on(env, capsys):
    code, out, err = env.tune_output(capsys, "lost", 0)
    assert code == 0, err
    worker = one_trial_worker(env, "lost", lambda plan: LosesItsFirstTrial(plan, env.storage))
    worker.run()  # no crash
    assert "trial 0 was failed as lost by another worker" in capsys.readouterr().err
    lost, then = env.study("lost").trials
    assert lost.state == TrialState.FAIL and then.state == TrialState.COMPLETE  # it went on with the next
    experiment = env.client().get_experiment_by_name("lost").experiment_id
    runs = env.client().search_runs([experiment], "tags.trial_number = '0'")
    assert [r.info.status for r in runs] == ["FAILED"]  # (at its first write to the lost trial)


def test_a_study_resumed_with_another_search_space_is_refused_before_any_trial(env, capsys):
    """The same study, its space file edited (same name, other parameters): one line naming the
    study's space and the fix, and no trial; the same space again goes on."""
    code, out, err = env.tune_output(capsys, "spaced", 0)
    assert code == 0, err
    env.space.write_text(SPACE_2D)
    code, out, err = env.tune_output(capsys, "spaced", 2)
    assert code == 2
    lines = harness_lines(err)
    assert len(lines) == 1, err
    assert f"made with search space '{env.space}' which defines other parameters (label_smoothing" in lines[0]
    assert f"run it with --space {env.space}, or use a new --study name" in lines[0]
    assert [t.state for t in env.study("spaced").trials] == [TrialState.WAITING]  # (its first trial, queued)
    env.space.write_text(SPACE)
    code, out, err = env.tune_output(capsys, "spaced", 0)
    assert code == 0, err


def test_timeout_stops_the_worker_starting_trials(env, capsys):
    """--timeout 1 with a target of 50: the trials start within that second (give or take the time
    between the worker's check and Optuna creating the trial), then the worker stops starting them."""
    code, out, err = env.tune_output(capsys, "timed", 50, "--timeout", "1", "--pruner", "none", fixed=ONE_EPOCH)
    assert code == 0, err
    trials = env.study("timed").trials
    assert 1 <= len(trials) < 50, [(t.number, t.state.name) for t in trials]
    started = [(t.datetime_start - trials[0].datetime_start).total_seconds() for t in trials]
    assert max(started) < 1 + 5, started  # none began long after the timeout (5 s: a slow machine's slack)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert env.study_run("timed").info.status == "FINISHED"
    best = env.study("timed").best_trial
    assert f"best trial {best.number}: objective {best.value:.4f}" in out  # it ended as a study does: its summary
    assert "trials.csv" in {
        a.path.split("/")[-1]
        for a in env.client().list_artifacts(env.study("timed").user_attrs["mlflow_parent_run_id"], "summary")
    }


class Cycle:
    """Garbage only a collection frees (it refers to itself)."""

    def __init__(self):
        self.me = self


def test_a_study_run_in_process_leaves_the_heap_collectable(env, capsys):
    """A worker freezes its heap during a study (no collection walks it after each trial); a caller going
    on in the same process (a notebook, this suite) gets it back: garbage made before is still freed.
    Frozen, every store and file a study opened stayed open for good (the suite held 1,158 descriptors)."""
    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage
    assert env.tune("heap", 1, "--pruner", "none", fixed=ONE_EPOCH) == 0
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def test_a_failed_worker_of_two_fails_the_command_with_one_line(env, capfd):
    """Both spawned workers meet three failing trials in a row (six queued, each worker stops at its
    third); each worker says why in one line, and the command exits 2 with one line counting them."""
    code, out, err = env.tune_output(capfd, "two", 1)
    assert code == 0, err
    for _ in range(6):
        env.study("two").enqueue_trial(FAILING)
    code = main(env.tune_args("two", 10, "--workers", "2"))
    out, err = capfd.readouterr()  # the workers' output too: they write to this process's descriptors
    assert code == 2
    lines = harness_lines(err)
    assert lines[-1] == (
        "harness: error: 2 of 2 workers failed: see their output above; run the same command to resume"
    ), err[-3000:]
    assert (
        len(lines) == 3
        and all(  # each worker's own line, no traceback
            re.fullmatch(r"harness: worker \d+: error: 3 trials in a row failed, the last with NonFiniteLoss: .*", line)
            for line in lines[:2]
        )
    ), err[-3000:]
    assert "Traceback" not in err
    study = env.study("two")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 6
    assert env.study_run("two").info.status == "FINISHED"  # not left RUNNING: the next command resumes it


# ----------------------------------------------------------------------------
# Samplers and objectives


@pytest.mark.parametrize("sampler", ["qmc", "cmaes"])
def test_qmc_and_cmaes_samplers_run_a_study_sampling_in_bounds(env, capsys, sampler):
    env.space.write_text(SPACE_2D)
    code, out, err = env.tune_output(capsys, sampler, 3, "--sampler", sampler, "--pruner", "none", fixed=ONE_EPOCH)
    assert code == 0, err
    study = env.study(sampler)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].params == {"lr": 0.01, "label_smoothing": 0.0}  # CONFIG's own values come first
    for t in trials:
        assert set(t.params) == set(BOUNDS_2D)
        for name, (low, high) in BOUNDS_2D.items():
            assert low <= t.params[name] <= high, (t.number, name, t.params[name])
        run = env.run_of(t)
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert float(run.data.params["label_smoothing"]) == pytest.approx(t.params["label_smoothing"])
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # each trial drew its own values
    assert env.study_run(sampler).data.tags["sampler"] == sampler
    # the sampler itself drew trials 1 and 2 (not a fallback to independent random sampling)
    if sampler == "cmaes":
        for t in trials[1:]:
            assert any(k.startswith("cma:") and k.endswith("generation") for k in t.system_attrs), t.system_attrs
    else:
        storage = optuna.storages.RDBStorage(env.storage)
        attrs = storage.get_study_system_attrs(storage.get_study_id_from_name(sampler))
        assert [v for k, v in attrs.items() if k.startswith("qmc:")] == [1]  # Sobol points 0 and 1


def test_accuracy_and_latency_objectives_give_two_values_a_latency_metric_and_a_pareto_front(env, capsys):
    code, out, err = env.tune_output(capsys, "fast-nets", 2, "--objectives", "accuracy,latency", fixed=ONE_EPOCH)
    assert code == 0, err
    study = env.study("fast-nets")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # never pruned with two objectives
    for t in trials:
        assert len(t.values) == 2 and t.intermediate_values == {}
        run = env.run_of(t)
        assert t.values[0] == pytest.approx(run.data.metrics["best_val_accuracy"])
        assert t.values[1] == pytest.approx(run.data.metrics["latency_ms"])  # ms per image on the CPU
        assert 0 < t.values[1] < 1000 and math.isfinite(t.values[1])
    client = env.client()
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).data.tags["objectives"] == "accuracy,latency"
    names = {a.path for a in client.list_artifacts(parent, "summary")}
    assert {"summary/pareto_front.png", "summary/pareto_front.csv"} <= names
    front = pd.read_csv(client.download_artifacts(parent, "summary/pareto_front.csv", str(env.tmp)))
    assert set(front["number"]) == {t.number for t in study.best_trials} and len(front) >= 1
    by_number = front.set_index("number")
    for t in study.best_trials:
        assert by_number.loc[t.number, "val_accuracy"] == pytest.approx(t.values[0])
        assert by_number.loc[t.number, "latency_ms"] == pytest.approx(t.values[1])
    best = max(study.best_trials, key=lambda t: t.values[0])  # printed: the most accurate on the front
    assert f"best trial {best.number}: objective {best.values[0]:.4f}, {best.values[1]:.4f}" in out


@pytest.mark.parametrize("objectives", ["accuracy,params", "accuracy,latency"])
def test_two_objectives_on_the_fast_space_search_its_architecture(env, capsys, objectives):
    """The main job's space (`fast`: the recipe's config, its architecture searched) with two objectives:
    the first trial is the recipe, the second another network, and each trial's second value is its own."""
    tiny = tiny_trial("deterministic=true", "epochs=1", "data.train_subset=100", drop=("model.widths",))
    args = [
        "tune",
        "--study",
        "fast-arch",
        "--space",
        "fast",
        "--profile",
        "quick",
        "--trials",
        "2",
        "--storage",
        env.storage,
        "--tracking-uri",
        env.tracking,
        "--data-dir",
        str(env.data),
        "--sampler",
        "random",
        "--seed",
        "1",
        "--objectives",
        objectives,
        "--quiet",
        "--evaluate",
        "inline",
        *[a for f in tiny for a in ("--set", f)],
    ]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    study = env.study("fast-arch")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    runs = [env.run_of(t) for t in trials]
    widths = [run.data.params["model.widths"] for run in runs]
    assert widths[0] == "[32, 64, 128]"  # the recipe's quick network first
    assert {"model.width_scale.1", "model.convs_per_stage", "model.stem", "lr"} <= set(trials[1].params)
    metric = "num_params" if objectives == "accuracy,params" else "latency_ms"
    for t, run in zip(trials, runs):
        assert t.values[0] == pytest.approx(run.data.metrics["best_val_accuracy"])
        assert t.values[1] == pytest.approx(run.data.metrics[metric])
    if objectives == "accuracy,params":  # another architecture: another size
        assert trials[0].values[1] != trials[1].values[1]


# ----------------------------------------------------------------------------
# --evaluate inline


def test_evaluate_inline_evaluates_each_trial_before_its_run_ends(env, capsys):
    """No finisher process: each trial's run ends with its test metrics, figures and tables."""
    code, out, err = env.tune_output(capsys, "inline", 2, "--pruner", "none", fixed=tiny_trial("eval.figures=true"))
    assert code == 0, err
    from harness.finisher import pending, spool_dir

    for trial in env.study("inline").trials:
        run = env.run_of(trial)
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert "evaluation" not in run.data.tags  # (pending/done: the background finisher's tags)
        eval_files = {a.path for a in env.client().list_artifacts(run.info.run_id, "eval")}
        assert {"eval/confusion.csv", "eval/confusion_normalized.png", "eval/per_class.csv"} <= eval_files
    assert not pending(spool_dir(env.tracking))


# ----------------------------------------------------------------------------
# compile=true


def test_compile_true_trains_and_evaluates_a_tiny_run_on_the_cpu(cifar10_root, tracking_uri, tiny_config):
    """torch.compile on the CPU (inductor, a C++ compiler): one epoch trains through the compiled
    model, and the run is evaluated and logged like any other."""
    import torch

    from harness.experiment import run_experiment

    cfg = tiny_config(cifar10_root, compile=True, data={"train_subset": 200, "val_subset": 100, "test_subset": 100})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        result = run_experiment(cfg, tracking_uri, experiment="compiled", progress=False)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 1  # dynamo did capture the model: it was compiled, not run eagerly
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["compile"] == "True"
    m = run.data.metrics
    assert math.isfinite(m["train_loss"]) and 0.0 <= m["test_accuracy"] <= 1.0
    assert m["best_val_accuracy"] > 0.2  # it learned (chance is 0.1)
    assert result.fit.history[0].epoch == 1 and len(result.fit.history) == 1
