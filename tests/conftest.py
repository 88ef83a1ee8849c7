"""Shared fixtures: small generated CIFAR-10/100 copies in the official python layouts,
a temporary real MLflow store, a fast config, and the switch for the real-data tests. What they
are made of (and what tests import) is in helpers.py, which benchmarks import too.

    def test_something(cifar10_root, tracking_uri, tiny_config):
        cfg = tiny_config(cifar10_root, "model.widths=[8]", epochs=2, eval={"tsne": True})

Real data: set HARNESS_TEST_DATA_DIR to a data root holding cifar-10-batches-py/; tests that
take the `real_data_root` fixture skip, with the reason, where it is unset or incomplete.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from helpers import FakeCifar, make_tiny_config, new_tracking_uri, write_cifar10, write_cifar100  # noqa: E402

REAL_DATA_ENV = "HARNESS_TEST_DATA_DIR"


def pytest_configure(config):
    config.addinivalue_line("markers", f"real_data: needs real CIFAR-10 under ${REAL_DATA_ENV}")
    # the fast inner loop is `pytest -m "not slow"` (under a minute on 2 idle cores); CI runs everything
    config.addinivalue_line(
        "markers",
        "slow: a study, worker, server, browser, subprocess or full-run test of "
        "more than a few seconds (deselect with -m 'not slow')",
    )


# ----------------------------------------------------------------------------
# Generated data in the official layouts


@pytest.fixture(scope="session")
def cifar10_data(tmp_path_factory) -> FakeCifar:
    """A generated CIFAR-10 (600 train, 200 test) written once per session; do not modify it."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar10_root(cifar10_data) -> Path:
    return cifar10_data.root


@pytest.fixture(scope="session")
def cifar100_data(tmp_path_factory) -> FakeCifar:
    return write_cifar100(tmp_path_factory.mktemp("cifar100"))


@pytest.fixture(scope="session")
def cifar100_root(cifar100_data) -> Path:
    return cifar100_data.root


# ----------------------------------------------------------------------------
# Tracking store and configs


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema created, made once per session: creating the
    tables (MLflow's migrations) takes seconds, copying the file a millisecond."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, empty_mlflow_db) -> str:
    """A fresh real MLflow SQLite store in tmp_path/mlruns (artifacts beside it); no inherited
    MLflow environment settings."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    return new_tracking_uri(tmp_path, empty_mlflow_db)


@pytest.fixture
def tiny_config():
    """The `make_tiny_config(root, *sets, **overrides)` helper."""
    return make_tiny_config


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    """Tests choose their data root explicitly: an exported HARNESS_DATA_DIR must not leak in."""
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


# ----------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The data root named by HARNESS_TEST_DATA_DIR; skips with the reason where it is absent."""
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(
            f"real-data test: set {REAL_DATA_ENV} to a data root holding cifar-10-batches-py/ "
            "(.ci/run materializes one)"
        )
    root = Path(value).expanduser()
    missing = [
        n
        for n in ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
        if not (root / "cifar-10-batches-py" / n).is_file()
    ]
    if missing:
        pytest.skip(f"real-data test: {REAL_DATA_ENV}={value} lacks cifar-10-batches-py/{missing[0]}")
    return root
