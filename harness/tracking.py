"""MLflow bookkeeping through an explicit client and run id.

Runs are created with `MlflowClient` and a parent id passed in, never through the fluent
"active run": the fluent run is per thread and per process, which is exactly where the
stock Optuna callback loses the nesting of trials under a study (docs/architecture.md, "Why not
optuna-integration's MLflowCallback"). Only `mlflow.pytorch.log_model`, which has no client form,
resumes the run fluently for the moment it needs.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from harness.config import DEFAULT_TRACKING_URI
from harness.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-request limits
MODEL_URI_TAG = "model_uri"  # a run's logged model, models:/<model_id>: a study registers its champion from it


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
    use_http_retries(uri)
    if uri.startswith("sqlite:///"):
        _sqlite_wal(uri)
    return MlflowClient(uri)


@contextmanager
def store_lock(url: str):
    """Held while a process opens a store that may not exist yet.

    Creating a fresh SQLite store from several processes at once fails ("table ... already
    exists"), and MLflow's schema migrations run concurrently can leave the database half
    migrated: workers on one machine take turns through a lock file beside the database.
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    path = Path(url.removeprefix("sqlite:///")).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_client(uri: str | None = None):
    """The MLflow client, its store created (and migrated) by one process at a time."""
    with store_lock(tracking_uri(uri)):
        client = client_for(uri)
        client.search_experiments(max_results=1)  # the store exists and is migrated from here on
        if client.tracking_uri.startswith("sqlite:///"):
            _sqlite_wal(client.tracking_uri)
    return client


NOTE_TAG = "mlflow.note.content"  # an experiment's (or run's) Markdown description in the MLflow UI


def experiment_id(client: MlflowClient, name: str, description: str | None = None) -> str:
    """The experiment `name`, created (or restored) if need be.

    `description` (Markdown) becomes the experiment's description when it has none, so an
    older experiment gets one too, and one a user wrote or edited in the UI is never replaced.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if description and NOTE_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, NOTE_TAG, description)
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    try:
        return client.create_experiment(
            name,
            artifact_location=f"{root}/{slug}" if root else None,
            tags={NOTE_TAG: description} if description else None,
        )
    except mlflow.exceptions.MlflowException:  # another worker created it first (with the description)
        if client.get_experiment_by_name(name) is None:
            raise
        return experiment_id(client, name, description)


def redact(url: str) -> str:
    """A store's URL as it may be printed or logged: never with its password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _timed(method):
    """Adds the call's wall time to the logger's `seconds`: the tracking overhead of a run.

    A call MLflow gave up on (its tracking server away past the retries) raises one line, and
    the logger's later calls (ending the run) first try the server once (`probe_server`) instead
    of waiting the retries out again.
    """
    import functools
    import time

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            if self.server_gone:
                probe_server(self.client)
            return retry_locked(method, self, *args, **kwargs)
        except Exception as e:
            gone = server_unreachable(e, time.perf_counter() - start)
            if gone is None:
                raise
            self.server_gone = True
            raise gone from None
        finally:
            self.seconds += time.perf_counter() - start

    return wrapper


LOCKED_RETRIES = (1, 2, 4, 8)  # seconds between tries of a write an SQLite store refused as locked


def retry_locked(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, tried again while an SQLite store answers "database is locked".

    MLflow waits 20 s for SQLite's lock, but a write that reads first can be refused at once when
    another process wrote meanwhile, and on a loaded machine a process can hold the lock longer.
    The refused transaction was rolled back, so trying again writes nothing twice.
    """
    import time

    for wait in (*LOCKED_RETRIES, None):
        try:
            return fn(*args, **kwargs)
        except mlflow.exceptions.MlflowException as e:
            if wait is None or "database is locked" not in str(e):
                raise
            time.sleep(wait)


def _sqlite_wal(uri: str) -> None:
    """An SQLite store in WAL mode (kept in the file): readers (the UI, searches) never block the
    workers and finishers writing to it."""
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    if not path.is_file():
        return
    with sqlite3.connect(path, timeout=60) as db:
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


# Seconds between system-metric samples. Each sample costs the process about 25 ms of CPU
# (psutil, a run-status read, one batched write: measured on SQLite), so 0.25% of a core at
# 10 s; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL = 10.0


def start_system_metrics(uri: str, run_id: str, interval: float = SYSTEM_METRICS_INTERVAL):
    """MLflow's own monitor (CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py) on a run
    made by `create_run`, where `start_run(log_system_metrics=True)` is no use. None without psutil:
    a run never fails for its system metrics."""
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop/no-GPU lines per run
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri)
    except Exception as e:  # psutil missing, most likely
        logging.getLogger(__name__).warning("no system metrics (%s): pip install psutil", error_line(e))
        return None
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor and log what it sampled since its last record, and a last sample: MLflow's
    monitor drops those, so a run shorter than one interval would have no system metrics at all."""
    if monitor is None:
        return
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # the run's own results matter more than its system metrics
        import logging

        logging.getLogger(__name__).warning("system metrics not logged: %s", error_line(e))


@dataclass
class RunLogger:
    """Everything one run logs, addressed by run id so it works from any thread or process.

    Used as a context manager, it ends its run however the block ends: FINISHED, or KILLED on
    Ctrl-C or SIGTERM (with `killed_note` added to the reason), or FAILED with the error's line;
    exceptions in `finished_by` (a study's pruning signal) end it FINISHED, tagged `stopped_by`.

        with RunLogger.start(client, "cifar10-train", "default") as run:
            ...
    """

    client: MlflowClient
    run_id: str
    seconds: float = 0.0  # time spent in MLflow calls so far
    server_gone: bool = False  # a call outlasted MLflow's retries: the rest try once
    experiment_id: str | None = None
    monitor: object = None  # MLflow's SystemMetricsMonitor while the run trains (`monitor_system`)
    finished_by: tuple = ()  # exception types that end the run FINISHED (see the class docstring)
    killed_note: str = ""  # said after the reason when the run is stopped, e.g. how to resume it
    status: str | None = None  # how the run ended (None while it runs): ending it again does nothing

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment: str,
        run_name: str,
        tags: dict | None = None,
        parent_run_id: str | None = None,
    ) -> "RunLogger":
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        tags[MLFLOW_RUN_NAME] = run_name
        run = retry_locked(client.create_run, experiment_id(client, experiment), run_name=run_name, tags=tags)
        return cls(client, run.info.run_id, experiment_id=run.info.experiment_id)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, kind, e, traceback) -> bool:
        from harness.interrupts import stop_reason

        if e is None:
            self.end("FINISHED")
        elif isinstance(e, self.finished_by):
            self.set_tags({"stopped_by": type(e).__name__})
            self.end("FINISHED")
        elif isinstance(e, KeyboardInterrupt):
            self.end("KILLED", stop_reason(e) + self.killed_note)
        else:
            self.end("FAILED", error_line(e))
        return False

    def monitor_system(self) -> None:
        """System metrics (`system/...`) from now until `end`, sampled by MLflow's monitor."""
        self.monitor = self.monitor or start_system_metrics(self.client.tracking_uri, self.run_id)

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

    @_timed
    def log_figures(self, figures: dict) -> None:
        """Figures by artifact path, saved as `log_figure` would and logged in one request.

        Built with `matplotlib.figure.Figure` (harness.evaluation), they render with Agg and are
        in no pyplot registry: nothing to close, no pyplot to import.
        """
        if not figures:
            return
        with tempfile.TemporaryDirectory() as d:
            for path, fig in figures.items():
                local = Path(d) / path
                local.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(local)
            self.client.log_artifacts(self.run_id, d)

    def log_table(self, df: pd.DataFrame, path: str) -> None:
        """A CSV artifact people can open anywhere (MLflow's own JSON table is UI-only)."""
        self.log_text(df.to_csv(), path)

    @_timed
    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    @_timed
    def log_dataset(
        self, name: str, digest: str, images: np.ndarray, labels: np.ndarray, source: str, context: str
    ) -> None:
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
    def log_torch_model(self, model, input_example: np.ndarray, metadata: dict | None = None, signature=None) -> str:
        """`mlflow.pytorch.log_model` (a LoggedModel); returns its `models:/<model_id>`, also tagged on the run.
        A `signature` given spares MLflow inferring it by running the model on `input_example`."""
        import logging

        import mlflow.pytorch

        # pickle is deliberate (the model loads back as our CNN class); a weights-only
        # checkpoint is logged beside it for torch.load(weights_only=True)
        import torch

        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        # requirements given, not inferred: inference reloads the model in a subprocess (~5 s a run)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]
        before = self.client.get_run(self.run_id).info
        with mlflow.start_run(run_id=self.run_id):  # links the model to the run; reopens an ended run...
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=input_example,
                metadata=metadata,
                pip_requirements=requirements,
                signature=signature,
                serialization_format="pickle",
            )  # loads back as our CNN class
        if before.status != "RUNNING":  # ...so a run a background finisher evaluates ends as it had, not now
            self.client.set_terminated(self.run_id, before.status, before.end_time)
        # on the run, so that registering it (a study's champion) needs no search of logged models
        self.client.set_tag(self.run_id, MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    @_timed
    def log_state_dict(self, state: dict, path: str = "checkpoint/model.pt") -> None:
        """A plain tensor checkpoint that loads with `torch.load(weights_only=True)`."""
        import torch

        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / Path(path).name
            torch.save(state, local)
            self.client.log_artifact(self.run_id, str(local), str(Path(path).parent))

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """FINISHED, FAILED (with the reason as a tag and the run's note) or KILLED.

        After the tracking server outlasted MLflow's retries, one try: if it is still away the
        run stays RUNNING (a study's next worker ends it FAILED, see `reconcile_runs`).
        """
        if self.status is not None:
            return
        self.status = status
        if not self.server_gone:  # (else its daemon thread stops by itself on the failing status read)
            stop_system_metrics(self.monitor)
        self.monitor = None
        with last_try(self.server_gone):
            if reason:
                reason = reason.strip().splitlines()[-1] if reason.strip() else reason
                self.set_tags({"error": reason[:5000], "mlflow.note.content": f"{status}: {reason}"[:5000]})
            self._terminate(status)

    @_timed
    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def error_line(e: BaseException) -> str:
    """`Type: last line of the message`: why a run or trial failed, in one line. MLflow giving up
    on its tracking server reads as `server_unreachable`'s line, not the requests error it wraps."""
    if (gone := server_unreachable(e)) is not None:
        return str(gone)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------
# A tracking server that goes away (docs/stopping-and-outages.md)

# MLflow's HTTP retries for an http(s):// tracking URI, where the environment does not set them.
# MLflow retries every call (POSTs and artifact uploads too) on refused or dropped connections,
# timeouts and 408/429/5xx answers: at once, then after 4, 8, ... 64, 120 s, 244 s over 7 retries,
# which outlasts a server restart of a few minutes. Each try may wait 30 s (MLflow: 120) for a
# server that does not answer at all, so such a one costs 8 x 30 + 244 s, about 8 minutes a call
# instead of 20. Pinned, so that another MLflow's defaults change nothing here.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def use_http_retries(uri: str) -> None:
    """`HTTP_RETRIES` for a tracking server; settings already in the environment win."""
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRIES.items():
            os.environ.setdefault(name, value)


def retry_budget() -> tuple[int, float]:
    """(retries, seconds) MLflow spends on a server that refuses connections before it gives up:
    urllib3 retries at once, then sleeps factor * 2**k s (at most 120) before retry k + 1."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    return retries, float(sum(min(120, factor * 2**k) for k in range(1, retries)))


class TrackingServerUnreachable(HarnessError, mlflow.exceptions.MlflowException):
    """MLflow gave up on its tracking server; the message is one line naming it, for people and studies."""


def server_unreachable(e: BaseException, seconds: float | None = None) -> TrackingServerUnreachable | None:
    """`e` as one line if it is MLflow giving up on an HTTP tracking server, else None.

    MLflow wraps the requests error (a multi-line chain) in an MlflowException; this names the
    server, the time and the retries instead. `seconds`: how long the call tried (default: the
    back-off of `retry_budget`).
    """
    from urllib.parse import urlsplit

    import requests

    cause = e
    for _ in range(10):  # down the chain of MlflowExceptions to what requests raised
        if isinstance(cause, TrackingServerUnreachable) or not isinstance(cause, mlflow.exceptions.MlflowException):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, TrackingServerUnreachable):
        return cause
    if not isinstance(
        cause, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    ):
        return None
    url = getattr(cause.request, "url", None) or ""
    if not url and (m := re.search(r"API request to (\S+) failed", str(e))):
        url = m.group(1)
    parts = urlsplit(url)
    server = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}" if parts.netloc else "(unknown address)"
    reason = getattr(cause.args[0], "reason", None) if cause.args else None  # urllib3's MaxRetryError
    text = re.sub(r"^.*Failed to establish a new connection: ", "", str(reason or cause))
    text = " ".join(re.sub(r"\w*Connection(Pool)?\(host=[^)]*\):\s*", "", text).split())
    retries, budget = retry_budget()
    return TrackingServerUnreachable(
        f"tracking server {server} unreachable for "
        f"{budget if seconds is None else seconds:.0f} s "
        f"(MLflow gave up after {retries} retr{'y' if retries == 1 else 'ies'}): {text}"
    )


def probe_server(client: MlflowClient) -> None:
    """One request to the client's tracking server, without retries; raises MLflow's error while it is
    away. Called before each call that follows a server that outlasted the retries, so that the call
    (ending the run) does not wait them out once more. A per-call argument, not the process's
    MLFLOW_HTTP_REQUEST_MAX_RETRIES: other threads (system metrics) keep their retries."""
    from mlflow.utils.rest_utils import http_request

    store = client._tracking_client.store  # (MLflow has no public handle on a client's REST credentials)
    if hasattr(store, "get_host_creds"):  # a tracking server (RestStore)
        http_request(store.get_host_creds(), "/health", "GET", max_retries=0, raise_on_status=True)


@contextmanager
def last_try(active: bool = True):
    """After the server outlasted the retries (`active`): the logger's calls inside try once (`probe_server`),
    and a server still away is let be (what they wanted to write is lost) rather than waited for again."""
    try:
        yield
    except Exception as e:
        if not active or server_unreachable(e) is None:
            raise


def _param_value(v) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
