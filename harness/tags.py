"""The names runs and trials are tagged with, in one place: the core reads some of them (a trial's
or study's run in `harness ui`, a reproduced run's origin), the studies write and read the rest.

MLflow run tags: RUN_KIND (study, trial, confirmation, transfer, ...), TRIAL_NUMBER, TRIAL_STATE
(the trial's Optuna state, kept in step), RETRY_OF_RUN (the run a re-queued trial's run replaces),
CONFIRMS_TRIAL and CONFIRMS_RUN (what a confirmation run retrains). Optuna attributes:
MLFLOW_RUN_ID (trial -> its run), MLFLOW_PARENT_RUN_ID (study -> its study run),
MLFLOW_EXPERIMENT (study -> its experiment's name), FAIL_REASON (why a trial failed, in a line).
"""

RUN_KIND = "run_kind"
TRIAL_NUMBER = "trial_number"
TRIAL_STATE = "trial_state"
RETRY_OF_RUN = "retry_of_run"
CONFIRMS_TRIAL = "confirms_trial"
CONFIRMS_RUN = "confirms_run"
MLFLOW_RUN_ID = "mlflow_run_id"
MLFLOW_PARENT_RUN_ID = "mlflow_parent_run_id"
MLFLOW_EXPERIMENT = "mlflow_experiment"
FAIL_REASON = "fail_reason"
