"""Opening a study: its storage, sampler and pruner, the trials' base config, and its study run.

Where the stock Optuna + MLflow pairing breaks (docs/architecture.md, "Why not optuna-integration's
MLflowCallback"): it nests through the fluent active run, which lives in one thread of one
process. Here the study's parent run id is stored in the study itself (Optuna user attrs), so
every worker, in any process on any machine, finds the one study run and nests its trial runs
under it (studies/worker.py).
"""

from __future__ import annotations

import copy
import os
import sqlite3
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import optuna

from harness import config as C
from harness.recipes import config_path
from harness.studies import journal
from harness.studies.options import DEFAULT_STORAGE, StudyError, TuneOptions, directions
from harness.studies.slurm import slurm_tags
from harness.studies.space import Space, check_stages, load_space, profile_settings, starting_point
from harness.tags import MLFLOW_EXPERIMENT, MLFLOW_PARENT_RUN_ID, RUN_KIND
from harness.tracking import RunLogger, experiment_id, open_client, redact, store_lock


def quiet_experimental() -> None:
    """No ExperimentalWarning from the Optuna features a study uses (heartbeats, retries, TPE's options):
    installed when a study opens, not on import; the same filter twice is one (warnings dedupes)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


MAX_RETRY = 3  # retries of a stopped or lost trial


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial stopped or lost (SIGTERM, Ctrl-C, a dead worker) goes back in the queue, up to 3 times,
    with its parameters and its last run id: the retry resumes from that run's checkpoint. Once: a
    trial some retry already replaces is left as it is."""
    quiet_experimental()
    if any(
        (t.system_attrs.get("retry_history") or [None])[-1] == trial.number for t in study.get_trials(deepcopy=False)
    ):
        return
    # a copy: Optuna appends to the trial's own `retry_history` list, which a journal storage (no copy
    # in its in-memory trials) would then show changed on the lost trial and on every retry sharing it
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, copy.deepcopy(trial))


def storage_url(url: str | None) -> str:
    """The storage URL as given, or from $HARNESS_STORAGE, or the default; creates nothing."""
    url = url or os.environ.get("HARNESS_STORAGE") or DEFAULT_STORAGE
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver we install is psycopg2
        try:
            import psycopg  # noqa: F401
        except ImportError:
            url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        else:
            url = "postgresql://" + url.split("://", 1)[1]
    return url


def writable_storage(url: str | None) -> str:
    """`storage_url`, its SQLite file (and folder) created in WAL mode: for the commands that write. A
    journal's folder must exist already (on the shared filesystem: a typo must not make a local one)."""
    url = storage_url(url)
    if journal.journal_path(url) is not None:
        journal.check_writable(url)
    elif url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with store_lock(url), sqlite3.connect(path, timeout=60) as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (persists in the file)
    return url


def existing_storage(url: str | None, study: str) -> str:
    """`storage_url` for the commands that only read: a missing SQLite or journal file is one line, not created."""
    url = storage_url(url)
    path = journal.journal_path(url)
    if path is None and url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
    if path is not None and not path.is_file():
        raise StudyError(f"no study storage at {path}: run `harness tune --study {study}` first, or pass --storage")
    return url


def storage_for(url: str):
    """What Optuna's functions take for a storage URL: the URL itself, or the journal file's storage."""
    return journal.read_journal(url) if journal.journal_path(url) is not None else url


def open_storage(opts: TuneOptions) -> optuna.storages.BaseStorage:
    """The storage the workers write to, with heartbeats (a stale trial is failed and re-queued)."""
    url = writable_storage(opts.storage)  # (an SQLite file in WAL mode)
    if journal.journal_path(url) is not None:
        return journal.open_journal(url, opts.heartbeat, requeue)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with store_lock(url):
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=opts.heartbeat,
                    grace_period=3 * opts.heartbeat,
                    heartbeat_stale_trial_callback=requeue,
                )
        except Exception as e:
            # a database server's fresh schema created by two machines at once: the loser retries
            concurrent = any(w in str(e) for w in ("already exists", "duplicate key", "UniqueViolation"))
            if concurrent and attempt < 4:
                time.sleep(0.5 + attempt)
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise StudyError(
                f"cannot open study storage {redact(url)} ({type(e).__name__}: {first}): "
                "check the --storage URL and that the database server is running"
            ) from None


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


def _seeded(make: Callable[[int], optuna.samplers.BaseSampler]) -> Callable[[int], optuna.samplers.BaseSampler]:
    """A sampler whose only state is its RNG, seeded per trial (`TrialSeeded`)."""
    return lambda seed: TrialSeeded(make, seed)


# name -> sampler from a seed; the names (studies/options.py SAMPLERS) feed the command line
SAMPLER_FACTORIES: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": _seeded(lambda s: optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=s)),
    "random": _seeded(lambda s: optuna.samplers.RandomSampler(seed=s)),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),  # indexed by trial already
    # its state (and RNG) lives in the study's trials
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "nsga2": _seeded(lambda s: optuna.samplers.NSGAIISampler(seed=s)),
}
# name -> pruner from the trials' epochs; the names: studies/options.py PRUNERS
PRUNER_FACTORIES: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "hyperband": lambda epochs: optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=max(epochs, 2), reduction_factor=3
    ),
    "median": lambda epochs: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    "none": lambda epochs: optuna.pruners.NopPruner(),
}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    return C.pick(SAMPLER_FACTORIES, "sampler", name)(seed)


def make_pruner(name: str, epochs: int, multi: bool) -> optuna.pruners.BasePruner:
    make = C.pick(PRUNER_FACTORIES, "pruner", name)
    if multi:  # Optuna's pruners only apply to single-objective studies
        return optuna.pruners.NopPruner()
    return make(epochs)


def base_config(opts: TuneOptions, space: Space) -> C.Config:
    """Defaults < --config (or the space's config) < the space's profile < --set: what every trial shares."""
    path = config_path(opts.config or space.config)
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


def space_definition(space: Space) -> dict:
    """What a space samples, parameter by parameter: what a study's trials must keep sampling."""
    return {p.name: {k: v for k, v in asdict(p).items() if k != "name"} for p in space.params}


def _check_space(study: optuna.Study, name: str, defined: dict | None) -> None:
    """Refuse a study joined with another search space, before any trial: Optuna would fail its trials
    ("does not support dynamic value space"). By the parameters stored with the study, else by name."""
    attrs = study.user_attrs
    made_with = attrs.get("space")
    if defined is not None and "space_params" in attrs:
        differ = sorted(k for k in {*attrs["space_params"], *defined} if attrs["space_params"].get(k) != defined.get(k))
        how = f"which defines other parameters ({', '.join(differ[:5])})"
    else:
        differ = made_with is not None and made_with != name
        how = "(compared by name: the study stores no parameters)"
    if differ:
        raise StudyError(
            f"study {study.study_name} was made with search space {made_with!r} {how}: "
            f"run it with --space {made_with}, or use a new --study name for --space {name}"
        )


def create_or_join(name: str, storage, directions: list[str], sampler, pruner) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it: creating is the atomic step that decides who
    sets a new study up (its run, its queued trials) when several workers start at once."""
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=directions, sampler=sampler, pruner=pruner
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False


def open_study(
    opts: TuneOptions, storage, base: C.Config, client=None, first_trial: dict | None = None, space: Space | None = None
) -> tuple[optuna.Study, str]:
    """Create or join the study; exactly one study run exists for it, whoever starts first.

    Creating the Optuna study is the atomic step: the worker that creates it also creates the
    MLflow experiment and study run and stores the run id in the study; others wait for it.
    `client` None: the creator opens the MLflow store only then, so that concurrent workers
    never create a fresh store at the same time. A new study's first trial is `first_trial`
    (the base config's own values, where the space allows them). `space`: the whole space as
    loaded, stored with a new study and compared with a joined one's.
    """
    dirs = directions(opts.objectives)
    sampler = make_sampler(opts.sampler, opts.seed)
    pruner = make_pruner(opts.pruner, base.epochs, len(dirs) > 1)
    study, created = create_or_join(opts.study, storage, dirs, sampler, pruner)
    if [d.name.lower() for d in study.directions] != dirs:
        raise StudyError(
            f"study {opts.study} was created with other objectives "
            f"({study.user_attrs.get('objectives')}): use the same --objectives or a new --study name"
        )
    if created:
        return study, start_study_run(
            opts, storage, base, study, client or open_client(opts.tracking_uri), first_trial, space
        )
    parent = _wait_for_parent(study)
    _check_space(study, opts.space, space_definition(space) if space is not None else None)
    stored, ours = study.user_attrs.get("base_config") or {}, _comparable(C.to_dict(base))
    diff = [k for k in stored if k in ours and stored[k] != ours[k]]  # (keys newer than the study: defaults)
    if diff:
        raise StudyError(
            f"study {opts.study} was started with other fixed settings ({', '.join(diff[:5])}): "
            "run it with the same --profile/--set/--config, or use a new --study name"
        )
    return study, parent


def start_study_run(
    opts: TuneOptions, storage, base: C.Config, study: optuna.Study, client, first_trial: dict | None, space
) -> str:
    """A new study's MLflow experiment and study run, and what the study keeps to be joined and resumed
    as it was (its base config, space, objectives, first trial); the run's id is stored last, the
    sign for waiting workers that the study is ready."""
    experiment_id(client, opts.study, description=study_description(opts.study))
    run = RunLogger.start(
        client,
        opts.study,
        f"study-{opts.study}",
        tags={
            "study": opts.study,
            RUN_KIND: "study",
            "sampler": opts.sampler,
            "pruner": opts.pruner,
            "objectives": opts.objectives,
            "storage": redact(storage.url if hasattr(storage, "url") else str(storage)),
            **slurm_tags(),
        },
    )
    run.log_params(
        {
            "space": opts.space,
            "trials": opts.trials,
            "sampler": opts.sampler,
            "pruner": opts.pruner,
            "seed": opts.seed,
            "objectives": opts.objectives,
        }
    )
    run.log_text(C.to_yaml(base), "base_config.yaml")
    study.set_user_attr("base_config", _comparable(C.to_dict(base)))
    study.set_user_attr("space", opts.space)
    if space is not None:
        study.set_user_attr("space_params", space_definition(space))
    study.set_user_attr("objectives", opts.objectives)
    study.set_user_attr(MLFLOW_EXPERIMENT, opts.study)
    if first_trial:
        study.enqueue_trial(first_trial, user_attrs={"first_trial": "the base config"})
    study.set_user_attr(MLFLOW_PARENT_RUN_ID, run.run_id)
    return run.run_id


def study_description(name: str) -> str:
    """The study experiment's description in the MLflow UI: what it holds and how to browse it."""
    return (
        "\n".join(
            [  # one line a paragraph: the UI renders every newline as a break
                f"**Optuna study `{name}`** (`harness tune --study {name}`): one study run, `study-{name}`, and one "
                "run "
                "per trial, `trial-<n>`, nested under it.",
                "",
                f"- **Trials**: in the Runs table, expand `study-{name}` (+) to list them. Each is tagged "
                "`trial_number` "
                "and `trial_state` (COMPLETE, PRUNED, FAIL) and holds the trial's parameters, per-epoch curves, test "
                "metrics and figures; a pruned trial keeps its curves up to the pruning epoch.",
                "- **Summary**: on the study run. Artifacts `summary/`: optimization history, parameter importances, "
                "parallel coordinates and slice plots (PNG and interactive HTML; the Pareto front for two objectives) "
                "and `trials.csv`; tags `best_trial` and `best_run_id` name the best trial and its run.",
                f"- **Command line**: `harness compare --study {name}` (a table of the trials), `harness best --study "
                f"{name}` (the best trial, its parameters and run), `harness report --study {name}` (refresh the "
                f"summary), `harness ui --study {name}` (this page).",
            ]
        )
        + "\n"
    )


def _wait_for_parent(study: optuna.Study, timeout: float = 120.0) -> str:
    deadline = time.time() + timeout
    while True:
        attrs = study.user_attrs  # (read from the storage each time, not cached)
        if MLFLOW_PARENT_RUN_ID in attrs:
            return attrs[MLFLOW_PARENT_RUN_ID]
        if time.time() > deadline:
            raise StudyError(
                f"study {study.study_name} has no MLflow study run after {timeout:.0f} s: the worker "
                "that created it died while starting; delete the study (optuna delete-study) and retry"
            )
        time.sleep(0.5)


def prepare(opts: TuneOptions) -> tuple[Space, C.Config, optuna.Study, str, object]:
    """The space (less the --set keys), the trials' base config, the study, its run and the client."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    quiet_experimental()
    whole = load_space(opts.space)
    fixed = set(C.flatten(C.parse_overrides(opts.overrides))) if opts.overrides else set()
    space = whole.without(fixed)
    base = base_config(opts, space)
    check_stages(space, base.model.widths)
    storage = open_storage(opts)
    # creates the MLflow store if this worker is first
    study, parent = open_study(opts, storage, base, first_trial=starting_point(space, base), space=whole)
    return space, base, study, parent, open_client(opts.tracking_uri)
