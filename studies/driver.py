"""Optuna studies whose trials are MLflow runs nested under one study run, from any worker.

Where the stock Optuna + MLflow pairing breaks (see README, "Why not optuna-integration's
MLflowCallback"): it nests through the fluent active run, which lives in one thread of one
process. Here the study's parent run id is stored in the study itself (Optuna user attrs), and
every worker, in any process on any machine, creates its trial runs with `MlflowClient` and
that parent id. The trial stores its run id and the run its trial number.

Failure handling: heartbeats (RDB storage) mark a killed worker's trial FAIL and a callback
re-queues it; the orphaned MLflow run is ended FAILED when a worker next starts. Ctrl-C ends
the trial FAIL and its run KILLED; a trial that raises is FAIL with its reason on both sides.
"""
from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import re
import sqlite3
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from harness.errors import HarnessError
from harness import config as C
from harness.data import Dataset, load_dataset
from harness.interrupts import exit_code, stop_cleanly
from harness.experiment import train_run
from harness.models import count_parameters
from harness.tracking import (RunLogger, client_for, error_line, experiment_id, last_try, server_unreachable,
                              tracking_uri)
from studies import library
from studies.space import Space, load_space, profile_settings, sample, starting_point

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "nsga2")
PRUNERS = ("hyperband", "median", "none")
OBJECTIVES = ("accuracy", "accuracy,params", "accuracy,latency")
MAX_CONSECUTIVE_FAILURES = 3

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# a trial stopped or lost (SIGTERM, Ctrl-C, a dead worker) goes back in the queue, up to 3 times,
# with its parameters and its last run id: the retry resumes from that run's checkpoint
requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)


class StudyError(HarnessError, RuntimeError):
    """A study that cannot start or go on; the message is one line naming the fix."""


class SurplusTrial(Exception):
    """A trial started after the study reached its target (two workers asked at once): given up."""


class _QuietTrials(logging.Filter):
    """Optuna logs every failed trial with its traceback; a given-up surplus trial is no failure,
    and a stopped one (Ctrl-C, SIGTERM) is said once, in one line, by the command."""
    numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        m = re.match(r"Trial (\d+) failed", str(record.msg))
        if m and record.exc_info and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.numbers.add(int(m.group(1)))
        return not (m and int(m.group(1)) in self.numbers)


logging.getLogger("optuna.study._optimize").addFilter(_QuietTrials())


@dataclass
class TuneOptions:
    study: str
    space: str = "cnn"
    trials: int = 20  # the study's target: complete + pruned trials (run again to resume)
    timeout: float | None = None  # seconds for this worker
    storage: str | None = None
    sampler: str = "tpe"
    pruner: str = "hyperband"
    seed: int = 0
    objectives: str = "accuracy"
    profile: str = "auto"  # quick (CPU) | full (GPU) | auto
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    data_dir: str | None = None
    tracking_uri: str | None = None
    workers: int = 1  # worker processes on this machine
    heartbeat: int = 30  # seconds between trial heartbeats; a trial silent for 3x is failed
    progress: bool = True
    device: str | None = None  # this worker's device, over the config's (`--workers` spreads them over GPUs)


def storage_url(url: str | None) -> str:
    url = url or os.environ.get("HARNESS_STORAGE") or DEFAULT_STORAGE
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver we install is psycopg2
        try:
            import psycopg  # noqa: F401
        except ImportError:
            url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        else:
            url = "postgresql://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with _init_lock(url), sqlite3.connect(path, timeout=60) as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (persists in the file)
    return url


@contextmanager
def _init_lock(url: str):
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
    with _init_lock(tracking_uri(uri)):
        client = client_for(uri)
        client.search_experiments(max_results=1)  # the store exists and is migrated from here on
    return client


def open_storage(opts: TuneOptions) -> optuna.storages.RDBStorage:
    url = storage_url(opts.storage)  # (an SQLite file in WAL mode)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with _init_lock(url):
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=opts.heartbeat, grace_period=3 * opts.heartbeat,
                    heartbeat_stale_trial_callback=requeue)
        except Exception as e:
            # a database server's fresh schema created by two machines at once: the loser retries
            concurrent = any(w in str(e) for w in ("already exists", "duplicate key", "UniqueViolation"))
            if concurrent and attempt < 4:
                time.sleep(0.5 + attempt)
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise StudyError(f"cannot open study storage {_redact(url)} ({type(e).__name__}: {first}): "
                             "check the --storage URL and that the database server is running") from None


class TrialSeeded(optuna.samplers.BaseSampler):
    """Samples each trial with a fresh sampler seeded from (study seed, trial number).

    Seeded once per process, the workers of a study (all given the same --seed) draw the same
    values in lockstep, and a resumed study draws its first values again. The storage hands out
    trial numbers atomically, so here every trial has a stream of its own, and one worker's study
    still samples the same way every time. For samplers whose only state is their RNG (TPE,
    random, NSGA-II: they read the history from the study); QMC is indexed by trial already.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study, trial) -> None:
        self._inner = self._make(int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)


def make_sampler(name: str, seed: int, multi: bool) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return TrialSeeded(lambda s: optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True,
                                                                seed=s), seed)
    if name == "random":
        return TrialSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if name == "cmaes":  # its state (and RNG) lives in the study's trials
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return TrialSeeded(lambda s: optuna.samplers.NSGAIISampler(seed=s), seed)


def make_pruner(name: str, epochs: int, multi: bool) -> optuna.pruners.BasePruner:
    if multi or name == "none":  # Optuna's pruners only apply to single-objective studies
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2), reduction_factor=3)


def base_config(opts: TuneOptions, space: Space) -> C.Config:
    """Defaults < --config (or the space's config) < the space's profile < --set: what every trial shares."""
    path = library.config_path(opts.config or space.config)
    cfg = C.load(path, None, opts.data_dir, opts.profile)
    profile = C.pick_profile(opts.profile, opts.device or cfg.device)
    d = C.to_dict(cfg)
    if space.profiles:
        d = C.merge(d, profile_settings(space, profile))
    if opts.overrides:
        d = C.merge(d, C.parse_overrides(opts.overrides))
    if opts.device:
        d["device"] = opts.device
    d["name"] = opts.study
    return C.from_dict(d)


def _comparable(cfg_dict: dict) -> dict:
    """The parts of a base config that must agree between workers (not paths, devices, or how a
    worker runs and watches its trials)."""
    d = C.flatten(cfg_dict)
    for key in ("data.root", "device", "compile", "checkpoint_every", "eval.system_metrics"):
        d.pop(key, None)
    return d


def directions(objectives: str) -> list[str]:
    if objectives not in OBJECTIVES:
        raise StudyError(f"bad --objectives {objectives!r}: choose one of {', '.join(OBJECTIVES)}")
    return ["maximize"] + (["minimize"] if "," in objectives else [])


def open_study(opts: TuneOptions, storage, base: C.Config, client=None,
               first_trial: dict | None = None) -> tuple[optuna.Study, str]:
    """Create or join the study; exactly one study run exists for it, whoever starts first.

    Creating the Optuna study is the atomic step: the worker that creates it also creates the
    MLflow experiment and study run and stores the run id in the study; others wait for it.
    `client` None: the creator opens the MLflow store only then, so that concurrent workers
    never create a fresh store at the same time. A new study's first trial is `first_trial`
    (the base config's own values, where the space allows them).
    """
    dirs = directions(opts.objectives)
    multi = len(dirs) > 1
    sampler = make_sampler(opts.sampler, opts.seed, multi)
    pruner = make_pruner(opts.pruner, base.epochs, multi)
    try:
        study = optuna.create_study(study_name=opts.study, storage=storage, directions=dirs,
                                    sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=opts.study, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    if [d.name.lower() for d in study.directions] != dirs:
        raise StudyError(f"study {opts.study} was created with other objectives "
                         f"({study.user_attrs.get('objectives')}): use the same --objectives or a new --study name")
    if created:
        client = client or open_client(opts.tracking_uri)
        experiment_id(client, opts.study, description=study_description(opts.study))
        run = RunLogger.start(client, opts.study, f"study-{opts.study}",
                              tags={"study": opts.study, "run_kind": "study", "sampler": opts.sampler,
                                    "pruner": opts.pruner, "objectives": opts.objectives,
                                    "storage": _redact(storage.url if hasattr(storage, "url") else str(storage))})
        run.log_params({"space": opts.space, "trials": opts.trials, "sampler": opts.sampler,
                        "pruner": opts.pruner, "seed": opts.seed, "objectives": opts.objectives})
        run.log_text(C.to_yaml(base), "base_config.yaml")
        study.set_user_attr("base_config", _comparable(C.to_dict(base)))
        study.set_user_attr("space", opts.space)
        study.set_user_attr("objectives", opts.objectives)
        study.set_user_attr("mlflow_experiment", opts.study)
        if first_trial:
            study.enqueue_trial(first_trial, user_attrs={"first_trial": "the base config"})
        study.set_user_attr("mlflow_parent_run_id", run.run_id)
        return study, run.run_id
    parent = _wait_for_parent(study)
    stored, ours = study.user_attrs.get("base_config") or {}, _comparable(C.to_dict(base))
    diff = [k for k in stored if k in ours and stored[k] != ours[k]]  # (keys newer than the study: defaults)
    if diff:
        raise StudyError(f"study {opts.study} was started with other fixed settings ({', '.join(diff[:5])}): "
                         "run it with the same --profile/--set/--config, or use a new --study name")
    return study, parent


def study_description(name: str) -> str:
    """The study experiment's description in the MLflow UI: what it holds and how to browse it."""
    return "\n".join([  # one line a paragraph: the UI renders every newline as a break
        f"**Optuna study `{name}`** (`harness tune --study {name}`): one study run, `study-{name}`, and one run "
        "per trial, `trial-<n>`, nested under it.",
        "",
        f"- **Trials**: in the Runs table, expand `study-{name}` (+) to list them. Each is tagged `trial_number` "
        "and `trial_state` (COMPLETE, PRUNED, FAIL) and holds the trial's parameters, per-epoch curves, test "
        "metrics and figures; a pruned trial keeps its curves up to the pruning epoch.",
        "- **Summary**: on the study run. Artifacts `summary/`: optimization history, parameter importances, "
        "parallel coordinates and slice plots (PNG and interactive HTML; the Pareto front for two objectives) "
        "and `trials.csv`; tags `best_trial` and `best_run_id` name the best trial and its run.",
        f"- **Command line**: `harness compare --study {name}` (a table of the trials), `harness best --study "
        f"{name}` (the best trial, its parameters and run), `harness report --study {name}` (refresh the "
        f"summary), `harness ui --study {name}` (this page).",
    ]) + "\n"


def _wait_for_parent(study: optuna.Study, timeout: float = 120.0) -> str:
    deadline = time.time() + timeout
    while True:
        attrs = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs
        if "mlflow_parent_run_id" in attrs:
            return attrs["mlflow_parent_run_id"]
        if time.time() > deadline:
            raise StudyError(f"study {study.study_name} has no MLflow study run after {timeout:.0f} s: the worker "
                             "that created it died while starting; delete the study (optuna delete-study) and retry")
        time.sleep(0.5)


def _redact(url: str) -> str:
    """Never log a database password."""
    import re
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def reconcile_runs(study: optuna.Study, client) -> int:
    """End FAILED the runs of trials whose worker died: the trial is no longer RUNNING, its run is.

    First fails the trials whose heartbeat stopped (the retry callback re-queues them).
    """
    optuna.storages.fail_stale_trials(study)
    exp = client.get_experiment_by_name(study.user_attrs.get("mlflow_experiment", study.study_name))
    if exp is None:
        return 0
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    reasons = {t.number: t.user_attrs.get("fail_reason") for t in study.get_trials(deepcopy=False)}
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and tags.run_kind = 'trial'",
                                 max_results=1000)
    ended = 0
    for run in running:
        number = int(run.data.tags.get("trial_number", -1))
        if states.get(number, TrialState.RUNNING) != TrialState.RUNNING:
            logger = RunLogger(client, run.info.run_id)
            logger.set_tags({"trial_state": states[number].name})
            # a trial with a reason failed while its tracking server was away: its run could not be ended then
            logger.end("FAILED", reasons.get(number) or "the worker stopped during this trial (its heartbeat was "
                                                        "lost); Optuna marked the trial FAIL and re-queued it")
            ended += 1
    return ended


def remaining(study: optuna.Study, target: int) -> int:
    """Trials still to start: the target less those complete, pruned or running (fails don't count)."""
    taken = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return target - sum(t.state in taken for t in study.get_trials(deepcopy=False))


def is_surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """Whether `trial` is beyond the study's target.

    Checking `remaining` and then asking for a trial is not atomic: two workers can both see one
    trial left and both start one. Trial numbers are given out atomically by the storage, so the
    rule is: a trial goes ahead only while fewer than `target` trials numbered below it are
    complete, pruned, running or waiting (a waiting one is re-queued and will run). At most
    `target` trials ever go ahead, and one that fails leaves its place to the next.
    """
    taken = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    before = sum(t.number < trial.number and t.state in taken for t in study.get_trials(deepcopy=False))
    return before >= target


@dataclass
class Worker:
    """One worker's trial loop; `objective` is what Optuna calls."""
    opts: TuneOptions
    space: Space
    base: C.Config
    study: optuna.Study
    parent_run_id: str
    client: object
    dataset: Dataset | None = None
    finisher: object = None  # harness.finisher.Finisher: evaluates finished trials in the background
    trial_id: int | None = None  # the trial in progress (to re-queue it when stopped)

    def objective(self, trial: optuna.Trial):
        if is_surplus(self.study, trial, self.opts.trials):
            _QuietTrials.numbers.add(trial.number)
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", f"surplus: the study reached its {self.opts.trials} trials "
                                               "while this worker was starting one; given up without a run")
            raise SurplusTrial(f"study {self.opts.study} already has its {self.opts.trials} trials")
        try:  # before the run exists: a failure here (the tracking server away too) leaves no run behind
            cfg = sample(self.space, trial, self.base)
            if self.dataset is None or self.dataset.name != cfg.data.dataset:
                self.dataset = load_dataset(cfg.data)
            tags = {"study": self.opts.study, "run_kind": "trial", "trial_number": trial.number,
                    "trial_state": "RUNNING"}
            retry_of = trial.user_attrs.get("mlflow_run_id")  # a re-queued trial inherits the dead one's attrs
            if retry_of:
                tags["retry_of_run"] = retry_of
            run = RunLogger.start(self.client, self.study.user_attrs.get("mlflow_experiment", self.opts.study),
                                  f"trial-{trial.number}", tags=tags, parent_run_id=self.parent_run_id)
        except BaseException as e:
            trial.set_user_attr("fail_reason", error_line(e)[:1000])
            raise
        multi = len(self.study.directions) > 1

        def report(m):
            if multi:  # Optuna takes intermediate values (and prunes) in single-objective studies only
                return
            trial.report(m.val_accuracy, m.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch} (val accuracy {m.val_accuracy:.4f})")

        run.finished_by = (optuna.TrialPruned,)
        try:
            with run:  # however the trial ends, so does its run (train_run ends it first once it runs)
                trial.set_user_attr("mlflow_run_id", run.run_id)
                self.trial_id = trial._trial_id
                from studies.dashboard import note_run_link  # here: the CLI does not load it at start-up
                note_run_link(trial, run)  # the trial's optuna-dashboard note links its run; never fails it
                result = train_run(cfg, run, self.dataset, callbacks=[report], progress=self.opts.progress,
                                   ok_exceptions=(optuna.TrialPruned,), finisher=self.finisher, resume_from=retry_of)
        except optuna.TrialPruned:
            run.set_tags({"trial_state": "PRUNED"})
            raise
        except BaseException as e:
            trial.set_user_attr("fail_reason", error_line(e)[:1000])
            with last_try(run.server_gone):  # its server away past the retries: the run stays RUNNING
                run.set_tags({"trial_state": "FAIL"})
            raise
        run.set_tags({"trial_state": "COMPLETE"})
        values = [result.fit.best_val_accuracy]
        if self.opts.objectives == "accuracy,params":
            values.append(float(count_parameters(result.model)))
        elif self.opts.objectives == "accuracy,latency":
            latency = measure_latency(result.model)
            run.log_metrics({"latency_ms": latency})
            values.append(latency)
        return values if multi else values[0]

    def run(self) -> None:
        from studies.report import update_study_run  # (report imports this module)

        self.client.update_run(self.parent_run_id, status="RUNNING")
        start = time.time()
        failures = 0
        last: dict = {}
        while True:
            # a worker that died (here or anywhere) has its trial failed and re-queued, its run ended
            reconcile_runs(self.study, self.client)
            if remaining(self.study, self.opts.trials) <= 0:
                break
            if self.opts.timeout and time.time() - start >= self.opts.timeout:
                break
            self.trial_id = None
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True,
                                    callbacks=[lambda s, t: last.update(trial=t)])
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is FAIL; queue it again to resume
                if self.trial_id is not None:
                    requeue(self.study, self.study._storage.get_trial(self.trial_id))
                raise
            update_study_run(self.study, self.client, self.parent_run_id)  # the study run's row, live
            trial = last["trial"]
            if trial.user_attrs.get("surplus"):
                _QuietTrials.numbers.discard(trial.number)
                break
            failures = failures + 1 if trial.state == TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                reason = trial.user_attrs.get("fail_reason", "see the trial runs")
                raise StudyError(f"{failures} trials in a row failed, the last with {reason}: "
                                 "fix the cause and run the same command to resume")


def measure_latency(model, batch: int = 1, repeats: int = 20) -> float:
    """Milliseconds per image for a single-image forward pass on the CPU (the deployment case)."""
    import torch

    model = model.cpu().eval()
    x = torch.zeros(batch, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats / batch * 1000


STOP_SECONDS = 30  # how long stopped workers get to end their runs before they are killed


def _forward(signum: int, procs) -> None:
    for p in procs:
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signum)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_device(index: int, device: str, gpus: int) -> str | None:
    """Worker `index`'s device: with G GPUs and the config's device `auto` or `cuda`, cuda:(index
    mod G), so workers spread over the GPUs (several to a GPU when there are more workers);
    otherwise None: the config's own device."""
    if gpus > 0 and device in ("auto", "cuda"):
        return f"cuda:{index % gpus}"
    return None


def _worker_process(opts: TuneOptions, threads: int) -> None:
    """A `--workers` process: stopped by the signals its parent forwards, then exits quietly."""
    import sys

    import torch

    stop_cleanly()
    torch.set_num_threads(threads)
    try:
        run_worker(opts)
    except KeyboardInterrupt as e:
        sys.exit(exit_code(e))


def prepare(opts: TuneOptions) -> tuple[Space, C.Config, optuna.Study, str, object]:
    """The space (less the --set keys), the trials' base config, the study, its run and the client."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    space = load_space(opts.space)
    fixed = set(C.flatten(C.parse_overrides(opts.overrides))) if opts.overrides else set()
    space = space.without(fixed)
    base = base_config(opts, space)
    storage = open_storage(opts)
    # creates the MLflow store if this worker is first
    study, parent = open_study(opts, storage, base, first_trial=starting_point(space, base))
    return space, base, study, parent, open_client(opts.tracking_uri)


def run_worker(opts: TuneOptions) -> Worker:
    from harness.finisher import Finisher

    space, base, study, parent, client = prepare(opts)
    worker = Worker(opts, space, base, study, parent, client,
                    finisher=Finisher(opts.tracking_uri, umap=base.eval.umap and base.eval.embedding_samples != 0))
    gone, stopped = None, False
    try:
        worker.run()
    except KeyboardInterrupt:
        worker.finisher.close(wait=False)  # stop at once: its jobs stay in the spool for the next finisher
        stopped = True
        raise
    except Exception as e:  # the tracking server outlasted the retries again, after a trial failed on it
        if (gone := server_unreachable(e)) is None:
            raise
        raise StudyError(f"{gone}; runs it could not end stay RUNNING until a worker reaches it again: "
                         "run the same command to resume once it answers") from None
    finally:
        worker.finisher.close()  # its last trials' evaluations (a killed finisher leaves them in the spool)
        if gone is None:  # the study run can't be ended while its server is away
            _maybe_finish_parent(study, client, parent, "KILLED" if stopped else "FINISHED")
    return worker


def _maybe_finish_parent(study: optuna.Study, client, parent: str, status: str = "FINISHED") -> None:
    """The study run ends with the last worker: when no trial is running any more."""
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(parent, status)


def tune(opts: TuneOptions) -> optuna.Study:
    """Run the study with `opts.workers` processes here, then refresh its summary."""
    from harness.finisher import drain
    from studies.report import write_summary

    load_space(opts.space)  # a bad space fails here, before any worker or trial starts
    directions(opts.objectives)
    if opts.workers <= 1:
        worker = run_worker(opts)
        study, client, parent = worker.study, worker.client, worker.parent_run_id
    else:
        # the study, its run and both stores exist before any worker starts: they only join
        _, base, study, parent, client = prepare(opts)
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // opts.workers)
        gpus = gpu_count()
        procs = [ctx.Process(target=_worker_process, args=(
                     replace(opts, progress=False, device=worker_device(i, base.device, gpus)), threads))
                 for i in range(opts.workers)]
        restore = stop_cleanly(on_signal=lambda signum: _forward(signum, procs))
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        except KeyboardInterrupt:  # forwarded: each worker ends its run KILLED and re-queues its trial
            for p in procs:
                p.join(timeout=STOP_SECONDS)
                if p.is_alive():
                    p.kill()
            raise
        finally:
            restore()
        if any(p.exitcode != 0 for p in procs):
            raise StudyError(f"{sum(p.exitcode != 0 for p in procs)} of {opts.workers} workers failed: "
                             "see their output above; run the same command to resume")
    drain(opts.tracking_uri)  # evaluations a killed worker or finisher left behind
    write_summary(study, client, parent)
    return study


def load(study_name: str, storage: str | None = None) -> optuna.Study:
    url = storage_url(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(url)]
        raise StudyError(f"study {study_name!r} not found in {_redact(url)}; studies there: "
                         f"{', '.join(names) or 'none'} (pass --storage if it lives elsewhere)") from None


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best trial; for two objectives, the most accurate one on the Pareto front."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        raise StudyError(f"study {study.study_name} has no complete trial yet: run `harness tune` first")
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


def best_run_id(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> str:
    trial = best_trial(load(study_name, storage))
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise StudyError(f"best trial {trial.number} of study {study_name} has no MLflow run id")
    return run_id
