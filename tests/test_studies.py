"""Studies end to end, in this process, on a real MLflow SQLite store and a real Optuna storage.

One study is built once for the module (it costs about half a minute) and read by the tests:

    run 1  `harness tune --trials 1`            trial 0: sampled
           then five trials are enqueued         trials 1, 2: good, fixed; 3: lr 1e6 (fails);
                                                 4: lr 1e-7 (learns nothing: pruned at epoch 1)
    run 2  the same command with `--trials 4`   trials 1-4 (the failure does not count)
    run 3  the same command with `--trials 5`   trial 5: sampled

The median pruner prunes trial 4 deterministically: three complete trials exist, two of them
identical good ones, so the median accuracy after epoch 1 is theirs (well above chance on the
generated data) while a network trained at lr 1e-7 stays near chance.
"""

from __future__ import annotations

import sqlite3

import optuna
import pandas as pd
import pytest
from helpers import TINY_SPACE, StudyEnv, tiny_trial
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from harness.cli import main
from harness.studies.optuna_access import study_id

STUDY = "tiny"
# the budget of every trial: a few hundred generated images, two small stages, two epochs
FIXED = tiny_trial("deterministic=true")
SPACE = TINY_SPACE + "  epochs: {type: int, low: 3, high: 6}      # fixed by --set epochs=2: out of the search\n"
GOOD = {"optimizer": "adamw", "lr": 0.01, "model.dropout": 0.0}


@pytest.fixture(scope="module")
def env(tmp_path_factory, cifar10_root, empty_mlflow_db):
    """The study's folder; the data: the generated CIFAR-10, classes a tiny CNN learns in an epoch."""
    options = ("--sampler", "random", "--pruner", "median", "--seed", "0")
    return StudyEnv(
        tmp_path_factory.mktemp("studies"), cifar10_root, SPACE, FIXED, empty_mlflow_db, options=options, name=STUDY
    )


@pytest.fixture(scope="module")
def built(env):
    """The study of the module docstring, with what each step saw."""
    steps = {}
    assert env.tune(STUDY, 1) == 0
    study = env.study()
    steps["after_1"] = _snapshot(env)
    for params in (GOOD, GOOD, {**GOOD, "optimizer": "sgd", "lr": 1.0e6, "momentum": 0.9}, {**GOOD, "lr": 1.0e-7}):
        study.enqueue_trial(params)
    assert env.tune(STUDY, 4) == 0
    steps["after_2"] = _snapshot(env)
    assert env.tune(STUDY, 5) == 0
    steps["after_3"] = _snapshot(env)
    return steps


def _snapshot(env: StudyEnv) -> dict:
    study = env.study()
    client = env.client()
    exp = client.get_experiment_by_name(STUDY)
    return {
        "study_id": study_id(study),
        "experiment_id": exp.experiment_id,
        "parent": study.user_attrs["mlflow_parent_run_id"],
        "trials": {t.number: t.state for t in study.trials},
        "study_runs": [r.info.run_id for r in env.runs(kind="study")],
    }


@pytest.mark.slow
def test_trials_are_nested_runs_with_their_state(env, built):
    study = env.study()
    parent = study.user_attrs["mlflow_parent_run_id"]
    study_runs = env.runs(kind="study")
    assert [r.info.run_id for r in study_runs] == [parent]
    assert study_runs[0].info.status == "FINISHED"
    assert study_runs[0].data.tags["study"] == STUDY
    runs = {r.info.run_id: r for r in env.runs(kind="trial")}
    assert len(env.runs()) == len(runs) + 1  # nothing else in the study's experiment
    trials = study.trials
    assert [t.number for t in trials] == list(range(6))
    assert len(runs) == len(trials)  # every trial reached training, so every one has its run
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]  # the trial leads to its run ...
        assert run.data.tags["trial_number"] == str(t.number)  # ... and the run to its trial
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
        assert run.data.tags["trial_state"] == t.state.name
        assert run.info.run_name == f"trial-{t.number}"
        assert run.data.params["optimizer"] == t.params["optimizer"]
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert ("momentum" in t.params) == (t.params["optimizer"] == "sgd")
    states = [t.state for t in trials]
    assert states[1:5] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert states[0] == TrialState.COMPLETE  # the median pruner waits for three complete trials
    assert states[5] in (TrialState.COMPLETE, TrialState.PRUNED)
    for t in trials:
        status = runs[t.user_attrs["mlflow_run_id"]].info.status
        assert (
            status
            == {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}[t.state]
        )


@pytest.mark.slow
def test_pruned_trial_keeps_its_metrics_up_to_the_pruning_point(env, built):
    trial = env.study().trials[4]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]  # reported epoch 1, pruned there
    client = env.client()
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]
    assert history[0].value == pytest.approx(trial.intermediate_values[1])
    assert "train_loss" in run.data.metrics and "num_params" in run.data.metrics
    assert "test_accuracy" not in run.data.metrics  # it never got that far
    assert run.data.tags["stopped_by"] == "TrialPruned"
    # the good trials it was compared with learned; it did not
    good = env.study().trials[1]
    assert trial.intermediate_values[1] < good.intermediate_values[1]


@pytest.mark.slow
def test_failing_trial_records_its_reason_on_both_sides_and_the_study_goes_on(env, built):
    trials = env.study().trials
    failed = trials[3]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("NonFiniteLoss: non-finite training loss")
    run = env.client().get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLoss: non-finite training loss")
    assert "\n" not in run.data.tags["error"]
    assert run.data.tags["trial_state"] == "FAIL"
    # the same worker went on with trial 4 and the target counted complete + pruned trials only
    assert built["after_2"]["trials"][4] == TrialState.PRUNED
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in built["after_2"]["trials"].values()) == 4


@pytest.mark.slow
def test_resuming_adds_trials_to_the_same_study_experiment_and_run(env, built):
    first, second, third = built["after_1"], built["after_2"], built["after_3"]
    assert len(first["trials"]) == 1 and len(second["trials"]) == 5 and len(third["trials"]) == 6
    for key in ("study_id", "experiment_id", "parent"):
        assert first[key] == second[key] == third[key]
    assert first["study_runs"] == second["study_runs"] == third["study_runs"] == [first["parent"]]
    # earlier trials are untouched by a resume
    assert all(third["trials"][n] == s for n, s in second["trials"].items())
    with sqlite3.connect(env.tmp / "optuna.db") as db:
        assert db.execute("select count(*) from studies").fetchone()[0] == 1
    assert [e.name for e in env.client().search_experiments()].count(STUDY) == 1


@pytest.mark.slow
def test_set_takes_a_parameter_out_of_the_search(env, built):
    for t in env.study().trials:
        assert "epochs" not in t.params and "epochs" not in t.distributions
    for run in env.runs(kind="trial"):
        assert run.data.params["epochs"] == "2"
        assert run.data.params["model.widths"] == "[8, 16]"


@pytest.mark.slow
def test_resuming_with_other_fixed_settings_is_refused(env, built, capsys):
    before = len(env.study().trials)
    code, out, err = env.tune_output(capsys, STUDY, 7, fixed=tiny_trial("deterministic=true", "epochs=3"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "other fixed settings (epochs)" in lines[0], err
    assert len(env.study().trials) == before


@pytest.mark.slow
def test_summary_artifacts_on_the_study_run(env, built, capsys):
    study = env.study()
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = env.client()
    names = {a.path for a in client.list_artifacts(parent, "summary")}
    for plot in (
        "trials.csv",
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "slice.png",
    ):
        assert f"summary/{plot}" in names, names
    assert "base_config.yaml" in {a.path for a in client.list_artifacts(parent)}
    table = pd.read_csv(client.download_artifacts(parent, "summary/trials.csv", str(env.tmp)))
    assert sorted(table["number"]) == list(range(6))
    assert list(table.sort_values("number")["state"]) == [t.state.name for t in study.trials]
    assert set(table["mlflow_run_id"]) == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    run = client.get_run(parent)
    best = study.best_trial
    assert run.data.tags["best_trial"] == str(best.number)
    assert run.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(best.value)
    assert run.data.metrics["trials_fail"] == 1
    # `harness report` refreshes it
    code, out, err = env.cli(
        capsys, "report", "--study", STUDY, "--storage", env.storage, "--tracking-uri", env.tracking
    )
    assert code == 0 and f"summary of study {STUDY} refreshed" in out and f"'best_trial': {best.number}" in out


@pytest.mark.slow
def test_best_prints_the_best_trial_its_params_and_run(env, built, capsys):
    best = env.study().best_trial
    code, out, err = env.cli(capsys, "best", "--study", STUDY, "--storage", env.storage, "--tracking-uri", env.tracking)
    assert code == 0, err
    low, high = best.user_attrs["val_ci"]  # its 95% interval on the validation images
    assert (
        f"best trial {best.number}: objective {best.value:.4f} (95% interval {low:.4f}-{high:.4f}); "
        f"MLflow run {best.user_attrs['mlflow_run_id']}"
    ) in out
    for name, value in best.params.items():
        assert f"  {name} = {value}" in out
    test_accuracy = env.client().get_run(best.user_attrs["mlflow_run_id"]).data.metrics["test_accuracy"]
    assert f"  test_accuracy: {test_accuracy:.6g}" in out
    code, out, err = env.cli(
        capsys, "best", "--study", "nope", "--storage", env.storage, "--tracking-uri", env.tracking
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "study 'nope' not found" in lines[0] and STUDY in lines[0]


def _compare(env: StudyEnv, capsys, *args: str) -> tuple[int, str, str]:
    """`harness compare` on the module's study, with `args`."""
    return env.cli(capsys, "compare", "--study", STUDY, "--storage", env.storage, "--tracking-uri", env.tracking, *args)


def _assert_one_row_per_trial_best_first(table: pd.DataFrame, study: optuna.Study) -> None:
    """The table agrees with the study's storage, trial by trial, and ranks by validation accuracy."""
    assert sorted(table["trial"]) == list(range(6))
    assert {"trial", "state", "val_accuracy", "test_accuracy", "run_id", "lr", "optimizer"} <= set(table.columns)
    by_trial = table.set_index("trial")
    for t in study.trials:
        assert by_trial.loc[t.number, "state"] == t.state.name
        assert by_trial.loc[t.number, "run_id"] == t.user_attrs["mlflow_run_id"]
        if t.state == TrialState.COMPLETE:
            assert by_trial.loc[t.number, "val_accuracy"] == pytest.approx(t.value)
    ranked = table["val_accuracy"].dropna().tolist()
    assert ranked == sorted(ranked, reverse=True)  # best first
    assert table["val_accuracy"].iloc[0] == pytest.approx(study.best_value)


@pytest.mark.slow
def test_compare_writes_csv_and_markdown(env, built, capsys):
    csv, md = env.tmp / "trials.csv", env.tmp / "trials.md"
    code, out, err = _compare(env, capsys, "--csv", str(csv), "--markdown", str(md), "--show")
    assert code == 0, err
    assert f"wrote {csv}" in out and f"wrote {md}" in out and "run_id" in out
    _assert_one_row_per_trial_best_first(pd.read_csv(csv), env.study())
    text = md.read_text().splitlines()
    assert text[0].startswith("|") and "trial" in text[0] and "val_accuracy" in text[0]
    assert len(text) == 2 + 6  # header, rule, one line per trial
    # another sort key, fewer rows, and a bad key
    code, out, err = _compare(env, capsys, "--sort", "trial", "--top", "3")
    assert code == 0
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    code, out, err = _compare(env, capsys, "--sort", "nonsense")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad --sort 'nonsense'" in err
    # more columns: a metric, a param, a tag of each trial's run; a name that is none of them
    extra = env.tmp / "extra.csv"
    args = ("--column", "train_seconds", "--column", "seed", "--column", "trial_state", "--csv", str(extra))
    assert _compare(env, capsys, *args)[0] == 0
    table = pd.read_csv(extra).set_index("trial")
    assert (table["train_seconds"].dropna() > 0).all() and table["seed"].notna().all()
    assert table["trial_state"].to_dict() == table["state"].to_dict()
    code, out, err = _compare(env, capsys, "--column", "nonsense")
    assert code == 2 and err.count("\n") == 1 and "bad --column 'nonsense': no metric, param or tag" in err


@pytest.mark.slow
def test_reproduce_matches_the_trial_exactly(env, built, capsys):
    study = env.study()
    trial = study.trials[1]  # a complete trial, deterministic on the CPU
    original = env.client().get_run(trial.user_attrs["mlflow_run_id"])
    code, out, err = env.cli(capsys, "reproduce", original.info.run_id, "--tracking-uri", env.tracking, "--quiet")
    assert code == 0, err
    new_id = out.split(" as run ")[1].split()[0]
    new = env.client().get_run(new_id)
    assert new.data.tags["reproduces"] == original.info.run_id
    assert new.info.experiment_id == original.info.experiment_id
    assert new.info.status == "FINISHED"
    assert new.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]  # exactly
    # the trial's test set was evaluated by its finisher on one thread, the reproduction's on all:
    # the same predictions, the loss summed in another order
    assert new.data.metrics["test_loss"] == pytest.approx(original.data.metrics["test_loss"], rel=1e-5)
    assert new.data.metrics["best_val_accuracy"] == original.data.metrics["best_val_accuracy"]
    line = next(line for line in out.splitlines() if line.startswith("test_accuracy"))
    assert line.split()[-1] == "+0.000000"
    # the reproduction is a run of its own, not a trial of the study
    assert MLFLOW_PARENT_RUN_ID not in new.data.tags and "trial_number" not in new.data.tags


@pytest.mark.slow
def test_reproduce_of_an_unknown_run_is_one_clear_line(env, built, capsys):
    code, out, err = env.cli(
        capsys, "reproduce", "0123456789abcdef0123456789abcdef", "--tracking-uri", env.tracking, "--quiet"
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "run 0123456789abcdef0123456789abcdef not found" in lines[0] and env.tracking in lines[0]


@pytest.mark.slow
def test_multi_objective_study_plots_the_pareto_front(env, capsys):
    space = env.tmp / "heads.yaml"
    space.write_text(
        "params:\n  model.head_width: {type: categorical, choices: [0, 16, 64]}\n"
        "  lr: {type: float, low: 0.005, high: 0.02, log: true}\n"
    )
    code = main(
        [
            "tune",
            "--study",
            "pareto",
            "--space",
            str(space),
            "--trials",
            "2",
            "--storage",
            env.storage,
            "--tracking-uri",
            env.tracking,
            "--data-dir",
            str(env.data),
            "--sampler",
            "nsga2",
            "--objectives",
            "accuracy,params",
            "--quiet",
            *[a for f in FIXED for a in ("--set", f)],
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    study = env.study("pareto")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2  # no pruning with two objectives
    client = env.client()
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert t.values[1] == run.data.metrics["num_params"]
        assert t.values[0] == pytest.approx(run.data.metrics["best_val_accuracy"])
    parent = study.user_attrs["mlflow_parent_run_id"]
    names = {a.path for a in client.list_artifacts(parent, "summary")}
    assert {"summary/pareto_front.png", "summary/pareto_front.csv", "summary/trials.csv"} <= names
    front = pd.read_csv(client.download_artifacts(parent, "summary/pareto_front.csv", str(env.tmp)))
    assert set(front["number"]) == {t.number for t in study.best_trials}
    assert {"val_accuracy", "num_params", "mlflow_run_id"} <= set(front.columns)
    # the printed best is the most accurate trial of the front
    best = max(study.best_trials, key=lambda t: t.values[0])
    assert f"best trial {best.number}: objective {best.values[0]:.4f}, {best.values[1]:.4f}" in out.out


def test_a_trial_beyond_the_target_is_given_up():
    """Two workers that both see one trial left both ask for one; trial numbers decide which goes on."""
    from harness.studies.worker import is_surplus

    study = optuna.create_study()
    first, second = study.ask(), study.ask()  # RUNNING, as two workers' trials
    study.tell(first, 0.5)
    assert not is_surplus(study, second, target=2)
    late = study.ask()
    assert is_surplus(study, late, target=2)  # trials 0 and 1 fill the study
    study.tell(second, state=TrialState.FAIL)  # a failure leaves its place to the next
    assert not is_surplus(study, late, target=2)
    study.tell(late, 0.7)
    assert is_surplus(study, study.ask(), target=2)


def test_a_study_that_stores_no_space_parameters_is_compared_by_space_name():
    """Studies made before the space's parameters were stored: the name decides."""
    from harness.studies.options import StudyError
    from harness.studies.study import _check_space

    study = optuna.create_study()
    study.set_user_attr("space", "training")
    _check_space(study, "training", {"lr": {"type": "float"}})
    with pytest.raises(StudyError, match="made with search space 'training' \\(compared by name.*--space training"):
        _check_space(study, "cnn", {"lr": {"type": "float"}})


@pytest.mark.slow
def test_tune_with_transfer_skips_it_with_one_line_when_the_target_is_missing(env, capsys):
    """The study stands; CIFAR-100 is absent from the generated data root, so the transfer is skipped."""
    fixed = tiny_trial("deterministic=true", drop=("eval.log_model",))  # trials keep their checkpoint
    code, out, err = env.tune_output(capsys, "then-transfer", 1, "--transfer", fixed=fixed)
    assert code == 0, err
    study = env.study("then-transfer")
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 1
    skipped = [line for line in out.splitlines() if line.startswith("harness: transfer skipped: ")]
    assert len(skipped) == 1 and "cifar100 not found" in skipped[0] and "--data-dir" in skipped[0]


def test_sampler_and_pruner_tables_are_the_command_lines_choices_and_refuse_other_names():
    from harness.config import ConfigError
    from harness.studies.options import PRUNERS, SAMPLERS
    from harness.studies.study import PRUNER_FACTORIES, SAMPLER_FACTORIES, make_pruner, make_sampler

    assert tuple(SAMPLER_FACTORIES) == SAMPLERS and tuple(PRUNER_FACTORIES) == PRUNERS
    with pytest.raises(ConfigError, match=r"^unknown sampler 'grid': choose one of tpe, random, qmc, cmaes, nsga2$"):
        make_sampler("grid", 0)
    for multi in (False, True):  # (a two-objective study prunes nothing, but the name is checked)
        with pytest.raises(ConfigError, match=r"^unknown pruner 'asha': choose one of hyperband, median, none$"):
            make_pruner("asha", 4, multi)
    assert isinstance(make_pruner("median", 4, False), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("median", 4, True), optuna.pruners.NopPruner)
    assert isinstance(make_sampler("qmc", 0), optuna.samplers.QMCSampler)


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])
def test_workers_with_one_seed_draw_their_own_values(sampler):
    """Two workers of one study, both given --seed 0, ask at once: different values; a new study
    with the same seed draws the first trial's values again (reproducible on one worker)."""
    from harness.studies.study import make_sampler

    multi = sampler == "nsga2"
    dirs = ["maximize", "minimize"] if multi else ["maximize"]
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", directions=dirs, sampler=make_sampler(sampler, 0))
    second = optuna.load_study(storage=storage, study_name="s", sampler=make_sampler(sampler, 0))
    a, b = first.ask(), second.ask()
    x = a.suggest_float("x", 0, 1)
    assert x != b.suggest_float("x", 0, 1)
    again = optuna.create_study(directions=dirs, sampler=make_sampler(sampler, 0))
    assert again.ask().suggest_float("x", 0, 1) == x


def test_workers_spread_over_the_gpus():
    from harness.studies.driver import worker_device

    assert [worker_device(i, "auto", 2) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_device(3, "cuda", 4) == "cuda:3"
    assert worker_device(0, "auto", 0) is None  # no GPU: the config's device
    assert worker_device(1, "cpu", 2) is None and worker_device(1, "cuda:1", 2) is None  # as asked
