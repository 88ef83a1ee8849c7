"""Finish study trials in a background process: test set, figures, embeddings and the model.

Once `fit` returns, what remains (`log_evaluation`, exactly what `harness train` does before its
run ends) takes seconds in which the device would sit idle, so a trial leaves a job in a spool
folder beside the tracking store and the worker starts its next trial while this process does the
rest. A job whose worker or finisher died stays for the next finisher; `drain` does any left
before a study's summary. The spool's layout and why: docs/studies.md, "Trials spend their time
training".
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from harness import config as C
from harness.tracking import RunLogger, artifact_root, client_for, error_line, tracking_uri

POLL_SECONDS = 0.2


def spool_dir(uri: str | None) -> Path:
    """Beside the store for a local SQLite store; ./mlruns/pending for a tracking server."""
    root = artifact_root(tracking_uri(uri))
    return Path(root or "mlruns") / "pending"


def write_job(spool: Path, run: RunLogger, cfg: C.Config, model: torch.nn.Module, uri: str) -> Path:
    """The job as a folder renamed into place, so a finisher never sees half of one."""
    spool.mkdir(parents=True, exist_ok=True)
    tmp = spool / f".{run.run_id}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
    device = next(model.parameters()).device
    (tmp / "job.json").write_text(
        json.dumps(
            {
                "run_id": run.run_id,
                "tracking_uri": uri,
                "owner": os.getpid(),
                "device": str(device),
                "config": C.to_dict(cfg),
            }
        )
    )
    final = spool / run.run_id
    os.replace(tmp, final)
    return final


@contextmanager
def _locked(job: Path):
    """Yields whether this process holds the job (non-blocking); the lock dies with its holder."""
    try:
        f = open(job / "lock", "a")
    except OSError:  # the job was finished and removed meanwhile
        yield False
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        yield False
        return
    try:
        yield (job / "job.json").exists()
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class _Cache:
    """The dataset a finisher keeps between jobs (a study's trials share it)."""

    def __init__(self):
        self.datasets: dict = {}

    def dataset(self, cfg: C.Config):
        from harness.data import load_dataset

        key = (cfg.data.dataset, cfg.data.root, cfg.data.label)
        if key not in self.datasets:
            self.datasets = {key: load_dataset(cfg.data)}  # one at a time: they are large
        return self.datasets[key]


def finish_job(job: Path, cache: _Cache) -> None:
    """Evaluate and log one job's run; a failure is recorded on the run, never raised."""
    from harness.data import test_split
    from harness.eval_logging import log_evaluation
    from harness.models import build_model
    from harness.training import select_device

    spec = json.loads((job / "job.json").read_text())
    run = RunLogger(client_for(spec["tracking_uri"]), spec["run_id"])
    start = time.perf_counter()
    try:
        cfg = C.from_dict(spec["config"])
        try:
            device = select_device(spec["device"])
        except C.ConfigError:  # drained where the trial's accelerator is missing
            device = torch.device("cpu")
        ds = cache.dataset(cfg)
        test_x, test_y = test_split(ds, cfg.data, device)
        model = build_model(cfg.model, len(ds.classes))
        model.load_state_dict(torch.load(job / "model.pt", map_location="cpu", weights_only=True))
        model = model.to(device).eval()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        log_evaluation(run, cfg, model, ds, test_x, test_y)
        run.log_metrics({"evaluation_seconds": time.perf_counter() - start})
        run.set_tags({"evaluation": "done"})
    except Exception as e:
        run.set_tags({"evaluation": "failed", "evaluation_error": error_line(e)[:5000]})


def pending(spool: Path, owner: int | None = None) -> list[Path]:
    """The jobs waiting in (or being worked on from) `spool`; with `owner`, only those that process
    submitted, or whose submitter is gone (another live worker's jobs are its finisher's)."""
    if not spool.is_dir():
        return []
    # (a folder without its job.json is none: one that an older version's race left, see `_remove`)
    jobs = sorted(p for p in spool.iterdir() if not p.name.startswith(".") and (p / "job.json").is_file())
    return jobs if owner is None else [job for job in jobs if _owned_by(job, owner)]


def _owned_by(job: Path, owner: int) -> bool:
    try:
        submitter = json.loads((job / "job.json").read_text()).get("owner")
    except (OSError, ValueError):
        return False  # finished and removed meanwhile
    if submitter in (None, owner):
        return True
    try:
        os.kill(submitter, 0)
    except ProcessLookupError:
        return True  # its worker died: whoever comes next does it
    except PermissionError:
        pass
    return False


def finish_pending(spool: Path, cache: _Cache | None = None, owner: int | None = None) -> int:
    """Finish every job in `spool` (see `pending` for `owner`) that no other process holds;
    returns how many."""
    cache = cache or _Cache()
    done = 0
    for job in pending(spool, owner):
        with _locked(job) as mine:
            if not mine:
                continue
            finish_job(job, cache)
            _remove(job)
            done += 1
    return done


def _remove(job: Path) -> None:
    """Out of the spool in one step, then deleted. Deleted in place, a job could outlive its removal:
    a finisher that opened its lock file between the deletion of the old one and of the folder
    created a new one there, and the folder, left with only a lock, held `drain` to its timeout."""
    gone = job.with_name(f".{job.name}.{uuid.uuid4().hex}.done")
    os.replace(job, gone)
    shutil.rmtree(gone, ignore_errors=True)


def drain(uri: str | None, timeout: float = 600.0) -> int:
    """Finish, in this process, whatever jobs are left for this store; waits for jobs other
    finishers hold (up to `timeout`). Before a study's summary, so every trial has its plots."""
    spool = spool_dir(uri)
    cache = _Cache()
    done, deadline = 0, time.time() + timeout
    while pending(spool):
        done += finish_pending(spool, cache)
        if time.time() > deadline:
            break
        time.sleep(POLL_SECONDS)
    return done


def _warm_up(umap: bool) -> None:
    """The one-off costs, paid while the first trial trains: imports, and UMAP's compilation."""
    import warnings

    import mlflow.pytorch  # noqa: F401
    import numpy as np

    import harness.eval_logging  # noqa: F401  (matplotlib, seaborn, scikit-learn)
    from harness.embeddings import project_umap

    if umap:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            project_umap(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), seed=0)


def _serve(uri: str, stop, parent: int, threads: int, umap: bool) -> None:
    """The finisher process: finish jobs as they come until asked to stop and none is left (or
    the worker that started it is gone)."""
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(threads)
    client_for(uri)
    _warm_up(umap)
    spool, cache = spool_dir(uri), _Cache()
    while True:
        # asked to stop, it finishes its own worker's jobs (and orphans), not another live worker's
        if finish_pending(spool, cache, owner=parent if stop.is_set() else None):
            continue
        if stop.is_set() or os.getppid() != parent:
            return
        time.sleep(POLL_SECONDS)


class Finisher:
    """A worker's background finisher process. `submit` a trained run; `close` waits for the rest."""

    def __init__(self, uri: str | None, threads: int = 1, umap: bool = True):
        """`umap`: whether the trials will draw UMAP plots (then its compilation is paid up front)."""
        self.uri = tracking_uri(uri)
        self.spool = spool_dir(self.uri)
        ctx = multiprocessing.get_context("spawn")  # no forked CUDA or thread state
        self._stop = ctx.Event()
        self._process = ctx.Process(
            target=_serve,
            args=(self.uri, self._stop, os.getpid(), threads, umap),
            name="harness-finisher",
            daemon=False,
        )
        self._process.start()

    def submit(self, run: RunLogger, cfg: C.Config, model: torch.nn.Module) -> None:
        write_job(self.spool, run, cfg, model, self.uri)
        run.set_tags({"evaluation": "pending"})

    def close(self, wait: bool = True) -> None:
        """Finish this worker's jobs and stop the finisher. With `wait`, the jobs it has not taken
        are done here (a finisher still starting up is not waited for) and one it holds is waited
        for; without, it stops now (a job it held stays in the spool for the next finisher)."""
        if self._stop is None:  # closed already
            return
        self._stop.set()
        if wait:
            finish_pending(self.spool, owner=os.getpid())
            if pending(self.spool, owner=os.getpid()):
                self._process.join()
        self._process.join(timeout=1)  # an idle finisher sees the stop within POLL_SECONDS
        if self._process.is_alive():  # still starting up (or stopped without waiting)
            self._process.terminate()
            self._process.join()
        # the stop Event's five semaphores are named ones the resource tracker watches: released here,
        # not at interpreter exit, which a process killed after its clean stop never reaches (Slurm
        # sends SIGTERM to every process of a requeued job), else the tracker warns of them as leaked
        self._stop = None
