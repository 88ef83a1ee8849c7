"""docs/tour.ipynb, run top to bottom as a reader runs it (nbclient, a real kernel): generated CIFAR-10,
a real MLflow SQLite store and Optuna storage in a temporary folder, the tiny runs of the other tests.
The notebook is kept without outputs: what the repository holds is what a reader runs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from helpers import new_tracking_uri, tiny_trial
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "tour.ipynb"


def test_the_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_tour_runs_top_to_bottom(tmp_path, cifar10_root, empty_mlflow_db, monkeypatch):
    from nbclient import NotebookClient

    tracking = new_tracking_uri(tmp_path, empty_mlflow_db)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    # the kernel is a child process: it reads its stores, data and budget from the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("HARNESS_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    monkeypatch.setenv("HARNESS_DATA_DIR", str(cifar10_root))
    monkeypatch.setenv("HARNESS_TOUR_SETTINGS", " ".join(tiny_trial()))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (2 shared cores: a second thread buys nothing on tiny runs)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        nbformat.write(nb, tmp_path / "tour.ipynb")  # what each cell showed, to look at when this fails

    client = MlflowClient(tracking)
    (train,) = client.search_runs([client.get_experiment_by_name("cifar10-train").experiment_id])
    runs = client.search_runs([client.get_experiment_by_name("tour").experiment_id], max_results=100)
    kinds = sorted(r.data.tags.get("run_kind", "reproduction") for r in runs)
    assert kinds == ["reproduction"] * 2 + ["study"] + ["trial"] * 3, kinds
    assert {r.info.status for r in [train, *runs]} == {"FINISHED"}
    # what the cells showed: the compare table, the figure, the reproduction's table
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    shown = "\n".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "vs_best" in shown and "predict_low" in shown
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # the stores named by the environment
