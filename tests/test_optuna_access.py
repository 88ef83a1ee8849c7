"""studies/optuna_access.py, every function, on real SQLite and journal storages: the one test to read
after an Optuna upgrade. A failure names the function whose Optuna internal changed.

A second storage on the same file stands for another worker; a grace period of -1 s makes every beat
stale at once (and one of an hour, none), so no test waits out a grace period.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import optuna
import pytest
from helpers import wait_until
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from harness.studies import optuna_access as access
from harness.studies.reconcile import silent_trials
from harness.studies.study import requeue

X = {"x": optuna.distributions.FloatDistribution(0, 1)}


@contextmanager
def relies_on(function: str):
    """Whatever breaks inside is Optuna having changed what `function` reads: say so first."""
    try:
        yield
    except Exception as e:
        pytest.fail(
            f"Optuna {optuna.__version__} changed what studies/optuna_access.py `{function}` relies on "
            f"({type(e).__name__}: {e}); fix it there: its docstring names the internal it reads"
        )


def open_storage(kind: str, tmp_path, grace: int | None = 3):
    """The kind of storage the workers open (heartbeats every second), on the test's one file."""
    if kind == "sqlite":
        storage = RDBStorage(
            f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, heartbeat_stale_trial_callback=requeue
        )
    else:
        backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
        storage = access.HeartbeatJournalStorage(backend, heartbeat_interval=1, heartbeat_stale_trial_callback=requeue)
    storage.grace_period = grace  # (set after: RDBStorage refuses one below 1 s, which stands in for long ago)
    return storage


def plain_storage(kind: str, tmp_path):
    """The same kind without heartbeats (as Optuna opens a URL, or a journal file, by default)."""
    if kind == "sqlite":
        return RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}")
    return JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "plain.journal")))


@pytest.fixture(params=["sqlite", "journal"])
def kind(request):
    return request.param


@pytest.fixture
def study(kind, tmp_path):
    return optuna.create_study(study_name="s", storage=open_storage(kind, tmp_path))


def another_worker(kind, tmp_path, grace: int) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=open_storage(kind, tmp_path, grace))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_ids_and_storage_name_the_trial_and_study_in_the_storage(study):
    trial = study.ask(X)
    with relies_on("study_storage"):
        storage = access.study_storage(study)
        assert isinstance(storage, optuna.storages.BaseStorage)
    with relies_on("study_id"):
        assert access.study_id(study) == storage.get_study_id_from_name("s")
        assert [access.study_id(s) for s in storage.get_all_studies()] == [access.study_id(study)]
    with relies_on("trial_id"):
        frozen = study.trials[0]
        assert access.trial_id(trial) == access.trial_id(frozen)
        assert access.trial_id(trial) == storage.get_trial_id_from_study_id_trial_number(access.study_id(study), 0)
        assert storage.get_trial(access.trial_id(trial)).number == trial.number


def test_heartbeat_settings_are_the_storages(study, kind, tmp_path):
    with relies_on("heartbeat"):
        assert access.heartbeat(study) == access.Heartbeat(interval=1, grace=3, callback=requeue)
        assert access.heartbeat(another_worker(kind, tmp_path, grace=None)).grace == 2  # Optuna's default
        without = optuna.create_study(storage=plain_storage(kind, tmp_path))
        assert access.heartbeat(without) is None and access.stale_trial_ids(without) == []


def test_optimize_beats_for_each_trial_it_runs(study):
    """Optuna's own loop starts the storage's heartbeat thread: on a journal too (HeartbeatJournalStorage)."""
    seen = []

    def objective(trial):
        def beating():
            return access.trial_id(trial) in access.beating_trial_ids(study)

        with relies_on("beating_trial_ids"):
            seen.append(wait_until(beating, "its first beat", timeout=30))
        return trial.suggest_float("x", 0, 1)

    study.optimize(objective, n_trials=2)
    assert seen == [True, True]
    with relies_on("beating_trial_ids"):
        assert access.beating_trial_ids(study) == set()  # finished trials are not RUNNING


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_beats_stopped_is_stale_past_the_grace_period_and_failed_and_requeued(study, kind, tmp_path):
    lost, silent = study.ask(X), study.ask(X)
    with relies_on("HeartbeatJournalStorage.record_heartbeat" if kind == "journal" else "RDBStorage.record_heartbeat"):
        access.study_storage(study).record_heartbeat(access.trial_id(lost))  # then its worker died
    with relies_on("beating_trial_ids"):
        assert access.beating_trial_ids(study) == {access.trial_id(lost)}
        assert [t.number for t in silent_trials(study)] == [silent.number]
    with relies_on("stale_trial_ids"):
        assert access.stale_trial_ids(another_worker(kind, tmp_path, grace=3600)) == []
        later = another_worker(kind, tmp_path, grace=-1)  # (every beat is older than -1 s)
        assert access.stale_trial_ids(later) == [access.trial_id(lost)]
    optuna.storages.fail_stale_trials(later)  # what every worker does before each trial
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].system_attrs["failed_trial"] == lost.number and trials[2].params == trials[0].params
    retry = study.ask()  # its failed trial's beat, copied with its system attrs, is not the retry's
    assert retry.number == 2
    with relies_on("beating_trial_ids"):
        assert sorted(t.number for t in silent_trials(study)) == [silent.number, retry.number]
        assert access.stale_trial_ids(later) == []


def test_a_lost_trial_is_retried_with_its_parameters_at_most_three_times(study):
    """`requeue` (what a stop or a lost heartbeat calls): a retry of the same parameters, then a retry
    of the retry, three in all; the fourth loss ends the lineage."""
    storage = access.study_storage(study)
    trial = study.ask(X)
    for _ in range(4):
        storage.set_trial_state_values(access.trial_id(trial), TrialState.FAIL)
        requeue(study, storage.get_trial(access.trial_id(trial)))
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if not waiting:
            break
        trial = study.ask()
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert {t.params["x"] for t in trials} == {trials[0].params["x"]}
    assert [t.system_attrs.get("retry_history", []) for t in trials] == [[], [0], [0, 1], [0, 1, 2]]


def test_a_journal_opened_to_read_tells_the_beating_trials_and_does_not_beat(tmp_path):
    """What the reading commands (and benchmarks/chaos.py's checks) open: the workers' beats, none of its own."""
    from harness.studies.journal import read_journal

    study = optuna.create_study(study_name="s", storage=open_storage("journal", tmp_path))
    beating, silent = study.ask(X), study.ask(X)
    access.study_storage(study).record_heartbeat(access.trial_id(beating))
    reader = optuna.load_study(study_name="s", storage=read_journal(f"journal:{tmp_path / 'optuna.journal'}"))
    with relies_on("beating_trial_ids"):
        assert access.beating_trial_ids(reader) == {access.trial_id(beating)}
        assert [t.number for t in silent_trials(reader)] == [silent.number]
    assert access.heartbeat(reader) is None


def test_a_beat_for_a_trial_another_worker_failed_is_dropped(tmp_path):
    """A worker that was only slow beats on after its trial was failed as lost: no error in its thread."""
    study = optuna.create_study(study_name="s", storage=open_storage("journal", tmp_path))
    trial = study.ask(X)
    study.tell(trial, state=TrialState.FAIL)
    with relies_on("HeartbeatJournalStorage.record_heartbeat"):
        access.study_storage(study).record_heartbeat(access.trial_id(trial))


def test_optuna_logs_failed_trials_on_the_optimize_logger(tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(access.OPTIMIZE_LOGGER)
    logger.addHandler(handler)
    try:
        study = optuna.create_study(storage=plain_storage("journal", tmp_path))
        study.optimize(lambda t: 1 / 0, n_trials=1, catch=(ZeroDivisionError,))
    finally:
        logger.removeHandler(handler)
    with relies_on("OPTIMIZE_LOGGER"):
        assert any(str(r.msg).startswith("Trial 0 failed") for r in records), [r.msg for r in records]


def test_journal_heartbeats_are_still_the_harness_s():
    """The day Optuna's JournalStorage beats on its own (optuna/optuna#6615), ours would beat twice."""
    with relies_on("HeartbeatJournalStorage"):
        assert not issubclass(JournalStorage, access.BaseHeartbeat), (
            "JournalStorage has heartbeats of its own now: use them (heartbeat_interval=...) and drop "
            "HeartbeatJournalStorage"
        )
        assert issubclass(access.HeartbeatJournalStorage, access.BaseHeartbeat)
        assert access.HeartbeatJournalStorage.__abstractmethods__ == frozenset()
