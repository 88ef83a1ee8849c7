"""Every use of Optuna's internals, in one place: what the harness needs that Optuna has no public API for.

Each function says which internal it reads. tests/test_optuna_access.py exercises every one on real
SQLite and journal storages and names the function to fix when an Optuna upgrade changes them;
everything else in the harness uses Optuna's public API only. Written against Optuna 5.0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # not exported: the class a storage implements to beat
from optuna.trial import FrozenTrial, TrialState

# The logger of Optuna's optimize loop (a private module's): it logs each failed trial with its traceback.
OPTIMIZE_LOGGER = "optuna.study._optimize"
# The trial system attr a journal heartbeat lives in: [the trial's id, seconds since the epoch]. A retry
# copies its failed trial's system attrs (RetryHeartbeatStaleTrialCallback), so a beat counts only in
# the trial whose id it names.
HEARTBEAT_ATTR = "harness:heartbeat"


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (`_trial_id`): what storage methods take; a number is per study."""
    return trial._trial_id


def study_id(study: optuna.Study | optuna.study.FrozenStudy) -> int:
    """The storage's id of a study (`_study_id`): the dashboard's page for a study is named by it."""
    return study._study_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study was opened on (`_storage`; an RDBStorage comes wrapped in Optuna's cache)."""
    return study._storage


def _beating_storage(study: optuna.Study):
    """The storage under Optuna's cache (`_CachedStorage._backend`): the one holding heartbeat settings."""
    storage = study._storage
    if isinstance(storage, optuna.storages._CachedStorage):
        storage = storage._backend
    return storage


@dataclass(frozen=True)
class Heartbeat:
    interval: int  # seconds between a running trial's beats
    grace: float  # seconds without a beat before the trial counts as lost
    callback: Callable[[optuna.Study, FrozenTrial], None] | None  # run on each trial failed as lost


def heartbeat(study: optuna.Study) -> Heartbeat | None:
    """The study's storage's heartbeat settings; None where it has none. (An RDBStorage's grace period
    is the attribute `grace_period`, None meaning Optuna's default of two beats.)"""
    storage = _beating_storage(study)
    if not isinstance(storage, BaseHeartbeat) or storage.get_heartbeat_interval() is None:
        return None
    interval = storage.get_heartbeat_interval()
    return Heartbeat(interval, storage.grace_period or 2 * interval, storage.get_heartbeat_stale_trial_callback())


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """The RUNNING trials whose last beat is older than the grace period (`_get_stale_trial_ids`): what
    `optuna.storages.fail_stale_trials` fails. A trial that never beat is not among them."""
    if heartbeat(study) is None:
        return []
    return _beating_storage(study)._get_stale_trial_ids(study._study_id)


def beating_trial_ids(study: optuna.Study) -> set[int]:
    """The RUNNING trials that have recorded a heartbeat. An RDBStorage keeps its beats in a table of its
    own that no public method reads: read through its ORM models (no SQL of ours on Optuna's tables)."""
    storage = _beating_storage(study)
    if isinstance(storage, HeartbeatJournalStorage):
        return set(storage.beats(study._study_id))
    if isinstance(storage, RDBStorage):
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(storage.scoped_session) as session:
            rows = (
                session.query(models.TrialHeartbeatModel.trial_id)
                .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                .filter(models.TrialModel.study_id == study._study_id, models.TrialModel.state == TrialState.RUNNING)
                .all()
            )
        return {row[0] for row in rows}
    raise TypeError(f"no heartbeats to read in a {type(storage).__name__}")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with the heartbeat its RDBStorage has and it lacks (Optuna 5.0, see
    optuna/optuna#6615): `Study.optimize` then beats for each trial and fails the lost ones
    (`fail_stale_trials`) as on a database. A beat is a trial system attr (`HEARTBEAT_ATTR`) written
    through the journal, by the worker's clock: the machines' clocks must agree to well within the
    grace period (NTP). `url`: how the harness names it (journal:PATH), as an RDBStorage's url."""

    def __init__(
        self,
        backend: optuna.storages.journal.BaseJournalBackend,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback
        self.url = url
        self.clock = clock

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, [trial_id, self.clock()])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it as lost: this worker's tell will find it finished

    def beats(self, study_id: int) -> dict[int, float]:
        """Trial id -> its last beat, for the study's RUNNING trials that have beaten."""
        beats = {}
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if beat and beat[0] == t._trial_id:
                beats[t._trial_id] = beat[1]
        return beats

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period or 2 * self.heartbeat_interval
        now = self.clock()
        return [i for i, beat in self.beats(study_id).items() if now - beat > grace]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback
