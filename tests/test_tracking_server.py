"""A tracking server that goes away: a real `mlflow server`, real harness processes.

- The server stopped for 30 s in the middle of `harness train` and started again on the same
  port and stores: with the harness's retry settings (docs/stopping-and-outages.md) the run ends FINISHED
  with every epoch's metrics, its figures and its model. A figure and a model logged while the
  server is away (artifact uploads through its `mlflow-artifacts:` proxy, and the fluent
  `mlflow.pytorch.log_model`) wait for it and arrive too.
- A server that never comes back: with short retries set in the environment, the trial fails
  with one line naming the server (its `fail_reason`), and `harness tune` ends with that line,
  in bounded time.
- Without a server: the retry settings, the one line made of MLflow's error, a run ended without
  waiting again, and the next worker ending a run the server left RUNNING with the trial's reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from helpers import tiny_trial, wait_until
from mlflow import MlflowClient
from optuna.trial import TrialState

from harness.tracking import HTTP_RETRIES

FIXED = tiny_trial("eval.misclassified=4", drop=("epochs", "eval.figures", "eval.log_model"))  # each test's epochs
SPACE = "params:\n  lr: {type: float, low: 0.005, high: 0.05, log: true}\n"
OUTAGE = 30  # seconds between stopping the server and starting it again (it then needs its start-up too)
WAIT = 300  # seconds: only a bound on waiting for a process, never a measure

# Run while the server is away: a figure (an artifact upload) and a model (fluent log_model), at once.
UPLOADS = """
import json, sys, threading, time
from pathlib import Path
import numpy as np, torch
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt
from harness.tracking import RunLogger, client_for

url, ready, go = sys.argv[1:4]
run = RunLogger.start(client_for(url), "outage-uploads", "uploads")
Path(ready).write_text(run.run_id)
while not Path(go).exists():
    time.sleep(0.05)
fig = plt.figure()
plt.plot([0, 1])
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
seconds, errors = {}, []

def timed(name, call):
    start = time.perf_counter()
    try:
        call()
    except Exception as e:
        errors.append(f"{name}: {e}")
    seconds[name] = time.perf_counter() - start

calls = {"figure": lambda: run.log_figure(fig, "eval/during_outage.png"),
         "model": lambda: run.log_torch_model(model, np.zeros((1, 3, 32, 32), np.float32))}
threads = [threading.Thread(target=timed, args=item) for item in calls.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
run.end()
print(json.dumps({"run_id": run.run_id, "seconds": seconds, "errors": errors}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a fixed port over one SQLite store and artifact folder, stopped and started at will."""

    def __init__(self, folder: Path, template_db: Path):
        self.folder = folder
        self.db = folder / "mlflow.db"
        shutil.copyfile(template_db, self.db)  # a migrated store: the server starts sooner
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        began = time.monotonic()
        log = self.folder / f"server{self.starts}.log"
        self.starts += 1
        # no job runner (a dozen huey processes the harness never uses): a lighter, faster server
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{self.db}",
                    "--artifacts-destination",
                    str(self.folder / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=self.folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # its own process group: stop() ends the server and its workers
        while time.monotonic() - began < WAIT:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - began
            except OSError:
                time.sleep(0.25)
        self.stop()
        pytest.fail(f"mlflow server did not answer within {WAIT} s:\n{log.read_text()[-3000:]}")

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if it lingers; returns once the port refuses connections."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        try:  # a worker of the group may outlive the parent by a moment
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
        pytest.fail(f"port {self.port} still answers after the server was stopped")


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_mlflow_db):
    srv = Server(tmp_path_factory.mktemp("tracking-server"), empty_mlflow_db)
    yield srv
    srv.stop()


def harness_env(server: Server, **settings: str) -> dict:
    """The environment of a harness process on `server`: MLflow's retry settings are the harness's
    own unless given here (an exported setting of whoever runs the tests must not leak in)."""
    env = {k: v for k, v in os.environ.items() if k not in HTTP_RETRIES and not k.startswith("MLFLOW_RUN")}
    env.update(MLFLOW_TRACKING_URI=server.url, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


def harness(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a harness process did not end within {WAIT} s:\n{log.read_text()[-5000:]}")
    return log.read_text()


def model_files(client: MlflowClient, run) -> set[str]:
    """The files of the run's one logged model (stored under the server's mlflow-artifacts: proxy)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    assert len(outputs) == 1, outputs
    return {a.path for a in client.list_logged_model_artifacts(outputs[0].model_id)}


def start_training(env: dict, data: Path, epochs: int, log: Path) -> subprocess.Popen:
    """`harness train` of a tiny network for `epochs`, logging its MLflow model too."""
    args = ["train", "--experiment", "outage", "--data-dir", str(data), "--quiet", "--set", f"epochs={epochs}"]
    return harness([*args, "--set", "eval.log_model=true", *(a for f in FIXED for a in ("--set", f))], env, log)


def start_uploads(server: Server, env: dict, ready: Path, go: Path, log: Path) -> subprocess.Popen:
    """The UPLOADS script: its run started once `ready` exists, its figure and model sent once `go` does."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", UPLOADS, server.url, str(ready), str(go)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def training_run_past_epoch_1(client: MlflowClient):
    """The training run once it has logged its first epoch (None before)."""
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs and client.get_metric_history(runs[0].info.run_id, "val_accuracy") and runs[0]


def assert_the_run_logged_everything(client: MlflowClient, run_id: str, epochs: int, out: str) -> None:
    """The run waited for the server, and everything it logged arrived."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    assert run.data.metrics["tracking_seconds"] >= OUTAGE  # time spent in MLflow calls: the outage
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
    assert {"test_accuracy", "test_loss", "best_val_accuracy", "tracking_seconds"} <= set(run.data.metrics)
    figures = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {
        "eval/confusion_counts.png",
        "eval/confusion_normalized.png",
        "eval/per_class.png",
        "eval/misclassified.png",
        "eval/per_class.csv",
    } <= figures
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/model.pt"]
    assert "MLmodel" in model_files(client, run)
    assert "Traceback" not in out, out[-5000:]


def assert_the_uploads_arrived(client: MlflowClient, up: str) -> None:
    """A figure and a model sent while the server was away waited for it, then arrived."""
    result = json.loads(up.strip().splitlines()[-1])
    assert result["errors"] == []
    assert min(result["seconds"].values()) >= OUTAGE - 2, result  # they were sent just after the stop
    uploaded = client.get_run(result["run_id"])
    assert uploaded.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(result["run_id"], "eval")] == ["eval/during_outage.png"]
    assert "MLmodel" in model_files(client, uploaded)


@pytest.mark.slow
def test_a_run_outlasts_a_30_s_outage_of_its_tracking_server(server, cifar10_root, tmp_path):
    server.ensure_up()
    env = harness_env(server)  # the harness's own retry settings: the point of this test
    train_log, uploads_log = tmp_path / "train.log", tmp_path / "uploads.log"
    epochs = 8
    train = start_training(env, cifar10_root, epochs, train_log)
    ready, go = tmp_path / "ready", tmp_path / "go"
    uploads = start_uploads(server, env, ready, go, uploads_log)
    client = MlflowClient(server.url)
    procs, logs = [train, uploads], [train_log, uploads_log]
    run = wait_until(lambda: training_run_past_epoch_1(client), "a training run past its first epoch", procs, logs)
    wait_until(ready.exists, "the uploads' run", procs, logs)

    server.stop()
    assert train.poll() is None, "the run ended before the server was stopped: give it more epochs"
    go.touch()  # the figure and the model are logged while the server is away
    time.sleep(OUTAGE)
    server.start()

    out = finish(train, train_log)
    assert train.returncode == 0, out[-5000:]
    up = finish(uploads, uploads_log)
    assert uploads.returncode == 0, up[-5000:]
    assert_the_run_logged_everything(client, run.info.run_id, epochs, out)
    assert_the_uploads_arrived(client, up)


def start_tune(env: dict, space: Path, storage: str, data: Path, log: Path) -> subprocess.Popen:
    """`harness tune` of study "dead": three random trials of 100 epochs, far longer than the server lasts."""
    args = ["tune", "--study", "dead", "--space", str(space), "--trials", "3", "--storage", storage]
    args += ["--data-dir", str(data), "--sampler", "random", "--pruner", "none", "--quiet", "--set", "epochs=100"]
    return harness([*args, *(a for f in FIXED for a in ("--set", f))], env, log)


def trial_with_a_run(storage: str):
    """The study's running trial once it has its MLflow run (None before)."""
    try:
        study = optuna.load_study(study_name="dead", storage=storage)
    except Exception:  # the worker is still creating the storage or the study
        return None
    return next((t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs), None)


def assert_one_line_naming_the_server(out: str, url: str) -> None:
    """One line, the last of the process: which server, for how long, after how many retries."""
    lines = out.strip().splitlines()
    prefix = f"harness: error: tracking server {url} unreachable for "
    assert lines[-1].startswith(prefix), out[-5000:]
    assert "(MLflow gave up after 2 retries): [Errno 111] Connection refused;" in lines[-1]
    assert "run the same command to resume" in lines[-1]
    # never the requests error (MLflow's system-metrics thread may log it in a warning of its own)
    ours = "\n".join(line for line in lines if "mlflow.system_metrics" not in line)
    assert not any(s in ours for s in ("Max retries exceeded", "HTTPConnectionPool", "NewConnectionError")), out


@pytest.mark.slow
def test_a_tracking_server_that_never_comes_back_fails_the_trial_with_one_line(server, cifar10_root, tmp_path):
    server.ensure_up()
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # short retries: 2, after 0 and 2 s (MLflow's back-off with factor 1), so about 2 s a call
    env = harness_env(server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    log = tmp_path / "tune.log"
    tune = start_tune(env, space, storage, cifar10_root, log)
    trial = wait_until(lambda: trial_with_a_run(storage), "a running trial with its run", [tune], [log])
    server.stop()  # for good
    stopped = time.monotonic()
    out = finish(tune, log)
    took = time.monotonic() - stopped

    assert tune.returncode == 2, out[-5000:]
    assert_one_line_naming_the_server(out, server.url)
    # the trial failed with the one line in the study's storage, and the worker stopped in bounded time:
    # three calls of ~2 s (the trial's, the study run's update, the next trial's start) and the worker's
    # shut-down (its finisher process may still be starting: up to a minute on a busy 2-core machine)
    failed = optuna.load_study(study_name="dead", storage=storage).trials[trial.number]
    assert failed.state == TrialState.FAIL
    reason = failed.user_attrs["fail_reason"]
    assert reason.startswith(f"tracking server {server.url} unreachable for "), reason
    assert reason.endswith("(MLflow gave up after 2 retries): [Errno 111] Connection refused"), reason
    assert took < 150, f"{took:.0f} s from the server's end to the worker's:\n{out[-5000:]}"


# ----------------------------------------------------------------------------
# The pieces, without a server


def test_the_harness_retry_settings_apply_to_http_uris_only_and_never_override(monkeypatch):
    from harness.tracking import use_http_retries

    for name in HTTP_RETRIES:  # recorded, so that the test leaves the environment as it found it
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    use_http_retries("sqlite:///mlruns/mlflow.db")
    assert not any(name in os.environ for name in HTTP_RETRIES)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # the user's choice wins
    use_http_retries("https://mlflow.example.org")
    assert {name: os.environ[name] for name in HTTP_RETRIES} == {**HTTP_RETRIES, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}


def test_mlflow_giving_up_on_a_server_reads_as_one_line_and_ending_the_run_does_not_wait(monkeypatch):
    from mlflow.exceptions import MlflowException

    from harness.tracking import (
        RunLogger,
        TrackingServerUnreachable,
        error_line,
        server_unreachable,
    )

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # after 0 and 2 s
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    port = free_port()  # nobody listens there
    client = MlflowClient(f"http://someone:secret@127.0.0.1:{port}")
    run = RunLogger(client, "0" * 32)
    with pytest.raises(TrackingServerUnreachable) as gone:
        run.log_metrics({"loss": 1.0}, step=1)
    assert re.fullmatch(
        rf"tracking server http://127\.0\.0\.1:{port} unreachable for \d+ s \(MLflow gave up "
        r"after 2 retries\): \[Errno 111\] Connection refused",
        str(gone.value),
    ), str(gone.value)
    assert run.server_gone
    start = time.monotonic()
    run.end("FAILED", str(gone.value))  # one try, no retries, and the server still away is let be
    assert time.monotonic() - start < 1.5
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as raw:  # MLflow's own error, as a driver call raises it
        client.get_run("0" * 32)
    assert "Max retries exceeded" in str(raw.value)
    assert error_line(raw.value) == (
        f"tracking server http://127.0.0.1:{port} unreachable for 0 s "
        "(MLflow gave up after 0 retries): [Errno 111] Connection refused"
    )
    assert server_unreachable(ValueError("bad value")) is None
    assert error_line(ValueError("bad value")) == "ValueError: bad value"
    assert server_unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: no run")) is None


def test_the_next_worker_ends_a_run_its_server_left_running_with_the_trials_reason(tracking_uri, tmp_path):
    """A trial that failed on an unreachable server could not end its run; reconciling ends it
    FAILED with the trial's reason (not as a lost heartbeat)."""
    from harness.studies.reconcile import reconcile_runs
    from harness.tracking import RunLogger

    client = MlflowClient(tracking_uri)
    study = optuna.create_study(study_name="away", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.set_user_attr("mlflow_experiment", "away")
    trial = study.ask()
    run = RunLogger.start(
        client, "away", "trial-0", tags={"run_kind": "trial", "trial_number": trial.number, "trial_state": "RUNNING"}
    )
    line = (
        "tracking server http://db:5000 unreachable for 244 s (MLflow gave up after 7 retries): "
        "[Errno 111] Connection refused"
    )
    trial.set_user_attr("fail_reason", line)
    study.tell(trial, state=TrialState.FAIL)
    assert reconcile_runs(study, client) == 1
    ended = client.get_run(run.run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["error"] == line and ended.data.tags["trial_state"] == "FAIL"
