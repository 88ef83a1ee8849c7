"""The background finisher: a trial's job is evaluated and logged after its run ended, by a process
of its own; a job whose worker or finisher died is done by the next one (or by `drain`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from harness.experiment import train_run
from harness.finisher import Finisher, drain, finish_pending, pending, spool_dir, write_job
from harness.models import build_model
from harness.tracking import RunLogger, client_for

EVAL = {"misclassified": 4, "tsne": True, "embedding_samples": 60, "log_model": True}


def artifacts(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


@pytest.mark.slow
def test_a_finished_trial_is_evaluated_in_the_background(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, eval=EVAL)
    client = client_for(tracking_uri)
    finisher = Finisher(tracking_uri, umap=False)
    run = RunLogger.start(client, "finish", "trial")
    result = train_run(cfg, run, progress=False, finisher=finisher)
    assert result.test is None  # not evaluated here...
    ended = client.get_run(run.run_id)
    assert ended.info.status == "FINISHED" and "test_accuracy" not in ended.data.metrics
    assert ended.data.tags["evaluation"] == "pending" and (spool_dir(tracking_uri) / run.run_id).is_dir()
    finisher.close()  # ...but by the finisher, which ends once the spool is empty
    done = client.get_run(run.run_id)
    assert done.data.tags["evaluation"] == "done"
    # logging the model reopens the run in MLflow: it ends as it was, its duration the trial's own
    assert (done.info.status, done.info.end_time) == ("FINISHED", ended.info.end_time)
    assert done.data.tags["model_uri"].startswith("models:/")
    assert {"test_accuracy", "test_macro_f1", "evaluation_seconds"} <= set(done.data.metrics)
    assert {"eval/confusion_counts.png", "eval/per_class.csv", "eval/misclassified.png"} <= artifacts(
        client, run.run_id, "eval"
    )
    assert "embeddings/tsne.png" in artifacts(client, run.run_id, "embeddings")
    assert "checkpoint/model.pt" in artifacts(client, run.run_id, "checkpoint")
    assert "data/train_samples.png" in artifacts(client, run.run_id, "data")
    assert not any(spool_dir(tracking_uri).iterdir())


HOLD = """
import fcntl, sys, time
f = open(sys.argv[1], "a"); fcntl.flock(f, fcntl.LOCK_EX); print("held", flush=True); time.sleep(600)
"""


@pytest.mark.slow
def test_a_crash_loses_no_evaluation(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, eval=EVAL)
    client = client_for(tracking_uri)
    spool = spool_dir(tracking_uri)
    # a worker's finisher killed before it did anything: the worker does the job as it closes
    finisher = Finisher(tracking_uri, umap=False)
    os.kill(finisher._process.pid, signal.SIGKILL)
    own = RunLogger.start(client, "finish", "trial-own")
    finisher.submit(own, cfg, build_model(cfg.model, 10))
    finisher.close()
    assert client.get_run(own.run_id).data.tags["evaluation"] == "done" and not (spool / own.run_id).exists()
    # a worker killed after its trial (no close): the job stays in the spool
    first = RunLogger.start(client, "finish", "trial-0")
    write_job(spool, first, cfg, build_model(cfg.model, 10), tracking_uri)
    # a job a live finisher is working on is left to it...
    second = RunLogger.start(client, "finish", "trial-1")
    job = write_job(spool, second, cfg, build_model(cfg.model, 10), tracking_uri)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(job / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert finish_pending(spool) == 1  # (the first job)
        assert job.is_dir() and client.get_run(second.run_id).data.tags.get("evaluation") is None
    finally:
        holder.kill()  # ...until it dies mid-job: its lock goes with it
        holder.wait()
    start = time.time()
    assert drain(tracking_uri, timeout=60) == 1 and time.time() - start < 60
    for run in (first, second):
        got = client.get_run(run.run_id)
        assert got.data.tags["evaluation"] == "done" and "test_accuracy" in got.data.metrics
        assert "eval/confusion_normalized.png" in artifacts(client, run.run_id, "eval")
    assert not any(spool.iterdir())


def test_a_failed_evaluation_is_recorded_on_the_run(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, eval=EVAL)
    client = client_for(tracking_uri)
    run = RunLogger.start(client, "finish", "trial")
    job = write_job(spool_dir(tracking_uri), run, cfg, build_model(cfg.model, 10), tracking_uri)
    (job / "model.pt").write_bytes(b"not a checkpoint")
    assert drain(tracking_uri) == 1
    tags = client.get_run(run.run_id).data.tags
    assert tags["evaluation"] == "failed" and tags["evaluation_error"].startswith("UnpicklingError")
    assert not job.exists()


def test_report_finishes_the_evaluations_left_behind(cifar10_root, tracking_uri, tiny_config, tmp_path, capsys):
    """A trial's job left in the spool by a killed finisher: `harness report` does it before the summary."""
    import optuna
    from optuna.distributions import FloatDistribution

    from harness.cli import main

    cfg = tiny_config(cifar10_root)
    client = client_for(tracking_uri)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="left", storage=storage, direction="maximize")
    parent = RunLogger.start(client, "left", "study-left", tags={"run_kind": "study"})
    study.set_user_attr("mlflow_parent_run_id", parent.run_id)
    run = RunLogger.start(client, "left", "trial-0", tags={"run_kind": "trial"}, parent_run_id=parent.run_id)
    job = write_job(spool_dir(tracking_uri), run, cfg, build_model(cfg.model, 10), tracking_uri)
    study.add_trial(
        optuna.trial.create_trial(
            value=0.5,
            params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-3, 0.1, log=True)},
            user_attrs={"mlflow_run_id": run.run_id},
        )
    )
    assert main(["report", "--study", "left", "--storage", storage, "--tracking-uri", tracking_uri]) == 0
    assert "finished 1 trial evaluation left in the spool" in capsys.readouterr().out
    got = client.get_run(run.run_id).data
    assert got.tags["evaluation"] == "done" and "test_accuracy" in got.metrics
    assert not list(job.parent.iterdir())  # nothing left in the spool, hidden or not


def test_a_job_folder_left_with_only_its_lock_is_no_job(tracking_uri):
    """What a job's removal could leave when another finisher opened its lock meanwhile (a folder
    with a lock file and no job): nothing to wait for, so `drain`, before a study's summary, returns
    at once instead of at its 600-s timeout (a `harness tune` of the four-worker test hung so)."""
    spool = spool_dir(tracking_uri)
    (spool / "0123abcd").mkdir(parents=True)
    (spool / "0123abcd" / "lock").touch()
    assert pending(spool) == []
    assert drain(tracking_uri) == 0
