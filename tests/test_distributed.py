"""Many workers on one study, and workers that die: real processes, real stores.

- Four workers on a fresh SQLite store (two `harness tune --workers 2` at once), four separately
  launched ones on a fresh journal file, and two separately launched workers on PostgreSQL
  (`HARNESS_TEST_POSTGRES_URL`, which .ci/run sets; skipped with the reason without it) finish
  exactly N trials between them, no trial lost or duplicated, all nested under one study run,
  with no lock errors in their output.
- A worker SIGKILLed mid-trial leaves its trial to the heartbeat: the resumed study fails it,
  retries it (a trial tagged `retry_of_run`) and ends the dead run FAILED.
- SIGINT stops a worker cleanly (exit 130, trial FAIL, run KILLED); the study resumes later.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
from helpers import TINY_TRIAL, harness_env, tiny_trial, wait_until
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

# real worker processes running whole studies, a minute or two a test: not in the fast subset
pytestmark = pytest.mark.slow

PG_ENV = "HARNESS_TEST_POSTGRES_URL"
FIXED = TINY_TRIAL
SPACE = """\
params:
  lr: {type: float, low: 0.005, high: 0.05, log: true}
  model.dropout: {type: float, low: 0.0, high: 0.2}
"""
LOCK_ERRORS = ("database is locked", "database table is locked")
WAIT = 240  # seconds: only a bound on waiting for a worker, never a measure


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cifar10_root, empty_mlflow_db):
    """Data, a space file and an MLflow store already migrated (creating one costs ~5 s)."""
    space = tmp_path_factory.mktemp("distributed") / "space.yaml"
    space.write_text(SPACE)
    return {"data": cifar10_root, "space": space, "mlflow_template": empty_mlflow_db}


class Setup:
    def __init__(self, tmp: Path, shared: dict, storage: str | None = None, fresh_mlflow: bool = False):
        self.tmp = tmp
        self.shared = shared
        self.storage = storage or f"sqlite:///{tmp / 'optuna.db'}"
        if not fresh_mlflow:
            shutil.copy(shared["mlflow_template"], tmp / "mlflow.db")
        self.tracking = f"sqlite:///{tmp / 'mlflow.db'}"
        self.logs: list[Path] = []
        self.env = {**harness_env(), "PYTHONFAULTHANDLER": "1"}  # (see `_stacks_then_kill`)

    def args(self, study: str, trials: int, fixed=FIXED, extra=()) -> list[str]:
        args = [
            "tune",
            "--study",
            study,
            "--space",
            str(self.shared["space"]),
            "--trials",
            str(trials),
            "--storage",
            self.storage,
            "--tracking-uri",
            self.tracking,
            "--data-dir",
            str(self.shared["data"]),
            "--sampler",
            "random",
            "--pruner",
            "none",
            "--heartbeat",
            "1",
            "--quiet",
            *extra,
        ]
        for item in fixed:
            args += ["--set", item]
        return args

    def start(self, args: list[str]) -> subprocess.Popen:
        log = self.tmp / f"worker{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:  # the child keeps its own descriptor
            return subprocess.Popen(
                [sys.executable, "-m", "harness.cli", *args],
                cwd=self.tmp,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_default_sigint,
                start_new_session=True,  # its process group: its workers and finishers, for `_stacks_then_kill`
            )

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs)

    def study(self, name: str) -> optuna.Study:
        from harness.studies.study import (
            storage_for,  # a journal file's storage
            storage_url,  # postgresql:// with the driver we install
        )

        return optuna.load_study(study_name=name, storage=storage_for(storage_url(self.storage)))

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking)


def _default_sigint():
    """A child started from a shell without job control inherits SIGINT ignored; Ctrl-C must reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait(procs: list[subprocess.Popen], setup: Setup) -> None:
    for p in procs:
        try:
            p.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            _stacks_then_kill(procs)
            pytest.fail(f"a worker did not finish within {WAIT} s:\n{setup.output()[-8000:]}")


def _stacks_then_kill(procs: list[subprocess.Popen]) -> None:
    """End commands that hung, with their workers and finishers (each command's process group).
    The group is frozen (SIGSTOP), then each process writes every thread's stack into the log
    (SIGABRT to faulthandler, on in `Setup.env`) one after the other, so the stacks do not
    interleave and show where each waited at the same moment."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGSTOP)
        for pid in _group(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)  # delivered when it runs again:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while pid in _group(p.pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # until it has written its stacks and ended
        for pid in _group(p.pid):  # what is left, children included
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def _group(pgid: int) -> list[int]:
    """The live processes of a process group (from /proc; ended ones that wait to be reaped left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):  # not a process, or one that ended meanwhile
            continue
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state not in "ZX":
            pids.append(int(entry.name))
    return sorted(pids)


def check_study(setup: Setup, name: str, n: int) -> optuna.Study:
    """Exactly n trials done, each with its own run, all under the study's one run; nothing left over."""
    study = setup.study(name)
    trials = study.trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n, [(t.number, t.state.name) for t in trials]
    for t in trials:
        # a worker that asked for a trial after the target was reached gives it up, without a run
        assert t.state != TrialState.FAIL or (t.user_attrs.get("surplus") and "mlflow_run_id" not in t.user_attrs), t
        assert t.state not in (TrialState.RUNNING, TrialState.WAITING), t
    run_ids = [t.user_attrs["mlflow_run_id"] for t in done]
    assert len(set(run_ids)) == n
    client = setup.client()
    exp = client.get_experiment_by_name(name)
    parent = study.user_attrs["mlflow_parent_run_id"]
    study_runs = client.search_runs([exp.experiment_id], "tags.run_kind = 'study'")
    assert [r.info.run_id for r in study_runs] == [parent]
    assert study_runs[0].info.status == "FINISHED"
    runs = client.search_runs([exp.experiment_id], "tags.run_kind = 'trial'", max_results=1000)
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
    by_id = {r.info.run_id: r for r in runs}
    for t in done:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
        assert run.data.tags["trial_number"] == str(t.number)
        assert run.data.tags["trial_state"] == t.state.name
        assert run.info.status == "FINISHED"
    assert sorted(int(r.data.tags["trial_number"]) for r in runs) == sorted(t.number for t in done)
    text = setup.output()
    assert not any(e in text for e in LOCK_ERRORS), text[-5000:]
    assert "Traceback" not in text, text[-5000:]
    return study


def test_four_concurrent_workers_on_a_fresh_sqlite_store(tmp_path, shared):
    """The SQLite choice for several workers on one machine, proved with four at once.

    Two `harness tune --workers 2` commands start together, as two people would on one machine:
    four worker processes, on stores that do not exist yet. Creating the Optuna tables and
    migrating the MLflow database are the first races; then every trial is contended, and
    with heartbeats every second the storage is written to all the time.
    """
    setup = Setup(tmp_path, shared, fresh_mlflow=True)
    procs = [setup.start(setup.args("four", 6, extra=("--workers", "2"))) for _ in range(2)]
    _wait(procs, setup)
    assert [p.returncode for p in procs] == [0, 0], setup.output()[-5000:]
    study = check_study(setup, "four", 6)
    # each command printed the study's best trial and left the summary on the study run
    assert setup.output().count("best trial") == 2
    names = {a.path for a in setup.client().list_artifacts(study.user_attrs["mlflow_parent_run_id"], "summary")}
    assert "summary/trials.csv" in names


def test_four_workers_on_a_fresh_journal_file(tmp_path, shared):
    """The journal choice (a shared filesystem, no database server), proved as SQLite's is.

    Four workers launched separately, as on four machines, on a journal file that does not exist
    yet: exactly N trials between them under one study run, no lock error, and each trial's
    heartbeats (the harness's: Optuna's journal has none) written through the journal. Four trials
    of one epoch, evaluated inline: the storage is what is under test, in a fraction of SQLite's time.
    """
    from harness.studies.optuna_access import HEARTBEAT_ATTR, trial_id

    journal = tmp_path / "optuna.journal"
    setup = Setup(tmp_path, shared, storage=f"journal:{journal}")
    one_epoch = [f for f in FIXED if not f.startswith("epochs=")] + ["epochs=1"]
    args = setup.args("journal", 4, fixed=one_epoch, extra=("--evaluate", "inline"))
    procs = [setup.start(args) for _ in range(4)]
    _wait(procs, setup)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], setup.output()[-5000:]
    study = check_study(setup, "journal", 4)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.system_attrs[HEARTBEAT_ATTR][0] == trial_id(t), t.system_attrs
    client = setup.client()
    study_run = client.search_runs([client.get_experiment_by_name("journal").experiment_id], "tags.run_kind = 'study'")
    assert study_run[0].data.tags["storage"] == f"journal:{journal}"
    assert sorted(p.name for p in tmp_path.glob("optuna.journal*")) == ["optuna.journal"]  # no lock left behind
    assert "lock file" not in setup.output()  # (Optuna warns of a lock held 10 s, and of one it breaks)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.split("@")[-1]).geturl()


@pytest.fixture(scope="module")
def postgres_url():
    """A database of its own on the server of HARNESS_TEST_POSTGRES_URL, dropped afterwards."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against (.ci/run starts one and sets it)")
    import psycopg2

    libpq = url.replace("postgresql+psycopg2://", "postgresql://")
    admin = urlsplit(libpq)._replace(path="/postgres").geturl()
    try:
        conn = psycopg2.connect(admin, connect_timeout=5)
    except psycopg2.Error as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pytest.skip(f"the PostgreSQL server of {PG_ENV} ({_redact(url)}) does not answer: {reason}")
    conn.autocommit = True
    name = f"harness_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    except psycopg2.Error:  # no right to create databases: use the given one (study names are unique)
        conn.close()
        yield url
        return
    try:
        yield urlsplit(url)._replace(path=f"/{name}").geturl()
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()


def test_two_workers_on_postgresql(postgres_url, tmp_path, shared):
    """Two separately launched workers (as on two machines) on a PostgreSQL study storage."""
    setup = Setup(tmp_path, shared, storage=postgres_url)
    name = f"pg-{secrets.token_hex(3)}"
    procs = [setup.start(setup.args(name, 4)) for _ in range(2)]
    _wait(procs, setup)
    assert [p.returncode for p in procs] == [0, 0], setup.output()[-5000:]
    check_study(setup, name, 4)
    assert (
        postgres_url.split("://")[0]
        in setup.client()
        .search_runs([setup.client().get_experiment_by_name(name).experiment_id], "tags.run_kind = 'study'")[0]
        .data.tags["storage"]
    )


def _running_trial_with_run(setup: Setup, name: str, proc: subprocess.Popen) -> optuna.trial.FrozenTrial:
    """Wait until the worker is inside a trial whose MLflow run exists."""
    deadline = time.monotonic() + WAIT
    study = None
    client = setup.client()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the worker ended (code {proc.returncode}) before a trial was seen running:\n{setup.output()[-5000:]}"
            )
        if study is None and (setup.tmp / "optuna.db").exists():
            try:
                study = setup.study(name)
            except Exception:  # the worker is still creating the storage or the study
                pass
        for t in study.get_trials(states=(TrialState.RUNNING,)) if study else ():
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                return t
        time.sleep(0.1)
    _stacks_then_kill([proc])
    pytest.fail(f"no trial was seen running within {WAIT} s:\n{setup.output()[-5000:]}")


def _wait_until_stale(setup: Setup, name: str, trial: optuna.trial.FrozenTrial) -> None:
    """Until Optuna reads the dead worker's trial as stale (its heartbeat older than the workers' grace
    period of 3 heartbeats, by the database's clock), as the next worker will."""
    from harness.studies.optuna_access import stale_trial_ids, trial_id
    from harness.studies.study import storage_url

    storage = optuna.storages.RDBStorage(storage_url(setup.storage), heartbeat_interval=1, grace_period=3)
    study = optuna.load_study(study_name=name, storage=storage)
    wait_until(lambda: trial_id(trial) in stale_trial_ids(study), f"stale trial {trial.number}", timeout=WAIT)


# trials of a few seconds: the test sees one running well before it ends
SLOW = tiny_trial("epochs=5")


def _resume(setup: Setup, name: str, trials: int) -> None:
    """The same command again, in this process (no need to pay for another interpreter)."""
    from harness.cli import main

    assert main(setup.args(name, trials, fixed=SLOW)) == 0


def test_sigkilled_worker_trial_is_failed_retried_and_its_run_ended(tmp_path, shared):
    setup = Setup(tmp_path, shared)
    proc = setup.start(setup.args("killed", 1, fixed=SLOW))
    dead = _running_trial_with_run(setup, "killed", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL
    dead_run = dead.user_attrs["mlflow_run_id"]
    assert setup.study("killed").trials[dead.number].state == TrialState.RUNNING  # nobody knows yet
    assert setup.client().get_run(dead_run).info.status == "RUNNING"
    _wait_until_stale(setup, "killed", dead)  # past the grace period (3 heartbeats of 1 s)
    _resume(setup, "killed", 1)

    study = setup.study("killed")
    assert study.trials[dead.number].state == TrialState.FAIL
    run = setup.client().get_run(dead_run)
    assert run.info.status == "FAILED"
    assert "heartbeat" in run.data.tags["error"] and run.data.tags["trial_state"] == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1, [(t.number, t.state.name, t.system_attrs) for t in study.trials]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    retry_run = setup.client().get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["retry_of_run"] == dead_run
    assert retry_run.info.run_id != dead_run
    # the study reached its one trial: the retry; the dead one is the only failure, its run the only FAILED one
    assert [t.number for t in study.trials] == [dead.number, retry.number]
    exp = setup.client().get_experiment_by_name("killed")
    statuses = sorted(r.info.status for r in setup.client().search_runs([exp.experiment_id], "tags.run_kind = 'trial'"))
    assert statuses == ["FAILED", "FINISHED"]
    parent = setup.client().get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"


def _stopped_study_is_clean(setup: Setup, name: str, reason: str) -> list[optuna.trial.FrozenTrial]:
    """After a stop: nothing RUNNING in either store, every stopped trial FAIL with the reason, its
    run KILLED, and queued again with its parameters. Returns the stopped trials."""
    study = setup.study(name)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    stopped = study.get_trials(states=(TrialState.FAIL,))
    assert stopped and all(t.user_attrs["fail_reason"].startswith(reason) for t in stopped), stopped
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == sorted(t.number for t in stopped)
    assert all(q.params == study.trials[q.system_attrs["failed_trial"]].params for q in queued)
    client = setup.client()
    exp = client.get_experiment_by_name(name)
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    for t in stopped:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "FAIL"
    return stopped


@pytest.mark.parametrize(
    "sig, workers",
    [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 1)],
    ids=["SIGTERM-1-worker", "SIGTERM-2-workers", "SIGINT-1-worker"],
)
def test_a_stopped_study_leaves_nothing_running_and_the_same_command_completes_it(tmp_path, shared, sig, workers):
    setup = Setup(tmp_path, shared)
    name, trials = "stopped", 3
    proc = setup.start(setup.args(name, trials, fixed=SLOW, extra=("--workers", str(workers))))
    _running_trial_with_run(setup, name, proc)
    start = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        _stacks_then_kill([proc])
        pytest.fail(f"{sig.name} did not stop the study:\n{setup.output()[-8000:]}")
    print(f"\n{sig.name} with {workers} worker(s): stopped in {time.monotonic() - start:.1f} s")
    out = setup.output()
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    said = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted by the user (Ctrl-C)"
    assert f"harness: {said}" in out
    stopped = _stopped_study_is_clean(setup, name, "Stopped" if sig == signal.SIGTERM else "KeyboardInterrupt")
    parent = setup.client().get_run(setup.study(name).user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"

    _resume(setup, name, trials)
    study = setup.study(name)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == trials and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    retried = {t.system_attrs.get("failed_trial") for t in done}
    assert {t.number for t in stopped} <= retried  # each stopped trial ran again, with its parameters
    exp = setup.client().get_experiment_by_name(name)
    assert not setup.client().search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert len(setup.client().search_runs([exp.experiment_id], "tags.run_kind = 'study'")) == 1


# deterministic trials of several epochs: long enough to be killed between two checkpoints
RESUMABLE = tiny_trial("epochs=6", "data.train_subset=600", "deterministic=true", "model.dropout=0.1")


def test_a_sigkilled_trial_resumes_from_its_last_checkpoint_and_ends_as_if_never_stopped(tmp_path, shared):
    from harness import resume

    # every part in a process of its own with one thread: float sums come out the same
    (tmp_path / "whole").mkdir()
    whole = Setup(tmp_path / "whole", shared)  # the same trial, never stopped
    _wait([whole.start(whole.args("resume", 1, fixed=RESUMABLE))], whole)
    expected = whole.study("resume").best_trial

    setup = Setup(tmp_path, shared)
    proc = setup.start(setup.args("resume", 1, fixed=RESUMABLE))
    dead = _running_trial_with_run(setup, "resume", proc)
    dead_run = dead.user_attrs["mlflow_run_id"]
    checkpoint = resume.path_for(setup.tracking, dead_run)
    deadline = time.monotonic() + WAIT
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT)
    assert checkpoint.exists(), "the trial ended before its first checkpoint: make RESUMABLE longer"
    epoch = resume.load(checkpoint)["epoch"]
    assert 1 <= epoch < 6
    _wait_until_stale(setup, "resume", dead)  # past the heartbeat's grace period: it reads as lost, is re-queued
    resumed = setup.start(setup.args("resume", 1, fixed=RESUMABLE))
    _wait([resumed], setup)
    assert resumed.returncode == 0, setup.output()[-5000:]

    study = setup.study("resume")
    retry = study.best_trial
    assert retry.system_attrs["failed_trial"] == dead.number and retry.params == expected.params
    run = setup.client().get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["resumed_from"] == dead_run and run.data.tags["resumed_at_epoch"] == str(epoch)
    assert retry.value == expected.value  # the same best validation accuracy, as if never stopped
    assert retry.intermediate_values == expected.intermediate_values
    history = setup.client().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]  # continuous
    assert not resume.checkpoint_dir(setup.tracking).exists() or not any(
        resume.checkpoint_dir(setup.tracking).iterdir()
    )
