"""studies/reconcile.py on real Optuna storages, SQLite and a journal file: a trial whose worker was
killed in the instant between Optuna creating it and starting its heartbeat (none recorded) is
failed and re-queued once the grace period has passed; a fresh one is left alone. No SQL: the
journal has no tables."""

from datetime import datetime, timedelta

import optuna
import pytest
from optuna.trial import TrialState

from harness.studies.journal import open_journal
from harness.studies.optuna_access import trial_id
from harness.studies.reconcile import fail_silent_trials, requeue_orphans
from harness.studies.study import requeue


def heartbeat_storage(kind: str, tmp_path):
    """Heartbeats every second, lost after 2 s."""
    if kind == "journal":
        storage = open_journal(f"journal:{tmp_path / 'optuna.journal'}", 1, requeue)
        storage.grace_period = 2
        return storage
    return optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'optuna.db'}",
        heartbeat_interval=1,
        grace_period=2,
        heartbeat_stale_trial_callback=requeue,
    )


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trial_without_any_heartbeat_is_failed_and_requeued_after_the_grace_period(tmp_path, kind):
    study = optuna.create_study(study_name="silent", storage=heartbeat_storage(kind, tmp_path))
    silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # RUNNING, no heartbeat: as if killed
    assert fail_silent_trials(study) == []  # within the grace period: its heartbeat may be about to start
    assert fail_silent_trials(study, now=lambda: datetime.now() + timedelta(seconds=2.2)) == [silent.number]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "no heartbeat" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params  # re-queued
    assert fail_silent_trials(study) == []  # once


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_lost_trial_whose_retry_was_never_made_is_requeued_once_after_the_grace_period(tmp_path, kind):
    """A worker killed between a trial's FAIL and its retry (Optuna fails a stale trial, then calls the
    callback) leaves a FAIL with no retry: the next reconcile makes it. A trial failed by an error of
    its own, a surplus one, or one already retried is left alone."""
    storage = heartbeat_storage(kind, tmp_path)
    study = optuna.create_study(study_name="orphan", storage=storage)
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    lost, broken, surplus, retried = (study.ask(x) for _ in range(4))
    for t, attrs in (
        (lost, {}),  # failed by the heartbeat: no reason of its own
        (broken, {"fail_reason": "RuntimeError: CUDA out of memory"}),
        (surplus, {"surplus": True, "fail_reason": "surplus: ..."}),
        (retried, {"fail_reason": "Stopped: stopped by SIGTERM"}),
    ):
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id(t), key, value)
        storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
    requeue(study, study.get_trials()[retried.number])  # its worker's own requeue
    later = lambda: datetime.now() + timedelta(seconds=2.2)  # noqa: E731  (past the 2-s grace)
    assert requeue_orphans(study) == []  # within the grace period: its worker may be requeueing it
    assert requeue_orphans(study, now=later) == [lost.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["retry_history"] for t in waiting] == [[retried.number], [lost.number]]
    assert waiting[1].params == study.trials[lost.number].params
    assert requeue_orphans(study, now=later) == []  # once
    requeue(study, study.get_trials()[lost.number])  # a late requeue of its own worker: no second retry
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
