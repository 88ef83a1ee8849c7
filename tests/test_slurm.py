"""`harness slurm` and its workers on a real one-node Slurm (.ci/slurm.sh starts it and sets
HARNESS_TEST_SLURM; without it the cluster tests skip with the reason).

- `--dry-run` prints the job array's script; a bad time, partition or a machine without sbatch
  is one line.
- An array of 2 workers on one study gives one study tree, every run tagged with its task.
- A job in partition `high` preempts an array task mid-trial: the worker stops cleanly on
  Slurm's SIGTERM, Slurm requeues the task, and its retry resumes from the last checkpoint.
- A task brought near its time limit gets SIGUSR1, stops, requeues itself, and the study completes.

Slurm holds a requeued job for two minutes (its BeginTime; no slurm.conf setting found): the
tests release it with `scontrol update StartTime=now` as soon as it is pending again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import SLURM_ENDED, harness_env, slurm_jobs, tiny_trial
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from harness.cli import main
from harness.studies import slurm

SLURM_ENV = "HARNESS_TEST_SLURM"
REPO = Path(__file__).resolve().parent.parent
SPACE = """\
params:
  lr: {type: float, low: 0.005, high: 0.05, log: true}
"""
ENDED = SLURM_ENDED | {"PREEMPTED"}  # (PREEMPTED too: no test here expects a task to stop there)
WAIT = 240  # seconds: only a bound on waiting for Slurm or a worker, never a measure
# trials of many epochs, each checkpointed (seconds on idle cores): a preemption lands inside one
LONG = tiny_trial("epochs=40", "data.train_subset=400")
# a study of some 45 s of training on idle cores, in long trials: it outlasts the up to 30 s Slurm
# takes to see a job near its time limit (its check runs every 30 s)
MANY = 3, tiny_trial("epochs=80", "data.train_subset=600")


# ----------------------------------------------------------------------------
# The script and bad input (no cluster needed, but for the partition)


def test_the_template_in_the_repo_is_what_harness_slurm_writes():
    assert slurm.TEMPLATE.read_text() == slurm.template(), "run `python -m harness.studies.slurm` to regenerate it"


def test_dry_run_prints_an_array_that_requeues_appends_and_signals_the_exec_d_worker(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "slurm",
                "--study",
                "s",
                "--array-size",
                "3",
                "--time",
                "1-00:00",
                "--signal-seconds",
                "90",
                "--gpus-per-task",
                "1",
                "--mem",
                "8G",
                "--storage",
                "sqlite:///o.db",
                "--dry-run",
                "--",
                "--space",
                "cnn",
                "--trials",
                "12",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    lines = text.splitlines()
    for line in (
        "#SBATCH --array=0-2",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --open-mode=append",
        "#SBATCH --time=1-00:00",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --mem=8G",
        f"#SBATCH --output={tmp_path}/slurm-logs/harness-s-%A_%a.out",
        "export HARNESS_STORAGE=sqlite:///o.db",
    ):
        assert line in lines, text
    assert lines[-1].startswith(f"exec {sys.executable} -m harness.cli tune --study s --quiet --space cnn --trials 12")


def test_no_password_goes_into_the_script(capsys, tmp_path, monkeypatch):
    """The script is kept on disk, printed and copied into Slurm's spool: the URIs go in without
    their passwords, which libpq (~/.pgpass) and MLflow ($MLFLOW_TRACKING_PASSWORD) read on the node."""
    monkeypatch.chdir(tmp_path)
    args = ["slurm", "--study", "s", "--storage", "postgresql://me:s3cret@db:5432/optuna", "--dry-run"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:pw2@mlflow.example:5000")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "s3cret" not in text and "pw2" not in text, text
    lines = text.splitlines()
    assert "export HARNESS_STORAGE=postgresql://me@db:5432/optuna" in lines, text
    assert "export MLFLOW_TRACKING_URI=https://me@mlflow.example:5000" in lines, text
    assert "~/.pgpass" in text and "$MLFLOW_TRACKING_PASSWORD" in text


@pytest.mark.parametrize(
    "args, says",
    [
        (["--time", "90m"], "bad --time '90m': Slurm takes MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
        (["--time", "1:99"], "bad --time '1:99'"),
        (["--time", "2", "--signal-seconds", "120"], "--time 2 (120 s) is not longer than --signal-seconds 120"),
        (["--", "--workers", "2"], "--workers after `--`: give it to `harness slurm` itself"),
    ],
)
def test_bad_input_is_one_line(capsys, args, says):
    assert main(["slurm", "--study", "s", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_no_sbatch_on_path_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm's commands
    assert main(["slurm", "--study", "s"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "harness: error: no Slurm on this machine (sbatch is not on PATH): run `harness slurm` on the "
        "cluster's login node, or use --dry-run to print the script\n"
    )


@pytest.mark.parametrize(
    "time_text, seconds",
    [
        ("30", 1800),
        ("5:30", 330),
        ("1:00:00", 3600),
        ("2-3", 183600),
        ("1-02:03", 93780),
        ("1-00:00:05", 86405),
        ("UNLIMITED", None),
    ],
)
def test_slurm_time_formats(time_text, seconds):
    assert slurm.time_seconds(time_text) == seconds


def test_tags_only_under_slurm():
    assert slurm.slurm_tags({}) == {}
    env = {"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2", "SLURMD_NODENAME": "n1"}
    assert slurm.slurm_tags(env) == {
        "slurm_job_id": "12",
        "slurm_array_job_id": "10",
        "slurm_array_task_id": "2",
        "slurm_restart_count": "0",
        "slurm_node": "n1",
    }
    assert slurm.own_job(env) == "10_2" and slurm.own_job({"SLURM_JOB_ID": "7"}) == "7"


# ----------------------------------------------------------------------------
# A real cluster


@pytest.fixture(scope="session")
def cluster():
    """Slurm's partitions low and high, answering here; skips with the reason otherwise."""
    if not os.environ.get(SLURM_ENV):
        pytest.skip(f"{SLURM_ENV} is not set: no Slurm to test against (.ci/run starts one with .ci/slurm.sh)")
    if shutil.which("sbatch") is None:
        pytest.skip(f"{SLURM_ENV} is set but sbatch is not on PATH")
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=False)
    parts = {p.rstrip("*") for p in out.stdout.split()}
    if out.returncode != 0 or not {"low", "high"} <= parts:
        pytest.skip(f"Slurm does not show partitions low and high (sinfo: {out.stderr.strip() or out.stdout.strip()})")


def test_an_unknown_partition_is_one_line(cluster, capsys):
    assert main(["slurm", "--study", "s", "--partition", "gpu-big", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "harness: error: no Slurm partition 'gpu-big': choose one of low, high (sinfo lists them)\n"
    )


class Study:
    """A study run by `harness slurm` in tmp: its stores, its job and what the cluster says of it."""

    def __init__(self, tmp: Path, data: Path, name: str, trials: int, trial_sets: list[str]):
        self.tmp, self.name, self.trials = tmp, name, trials
        (tmp / "space.yaml").write_text(SPACE)
        self.storage = f"sqlite:///{tmp / 'optuna.db'}"
        self.tracking = f"sqlite:///{tmp / 'mlflow.db'}"
        self.tune = [
            "--space",
            str(tmp / "space.yaml"),
            "--trials",
            str(trials),
            "--data-dir",
            str(data),
            "--sampler",
            "random",
            "--pruner",
            "none",
            "--heartbeat",
            "5",
        ]
        for item in trial_sets:
            self.tune += ["--set", item]
        self.job: str | None = None

    def submit(self, *slurm_args: str) -> str:
        """`harness slurm` in a child process, as a user runs it: the job gets its interpreter and,
        through sbatch's exported environment, this checkout on PYTHONPATH."""
        env = {**harness_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "slurm",
                "--study",
                self.name,
                "--storage",
                self.storage,
                "--tracking-uri",
                self.tracking,
                "--partition",
                "low",
                *slurm_args,
                "--",
                *self.tune,
            ],
            cwd=self.tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        self.job = re.match(r"submitted job array (\d+)", out.stdout).group(1)
        return self.job

    def tasks(self) -> dict[str, dict]:
        """`scontrol show job` of each array task, by task id."""
        return {task: fields for task, fields in slurm_jobs(self.job).items() if task}

    def states(self) -> dict[str, str]:
        return {i: t["JobState"] for i, t in self.tasks().items()}

    def log(self, task: str = "0") -> str:
        path = self.tmp / "slurm-logs" / f"harness-{self.name}-{self.job}_{task}.out"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((self.tmp / "slurm-logs").glob("*.out")))

    def wait(self, condition, what: str):
        """Poll `condition` (bounded); fail with the tasks' states and logs."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        pytest.fail(f"no {what} within {WAIT} s; tasks: {self.states()}\n{self.logs()[-6000:]}")

    def release_when_requeued(self, task: str, restarts: int) -> dict:
        """Wait for the task to be pending again after its `restarts`th requeue, and let it start now."""

        def requeued():
            t = self.tasks().get(task)
            assert not (t and t["JobState"] in ENDED), f"task {task} ended {t['JobState']}:\n{self.logs()[-6000:]}"
            return t if t and t["JobState"] == "PENDING" and int(t["Restarts"]) >= restarts else None

        t = self.wait(requeued, f"task {task} pending after a requeue")
        subprocess.run(["scontrol", "update", f"JobId={t['JobId']}", "StartTime=now"], check=True, timeout=30)
        return t

    def done(self) -> bool:
        states = self.states()
        bad = set(states.values()) & (ENDED - {"COMPLETED"})
        assert not bad, f"tasks {states}:\n{self.logs()[-6000:]}"
        return bool(states) and set(states.values()) == {"COMPLETED"}

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.storage)

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking)

    def running_trial_with_checkpoint(self):
        """The trial in progress once its run has left a checkpoint (at least one epoch done)."""
        from harness import resume

        if not (self.tmp / "optuna.db").exists():
            return None
        try:
            running = self.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:  # the first worker is still creating the storage or the study
            return None
        for t in running:
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id and resume.path_for(self.tracking, run_id).exists():
                return t
        return None

    def check_tree(self) -> tuple[optuna.Study, list]:
        """Exactly its trials done, one FINISHED run each, all nested under the one study run and
        tagged with their Slurm task; nothing RUNNING or WAITING; no leaked semaphore in the logs."""
        study = self.study()
        done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        assert len(done) == self.trials, [(t.number, t.state.name) for t in study.trials]
        assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
        client = self.client()
        exp = client.get_experiment_by_name(self.name)
        parent = study.user_attrs["mlflow_parent_run_id"]
        study_runs = client.search_runs([exp.experiment_id], "tags.run_kind = 'study'")
        assert [r.info.run_id for r in study_runs] == [parent] and study_runs[0].info.status == "FINISHED"
        assert study_runs[0].data.tags["slurm_array_job_id"] == self.job
        runs = client.search_runs([exp.experiment_id], "tags.run_kind = 'trial'", max_results=1000)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        finished = {r.info.run_id: r for r in runs if r.info.status == "FINISHED"}
        assert sorted(finished) == sorted(t.user_attrs["mlflow_run_id"] for t in done)
        for r in runs:
            tags = r.data.tags
            assert tags[MLFLOW_PARENT_RUN_ID] == parent
            assert tags["slurm_array_job_id"] == self.job and tags["slurm_array_task_id"] in self.states()
            assert tags["slurm_job_id"] == self.tasks()[tags["slurm_array_task_id"]]["JobId"]
            assert tags["slurm_node"] and tags["slurm_restart_count"].isdigit()
        text = self.logs()
        assert "Traceback" not in text and "leaked semaphore" not in text, text[-6000:]
        return study, runs


@pytest.fixture
def make_study(cluster, tmp_path, cifar10_root):
    made: list[Study] = []

    def make(name: str, trials: int, trial_sets: list[str]) -> Study:
        made.append(Study(tmp_path, cifar10_root, name, trials, trial_sets))
        return made[-1]

    yield make
    for s in made:  # whatever a failed test left in the queue
        if s.job:
            subprocess.run(["scancel", s.job], timeout=30, check=False)


@pytest.mark.slow
def test_an_array_of_two_workers_makes_one_study_tree(make_study):
    s = make_study("array", 4, tiny_trial())
    s.submit("--array-size", "2", "--cpus-per-task", "1", "--time", "10")
    s.wait(s.done, "array of 2 tasks COMPLETED")
    _, runs = s.check_tree()
    assert len(runs) == 4  # no stop, no retry
    assert all(r.data.tags["slurm_restart_count"] == "0" for r in runs)


@pytest.mark.slow
def test_a_preempted_task_stops_cleanly_is_requeued_and_resumes_its_trial(make_study):
    s = make_study("preempted", 2, LONG)
    # the whole node: a job in partition high that needs a CPU must preempt it
    s.submit("--array-size", "1", "--cpus-per-task", "2", "--time", "10")
    s.wait(s.running_trial_with_checkpoint, "trial running with a checkpoint")
    started = time.monotonic()
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-c", "1", "-o", str(s.tmp / "high.out"), "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    try:
        task = s.release_when_requeued("0", restarts=1)
        print(
            f"\npreempted: the task was pending again {time.monotonic() - started:.1f} s after the high job "
            f"was submitted (Restarts={task['Restarts']})"
        )
        s.wait(s.done, "requeued task COMPLETED")
    finally:
        subprocess.run(["scancel", high], timeout=30, check=False)
    study, runs = s.check_tree()
    log = s.log()
    assert "DUE TO PREEMPTION" in log and log.count("harness: stopped by SIGTERM") == 1, log
    assert "restart 1," in log  # the second attempt, in the same log after the first
    run = check_stopped_and_retried(s, study, "Stopped")
    assert run.data.tags["resumed_at_epoch"] != "0"
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]


def check_retried(s: Study, study: optuna.Study, stopped: optuna.trial.FrozenTrial, reason: str):
    """A stopped trial: FAIL for `reason`, and its retry COMPLETE with its parameters in the second
    attempt. Where it had a run (a stop can land between a trial's start and its run's), that run
    is KILLED and the retry resumed from its checkpoint. Returns the retry's run."""
    assert stopped.user_attrs["fail_reason"].startswith(reason), stopped.user_attrs
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == stopped.number)
    assert retry.state == TrialState.COMPLETE and retry.params == stopped.params
    run = s.client().get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["slurm_restart_count"] == "1"
    if "mlflow_run_id" in stopped.user_attrs:
        killed = s.client().get_run(stopped.user_attrs["mlflow_run_id"])
        assert killed.info.status == "KILLED" and killed.data.tags["slurm_restart_count"] == "0"
        assert run.data.tags["retry_of_run"] == killed.info.run_id
    return run


def check_stopped_and_retried(s: Study, study: optuna.Study, reason: str):
    """The one trial stopped mid-run, retried and resumed from its checkpoint. Returns the retry's run."""
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    run = check_retried(s, study, stopped, reason)
    assert run.data.tags["resumed_from"] == stopped.user_attrs["mlflow_run_id"], run.data.tags
    return run


@pytest.mark.slow
def test_a_task_near_its_time_limit_requeues_itself_and_the_study_completes(make_study):
    s = make_study("timelimit", *MANY)
    s.submit("--array-size", "1", "--cpus-per-task", "2", "--time", "10", "--signal-seconds", "120")
    s.wait(s.running_trial_with_checkpoint, "trial running with a checkpoint")
    # bring the limit near: 60 to 120 s left, inside --signal-seconds, so Slurm's next time-limit
    # check sends SIGUSR1 well before the limit itself
    task = s.tasks()["0"]
    elapsed = time.time() - time.mktime(time.strptime(task["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    minutes = int(elapsed + 60) // 60 + 1
    subprocess.run(["scontrol", "update", f"JobId={task['JobId']}", f"TimeLimit={minutes}"], check=True, timeout=30)
    started = time.monotonic()
    s.release_when_requeued("0", restarts=1)
    print(
        f"\ntime limit: the task requeued itself {time.monotonic() - started:.1f} s after its limit was brought "
        f"to {minutes} min ({elapsed:.0f} s into the job)"
    )
    # its next attempt gets the whole limit again (or it would be told to stop as it starts)
    subprocess.run(["scontrol", "update", f"JobId={task['JobId']}", "TimeLimit=10"], check=True, timeout=30)
    s.wait(s.done, "requeued task COMPLETED")
    study, _ = s.check_tree()
    log = s.log()
    assert log.count("harness: stopped by SIGUSR1 (the Slurm job nears its time limit)") == 1, log
    assert f"harness: requeued Slurm job {s.job}_0" in log and "restart 1," in log, log
    # Slurm's signal lands anywhere in its 30 s window: mid-trial (mostly), as a trial starts, or
    # between two (then no trial is stopped); resuming from a checkpoint is the preemption test's
    stopped = study.get_trials(states=(TrialState.FAIL,))
    assert len(stopped) <= 1, stopped
    for t in stopped:
        check_retried(s, study, t, "TimeUp")
