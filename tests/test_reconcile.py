"""studies/reconcile.py on real Optuna storages, SQLite and a journal file: a trial whose worker was
killed in the instant between Optuna creating it and starting its heartbeat (none recorded) is
failed and re-queued once the grace period has passed; a fresh one is left alone. No SQL: the
journal has no tables."""

from datetime import datetime, timedelta

import optuna
import pytest
from optuna.trial import TrialState

from harness.studies.journal import open_journal
from harness.studies.reconcile import fail_silent_trials
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
