"""System metrics per training run: MLflow's monitor attached to a run made by `create_run`.

On by default (`eval.system_metrics`), off with `--set eval.system_metrics=false`; a run shorter
than one sampling interval still gets its metrics, and no monitor thread outlives its run.
"""

from __future__ import annotations

import threading

import pytest
from mlflow import MlflowClient

from harness.experiment import run_experiment
from harness.training import NonFiniteLoss

# every test is a real run with MLflow's monitor thread (3-8 s each): out of the fast subset
pytestmark = pytest.mark.slow

# what psutil gives on any machine (GPU ones are added where nvidia-ml-py finds a GPU)
EXPECTED = {
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
}


def system_metrics(uri: str, run_id: str) -> dict[str, float]:
    run = MlflowClient(uri).get_run(run_id)
    return {k: v for k, v in run.data.metrics.items() if k.startswith("system/")}


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_a_tiny_run_has_system_metrics(cifar10_root, tracking_uri, tiny_config):
    result = run_experiment(tiny_config(cifar10_root), tracking_uri, progress=False)  # about a second
    metrics = system_metrics(tracking_uri, result.run_id)
    assert EXPECTED <= set(metrics)
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert MlflowClient(tracking_uri).get_run(result.run_id).info.status == "FINISHED"
    assert not monitor_threads()


def test_sampled_through_the_run(cifar10_root, tracking_uri, tiny_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's override of the interval
    result = run_experiment(tiny_config(cifar10_root), tracking_uri, progress=False)  # a few seconds
    history = MlflowClient(tracking_uri).get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2  # the monitor's thread logged during the run, then the last sample at its end
    assert [m.step for m in history] == list(range(len(history)))


def test_off_logs_none(cifar10_root, tracking_uri, tiny_config):
    result = run_experiment(tiny_config(cifar10_root, "eval.system_metrics=false"), tracking_uri, progress=False)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert system_metrics(tracking_uri, result.run_id) == {}
    assert "test_accuracy" in run.data.metrics
    assert run.data.params["eval.system_metrics"] == "False"
    assert not monitor_threads()


def test_a_failed_run_keeps_its_system_metrics_and_stops_its_monitor(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, optimizer="sgd", lr=1e30, epochs=2)  # a non-finite loss
    with pytest.raises(NonFiniteLoss):
        run_experiment(cfg, tracking_uri, progress=False)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifar10-train").experiment_id])
    assert run.info.status == "FAILED"
    assert EXPECTED <= set(system_metrics(tracking_uri, run.info.run_id))
    assert not monitor_threads()
