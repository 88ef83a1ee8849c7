"""Stopping and resuming single runs, with real processes and a real store: SIGTERM ends a
`harness train` or `harness transfer` cleanly (runs KILLED, exit 143), and `harness train
--resume` continues a stopped run from its last checkpoint to the end an uninterrupted run reaches."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import harness_env, tiny_trial
from mlflow import MlflowClient

from harness import resume
from harness.cli import main

WAIT = 240  # seconds: a bound on waiting for a process, never a measure
# deterministic, several epochs of a few hundred generated images: long enough to stop between checkpoints
SETTINGS = tiny_trial(
    "epochs=6",
    "model.head_width=16",
    "data.train_subset=600",
    "eval.misclassified=4",
    "eval.figures=true",
    "deterministic=true",
    "model.dropout=0.1",
)


def harness(tmp_path, uri, *args) -> subprocess.Popen:
    """`harness ...` in a process of its own with one thread (float sums then come out the same)."""
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *args, "--tracking-uri", uri, "--quiet"],
        cwd=tmp_path,
        env=harness_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_args(data) -> list[str]:
    return ["train", "--data-dir", str(data), "--experiment", "stop", *[a for s in SETTINGS for a in ("--set", s)]]


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the process did not end within {WAIT} s:\n{proc.communicate()[0][-3000:]}")
    return out


def sigterm_at_first_checkpoint(uri: str, proc: subprocess.Popen) -> str:
    """SIGTERM `proc` while its run is unfinished and resumable: frozen (SIGSTOP) the moment its
    first checkpoint appears, signalled, then let go. A run discards its checkpoint only once it
    ended, so one still there while the process is frozen is an unfinished run's. Returns its id."""
    folder = resume.checkpoint_dir(uri)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in folder.glob("*.pt")] if folder.is_dir() else []
        if found:
            proc.send_signal(signal.SIGSTOP)
            assert found[0].exists(), "the run ended before it could be stopped: give it more epochs"
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            return found[0].stem
        time.sleep(0.005)  # polling the folder, not waiting out a guess
    pytest.fail(f"no run wrote a checkpoint:\n{finish(proc)[-3000:]}")


def test_checkpoints_go_to_harness_checkpoint_dir_when_it_is_set(tmp_path, monkeypatch):
    """By default beside the store's artifacts (mlruns/checkpoints); $HARNESS_CHECKPOINT_DIR moves them
    (a node's fast local disk, a tracking server's machine that the workers cannot write to)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv(resume.CHECKPOINT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resume.path_for(uri, "abc").parent.name == "checkpoints"
    monkeypatch.setenv(resume.CHECKPOINT_DIR_ENV, str(tmp_path / "fast-disk"))
    assert resume.path_for(uri, "abc") == tmp_path / "fast-disk" / "abc.pt"


@pytest.mark.slow
def test_sigterm_stops_a_run_which_resume_then_finishes_as_if_never_stopped(tmp_path, cifar10_root, tracking_uri):
    client = MlflowClient(tracking_uri)
    whole = harness(tmp_path, tracking_uri, *train_args(cifar10_root))
    assert whole.wait(timeout=WAIT) == 0
    expected = client.search_runs([client.get_experiment_by_name("stop").experiment_id])[0]

    proc = harness(tmp_path, tracking_uri, *train_args(cifar10_root))
    run_id = sigterm_at_first_checkpoint(tracking_uri, proc)
    out = finish(proc)
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "harness: stopped by SIGTERM" in out.strip().splitlines()[-1]
    stopped = client.get_run(run_id)
    assert stopped.info.status == "KILLED"
    epoch = resume.load(resume.path_for(tracking_uri, run_id))["epoch"]
    assert stopped.data.tags["error"] == f"stopped by SIGTERM; resumable from the end of epoch {epoch}"

    again = harness(tmp_path, tracking_uri, "train", "--resume", run_id, "--data-dir", str(cifar10_root))
    out = finish(again)
    assert again.returncode == 0 and run_id in out, out
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED" and done.data.tags["resumed_at_epoch"] == str(epoch)
    history = client.get_metric_history(run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # each epoch once: a continuous curve
    for key in ("best_val_accuracy", "val_loss", "test_accuracy", "test_loss"):
        assert done.data.metrics[key] == expected.data.metrics[key], key
    assert not resume.path_for(tracking_uri, run_id).exists()  # a finished run keeps no checkpoint


@pytest.mark.slow
def test_resume_refuses_runs_it_cannot_continue_with_one_line(tmp_path, cifar10_root, tracking_uri, capsys):
    assert main(train_args(cifar10_root)[:-2] + ["--set", "epochs=1", "--tracking-uri", tracking_uri, "--quiet"]) == 0
    client = MlflowClient(tracking_uri)
    finished = client.search_runs([client.get_experiment_by_name("stop").experiment_id])[0].info.run_id
    capsys.readouterr()
    assert main(["train", "--resume", finished, "--tracking-uri", tracking_uri]) == 2
    assert "finished: there is nothing to resume" in capsys.readouterr().err
    run = client.create_run(
        client.get_experiment_by_name("stop").experiment_id, tags={"run_kind": "trial", "study": "s"}
    )
    assert main(["train", "--resume", run.info.run_id, "--tracking-uri", tracking_uri]) == 2
    assert "a trial of study s: run the study's `harness tune` command again" in capsys.readouterr().err
    plain = client.create_run(client.get_experiment_by_name("stop").experiment_id)
    assert main(["train", "--resume", plain.info.run_id, "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert "left no checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_stops_a_transfer_with_every_run_ended(tmp_path, cifar10_root, tracking_uri):
    from helpers import write_cifar100

    c100 = write_cifar100(tmp_path / "c100", n_train=600, n_test=100, num_fine=10, num_coarse=5).root
    assert (
        main(train_args(cifar10_root) + ["--set", "eval.log_model=true", "--tracking-uri", tracking_uri, "--quiet"])
        == 0
    )
    client = MlflowClient(tracking_uri)
    source = client.search_runs([client.get_experiment_by_name("stop").experiment_id])[0].info.run_id
    proc = harness(
        tmp_path,
        tracking_uri,
        "transfer",
        "--from",
        source,
        "--data-dir",
        str(c100),
        "--set",
        "epochs=40",
        "--set",
        "data.train_subset=600",
    )
    deadline = time.monotonic() + WAIT
    children = []
    while not children and time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("transfer-cifar100")
        children = client.search_runs([exp.experiment_id], "tags.transfer_mode = 'probe'") if exp else []
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 143 and "Traceback" not in out, out
    runs = client.search_runs([client.get_experiment_by_name("transfer-cifar100").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}  # the parent and the child in progress
    assert all(r.data.tags["error"].startswith("stopped by SIGTERM") for r in runs)
