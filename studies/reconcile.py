"""Setting the stores straight after a worker died: its trial failed and re-queued, its run ended.

A SIGKILLed worker (power loss, the out-of-memory killer) leaves its trial RUNNING in Optuna and
its run RUNNING in MLflow. Its heartbeat stops, so the next worker to start on the study fails
the trial (the storage's retry callback queues it again, to resume from its checkpoint) and
then ends the run FAILED with the reason.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Callable

import optuna
from optuna.trial import TrialState

from harness.studies.optuna_access import beating_trial_ids, heartbeat, study_storage, trial_id
from harness.studies.study import MAX_RETRY
from harness.tags import FAIL_REASON, MLFLOW_EXPERIMENT, RUN_KIND, TRIAL_NUMBER, TRIAL_STATE
from harness.tracking import RunLogger

SILENT_REASON = "its worker died as the trial started (no heartbeat was ever recorded); re-queued"
# how a stopped or lost trial's fail reason begins (harness.tracking.error_line of a stop, or SILENT_REASON)
STOPPED_OR_LOST = ("Stopped", "TimeUp", "KeyboardInterrupt", SILENT_REASON)


def reconcile_runs(study: optuna.Study, client, run_kind: str = "trial") -> int:
    """End FAILED the runs of trials whose worker died: the trial is no longer RUNNING, its run is.

    First fails the trials whose heartbeat stopped (the retry callback re-queues them). `run_kind`:
    the study's runs (a confirmation's share the experiment with its tuning study's).
    """
    optuna.storages.fail_stale_trials(study)
    fail_silent_trials(study)
    requeue_orphans(study)
    exp = client.get_experiment_by_name(study.user_attrs.get(MLFLOW_EXPERIMENT, study.study_name))
    if exp is None:
        return 0
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    reasons = {t.number: t.user_attrs.get(FAIL_REASON) for t in study.get_trials(deepcopy=False)}
    running = client.search_runs(
        [exp.experiment_id], f"attributes.status = 'RUNNING' and tags.{RUN_KIND} = '{run_kind}'", max_results=1000
    )
    ended = 0
    for run in running:
        number = int(run.data.tags.get(TRIAL_NUMBER, -1))
        if states.get(number, TrialState.RUNNING) != TrialState.RUNNING:
            logger = RunLogger(client, run.info.run_id)
            logger.set_tags({TRIAL_STATE: states[number].name})
            # a trial with a reason failed while its tracking server was away: its run could not be ended then
            logger.end(
                "FAILED",
                reasons.get(number)
                or "the worker stopped during this trial (its heartbeat was "
                "lost); Optuna marked the trial FAIL and re-queued it",
            )
            ended += 1
    return ended


def finish_study_run(study: optuna.Study, client, parent: str, status: str = "FINISHED") -> None:
    """The study run ends with the last worker: when no trial is running any more."""
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(parent, status)


def fail_silent_trials(study: optuna.Study, now: Callable[[], datetime] = datetime.now) -> list[int]:
    """Fail (and re-queue) RUNNING trials that never recorded a heartbeat and began longer ago than
    the grace period: their worker was killed outright in the instant between Optuna creating the
    trial and starting its heartbeat. Optuna's stale check skips trials without a heartbeat, so
    they would stay RUNNING for good. Returns their numbers. `now`: the clock (Optuna's local time)."""
    beat = heartbeat(study)
    if beat is None:
        return []
    storage = study_storage(study)
    failed = []
    for trial in silent_trials(study):
        if trial.datetime_start is None or now() - trial.datetime_start < timedelta(seconds=beat.grace):
            continue  # just created: its heartbeat is about to start
        try:
            storage.set_trial_user_attr(trial_id(trial), FAIL_REASON, SILENT_REASON)
            if not storage.set_trial_state_values(trial_id(trial), TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if beat.callback is not None:
            beat.callback(study, storage.get_trial(trial_id(trial)))
        failed.append(trial.number)
    return failed


def requeue_orphans(study: optuna.Study, now: Callable[[], datetime] = datetime.now) -> list[int]:
    """Re-queue the trials that were stopped or lost but whose retry was never made: a worker killed
    between a trial's FAIL and its retry's creation (Optuna fails a stale trial, then calls the
    callback; a stopped worker tells, then requeues). Only past the grace period, so that a live
    worker's own requeue, milliseconds after its FAIL, is never doubled. Returns their numbers."""
    beat = heartbeat(study)
    if beat is None or beat.callback is None:
        return []
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    orphans = [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and t.number not in retried
        and not t.user_attrs.get("surplus")
        and len(t.system_attrs.get("retry_history") or []) < MAX_RETRY
        # no reason of its own (failed by the heartbeat; a retry inherits its predecessor's), or a stop's
        and (t.user_attrs.get(FAIL_REASON) or STOPPED_OR_LOST[0]).startswith(STOPPED_OR_LOST)
        and t.datetime_complete is not None
        and now() - t.datetime_complete > timedelta(seconds=beat.grace)
    ]
    for t in orphans:
        beat.callback(study, t)
    return [t.number for t in orphans]


def silent_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's RUNNING trials with no heartbeat recorded, on any storage with heartbeats."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beating = beating_trial_ids(study)  # (read second: a trial that beats in between is not silent)
    return [t for t in running if trial_id(t) not in beating]
