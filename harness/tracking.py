"""MLflow bookkeeping through an explicit client and run id.

Runs are created with `MlflowClient` and a parent id passed in, never through the fluent
"active run": the fluent run is per thread and per process, which is exactly where the
stock Optuna callback loses the nesting of trials under a study (see docs/design notes in
the README). Only `mlflow.pytorch.log_model`, which has no client form, resumes the run
fluently for the moment it needs.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-request limits


def tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the project's SQLite store in ./mlruns."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_root(uri: str) -> str | None:
    """For an SQLite store, artifacts go beside the database (so a temporary store is self-contained)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent)
    return None  # a tracking server decides


def client_for(uri: str | None = None) -> MlflowClient:
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)  # log_model and load_model read the fluent URI
    os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would hijack start_run (mlflow#15713)
    # no progress bar per downloaded file (config, checkpoint): noise on stderr, unless asked for
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{slug}" if root else None)
    except mlflow.exceptions.MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _timed(method):
    """Adds the call's wall time to the logger's `seconds`: the tracking overhead of a run."""
    import functools
    import time

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return wrapper


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


@dataclass
class RunLogger:
    """Everything one run logs, addressed by run id so it works from any thread or process."""
    client: MlflowClient
    run_id: str
    seconds: float = 0.0  # time spent in MLflow calls so far

    @classmethod
    def start(cls, client: MlflowClient, experiment: str, run_name: str, tags: dict | None = None,
              parent_run_id: str | None = None) -> "RunLogger":
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        tags[MLFLOW_RUN_NAME] = run_name
        run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    @_timed
    def log_params(self, params: dict) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for chunk in _chunks(items, MAX_BATCH["params"]):
            self.client.log_batch(self.run_id, params=chunk)

    @_timed
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One batched request for all metrics of a step (each metric alone costs the same)."""
        ts = _now_ms()
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=chunk)

    @_timed
    def set_tags(self, tags: dict) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_BATCH["tags"]):
            self.client.log_batch(self.run_id, tags=chunk)

    @_timed
    def log_figure(self, fig, path: str) -> None:
        self.client.log_figure(self.run_id, fig, path)
        import matplotlib.pyplot as plt
        plt.close(fig)

    def log_table(self, df: pd.DataFrame, path: str) -> None:
        """A CSV artifact people can open anywhere (MLflow's own JSON table is UI-only)."""
        self.log_text(df.to_csv(), path)

    @_timed
    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    @_timed
    def log_dataset(self, name: str, digest: str, images: np.ndarray, labels: np.ndarray,
                    source: str, context: str) -> None:
        """MLflow dataset tracking, with our content digest so differing copies are told apart."""
        import warnings

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local path matches two source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_numpy(images, targets=labels, source=source, name=name, digest=digest)
        entity = Dataset(**ds.to_dict())
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    @_timed
    def log_torch_model(self, model, input_example: np.ndarray, metadata: dict | None = None) -> None:
        import logging

        import mlflow.pytorch

        # pickle is deliberate (the model loads back as our CNN class); a weights-only
        # checkpoint is logged beside it for torch.load(weights_only=True)
        import torch

        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        # requirements given, not inferred: inference reloads the model in a subprocess (~5 s a run)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model, name="model", input_example=input_example, metadata=metadata,
                                     pip_requirements=requirements,
                                     serialization_format="pickle")  # loads back as our CNN class

    @_timed
    def log_state_dict(self, state: dict, path: str = "checkpoint/model.pt") -> None:
        """A plain tensor checkpoint that loads with `torch.load(weights_only=True)`."""
        import torch

        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / Path(path).name
            torch.save(state, local)
            self.client.log_artifact(self.run_id, str(local), str(Path(path).parent))

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """FINISHED, FAILED (with the reason as a tag and the run's note) or KILLED."""
        if reason:
            reason = reason.strip().splitlines()[-1] if reason.strip() else reason
            self.set_tags({"error": reason[:5000], "mlflow.note.content": f"{status}: {reason}"[:5000]})
        self.client.set_terminated(self.run_id, status)


def error_line(e: BaseException) -> str:
    """`Type: last line of the message`: why a run or trial failed, in one line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def _param_value(v) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)
