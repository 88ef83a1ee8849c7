"""Setting the stores straight after a worker died: its trial failed and re-queued, its run ended.

A SIGKILLed worker (power loss, the out-of-memory killer) leaves its trial RUNNING in Optuna and
its run RUNNING in MLflow. Its heartbeat stops, so the next worker to start on the study fails
the trial (the storage's retry callback queues it again, to resume from its checkpoint) and
then ends the run FAILED with the reason.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from harness.tracking import RunLogger


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


def finish_study_run(study: optuna.Study, client, parent: str, status: str = "FINISHED") -> None:
    """The study run ends with the last worker: when no trial is running any more."""
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(parent, status)
