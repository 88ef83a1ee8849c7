"""`harness dashboard` beside a running study: real processes, a real SQLite study, real HTTP.

- A `harness tune` worker runs a study while `harness dashboard` serves it and the test reads the
  study's page and API again and again: the worker ends with its full trial count and no error,
  and every trial's note, read through the dashboard, links the trial's MLflow run.
- Why that used to break (optuna-dashboard#545), at the level of SQLite: a dashboard read left
  in progress makes a worker's commit fail in rollback-journal mode; on our storage (WAL) the
  commit goes through, and the dashboard's own connection cannot write at all.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from helpers import as_sets, harness_env, tiny_trial, wait_until
from mlflow import MlflowClient
from optuna.trial import TrialState
from optuna_dashboard import get_note

from harness.cli import main
from harness.studies.dashboard import mlflow_run_url, read_only_storage
from harness.studies.study import storage_url, writable_storage

STUDY = "live"
TRIALS = 3
# tiny trials two epochs longer, on four times the images: each reports four intermediate values
# (writes) while the dashboard is read
FIXED = tiny_trial("epochs=4", "data.train_subset=800")
SPACE = """\
params:
  lr: {type: float, low: 0.005, high: 0.05, log: true}
  model.dropout: {type: float, low: 0.0, high: 0.2}
"""
WAIT = 300  # seconds: only a bound on waiting, never a measure
ERRORS = ("database is locked", "database table is locked", "Traceback")


def _harness(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *args],
            cwd=cwd,
            env=harness_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
        return r.status, r.headers.get("Content-Type", ""), body


@pytest.fixture
def live(tmp_path, cifar10_root, empty_mlflow_db):
    """A study made by `harness tune --trials 0` (here), `harness dashboard` on it, then a worker
    running its trials; both processes stopped at the end whatever happens."""
    (tmp_path / "space.yaml").write_text(SPACE)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"

    def tune(trials: int) -> list[str]:
        args = [
            "tune",
            "--study",
            STUDY,
            "--space",
            str(tmp_path / "space.yaml"),
            "--trials",
            str(trials),
            "--storage",
            storage,
            "--tracking-uri",
            tracking,
            "--data-dir",
            str(cifar10_root),
            "--sampler",
            "random",
            "--pruner",
            "none",
            "--heartbeat",
            "1",
            "--quiet",
        ]
        return args + as_sets(FIXED)

    assert main(tune(0)) == 0  # the study and its MLflow run, no trial yet
    logs = [tmp_path / "worker.log", tmp_path / "dashboard.log"]
    procs = [_harness(["dashboard", "--study", STUDY, "--storage", storage, "--port", "0"], logs[1], tmp_path)]
    try:
        found = wait_until(lambda: re.search(r"on (http://\S+)", logs[1].read_text()), "dashboard URL", procs, logs[1:])
        procs.append(_harness(tune(TRIALS), logs[0], tmp_path))  # the dashboard is up before the worker starts
        yield {
            "worker": procs[1],
            "dashboard": procs[0],
            "page": found.group(1),
            "storage": storage,
            "tracking": tracking,
            "logs": logs,
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def _read_dashboard(base: str, page: str, study_id: int) -> dict:
    """The study's page, the study list and the study's detail, as a browser would read them."""
    status, kind, body = _get(page)
    assert status == 200 and kind.startswith("text/html") and b"<html" in body.lower()
    status, _, body = _get(f"{base}/api/studies")
    assert status == 200
    assert STUDY in [s["study_name"] for s in json.loads(body)["study_summaries"]]
    status, _, body = _get(f"{base}/api/studies/{study_id}")
    assert status == 200
    detail = json.loads(body)
    assert detail["name"] == STUDY
    return detail


def _shown_running(base: str, page: str, study_id: int) -> set[int]:
    return {t["number"] for t in _read_dashboard(base, page, study_id)["trials"] if t["state"] == "Running"}


def _running_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


@pytest.mark.slow
def test_dashboard_on_a_running_study(live):
    page = live["page"]
    base = page.split("/dashboard/")[0]
    assert base.startswith("http://127.0.0.1:")  # this machine only, by default
    summaries = json.loads(_get(f"{base}/api/studies")[2])["study_summaries"]
    study_id = {s["study_name"]: s["study_id"] for s in summaries}[STUDY]
    assert page == f"{base}/dashboard/studies/{study_id}"  # the study's own page
    worker = live["worker"]
    # The dashboard must show a trial while it runs. No race with the trial's length: once the
    # storage shows a RUNNING trial, the worker is frozen (SIGSTOP) so the trial stays RUNNING
    # however long the reads take, the dashboard is read until it shows it (its trial cache lives
    # 2 s), and the worker goes on (SIGCONT).
    # A trial that ended between the storage's answer and the freeze is simply waited for again.
    study = optuna.load_study(study_name=STUDY, storage=live["storage"])
    rounds, running_seen = 0, set()
    while worker.poll() is None:
        _read_dashboard(base, page, study_id)  # reads beside a worker that writes
        rounds += 1
        if running_seen or not _running_numbers(study):
            continue
        worker.send_signal(signal.SIGSTOP)
        try:
            frozen = _running_numbers(study)
            if frozen:  # optuna-dashboard reads a study's trials again once its cache is 2 s old
                wait_until(
                    lambda: _shown_running(base, page, study_id) == frozen,
                    f"trial(s) {sorted(frozen)} shown running",
                    timeout=60,
                )
                running_seen = frozen
        finally:
            worker.send_signal(signal.SIGCONT)
    log = live["logs"][0].read_text()
    assert worker.returncode == 0, log[-5000:]
    assert running_seen, f"no trial was seen RUNNING in the storage in {rounds} reads while the worker ran"
    assert not any(e in log for e in ERRORS), log[-5000:]

    # a request that would write is refused, and the dashboard is still up
    request = urllib.request.Request(
        f"{base}/api/studies/{study_id}/rename",
        method="POST",
        data=b'{"study_name": "renamed"}',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 405 and "read-only" in json.loads(refused.value.read())["reason"]
    assert live["dashboard"].poll() is None, live["logs"][1].read_text()

    study = optuna.load_study(study_name=STUDY, storage=live["storage"])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * TRIALS
    # each trial's note, as the dashboard serves it, links the trial's MLflow run
    detail = json.loads(_get(f"{base}/api/studies/{study_id}")[2])
    exp_id = MlflowClient(live["tracking"]).get_experiment_by_name(STUDY).experiment_id
    notes = {t["number"]: t["note"]["body"] for t in detail["trials"]}
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        assert f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}" in notes[t.number]
        assert MlflowClient(live["tracking"]).get_run(run_id).info.experiment_id == exp_id
    assert "Traceback" not in live["logs"][1].read_text()


def test_a_dashboard_read_blocks_no_worker_write(tmp_path):
    """The cause of optuna-dashboard#545 and our guard, with a worker that waits at most 0.5 s."""

    def writer(url: str) -> optuna.Study:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 0.5}})
        study = optuna.create_study(study_name=STUDY, storage=storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
        return study

    def write_during_a_read(url: str, reader) -> str:
        study = writer(url)
        con = reader()
        cursor = con.cursor()
        cursor.execute("SELECT * FROM trials")
        cursor.fetchone()  # a dashboard query in progress: its statement is not finished
        try:  # a worker's commit (Optuna retries creating trials a few seconds; this it does not)
            study.set_user_attr("written", True)
            return "written"
        except Exception as e:  # optuna's StorageInternalError, caused by SQLite's error
            return f"{e} ({e.__cause__})"
        finally:
            con.close()

    # optuna's default SQLite set-up (rollback journal): the reader makes the worker's commit fail
    plain = tmp_path / "plain.db"
    outcome = write_during_a_read(f"sqlite:///{plain}", lambda: sqlite3.connect(plain))
    assert "database is locked" in outcome

    # ours: the storage in WAL mode (as `harness tune` and `harness dashboard` open it), the
    # dashboard's connection read-only: the commit goes through while the read is in progress
    url = writable_storage(f"sqlite:///{tmp_path / 'ours.db'}")
    opened = []

    def dashboard_connection():
        opened.append(read_only_storage(url))  # as `harness dashboard` opens it, on the study made just now
        return opened[0].engine.raw_connection()

    assert write_during_a_read(url, dashboard_connection) == "written"
    dashboard = opened[0]
    assert len(dashboard.get_all_trials(dashboard.get_study_id_from_name(STUDY))) == 5
    with pytest.raises(Exception, match="(?i)commit|read ?only"):
        dashboard.set_study_user_attr(dashboard.get_study_id_from_name(STUDY), "x", 1)


def test_dashboard_errors_are_one_line(tmp_path, capsys):
    assert main(["dashboard", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: no study storage at") and "harness tune" in err and "\n" not in err
    url = storage_url(f"sqlite:///{tmp_path / 'o.db'}")
    optuna.create_study(study_name="other", storage=url)
    assert main(["dashboard", "--study", "s", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "study 's' not found" in err and "other" in err and "\n" not in err


def test_mlflow_run_url():
    assert mlflow_run_url("sqlite:///mlruns/mlflow.db", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert mlflow_run_url("http://db:5000/", "3", "abc") == "http://db:5000/#/experiments/3/runs/abc"
    assert (
        mlflow_run_url("https://mlflow.example.org/base", "1", "r")
        == "https://mlflow.example.org/base/#/experiments/1/runs/r"
    )


def test_a_note_that_cannot_be_written_does_not_fail_the_trial(tmp_path, tracking_uri, caplog):
    from harness.studies.dashboard import note_run_link
    from harness.tracking import RunLogger

    url = storage_url(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name=STUDY, storage=url)
    trial = study.ask()
    run = RunLogger(MlflowClient(tracking_uri), "0123abc", experiment_id="7")
    note_run_link(trial, run)
    assert "http://127.0.0.1:5000/#/experiments/7/runs/0123abc" in get_note(trial)
    optuna.delete_study(study_name=STUDY, storage=url)  # the note can no longer be written
    note_run_link(trial, run)  # logged, not raised
    assert any("no dashboard note" in r.getMessage() for r in caplog.records)
