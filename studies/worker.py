"""A worker's trial loop: ask Optuna for a trial, train it as an MLflow run nested under the
study run, tell Optuna, and go on until the study has its trials.

Failure handling: a trial that raises is FAIL with its reason on both sides (`fail_reason`,
the run's `error` tag) and the loop goes on (three in a row stop it). Ctrl-C or SIGTERM end the
trial FAIL and its run KILLED, and queue the trial again: the retry resumes from the run's last
checkpoint. A worker killed outright is found by the next one (studies/reconcile.py).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from harness.data import Dataset, load_dataset
from harness.errors import HarnessError
from harness.experiment import train_run
from harness.interrupts import check, exit_code, hold, release, stop_cleanly
from harness.models import count_parameters
from harness.studies.options import StudyError, TuneOptions
from harness.studies.optuna_access import OPTIMIZE_LOGGER
from harness.studies.plans import Plan, prepare_plan
from harness.studies.reconcile import finish_study_run, reconcile_runs
from harness.studies.slurm import slurm_tags
from harness.studies.study import requeue
from harness.tags import FAIL_REASON, MLFLOW_EXPERIMENT, MLFLOW_RUN_ID, RETRY_OF_RUN, TRIAL_NUMBER, TRIAL_STATE
from harness.tracking import RunLogger, error_line, last_try, server_unreachable
from harness.uncertainty import accuracy_interval

MAX_CONSECUTIVE_FAILURES = 3


class SurplusTrial(Exception):
    """A trial started after the study reached its target (two workers asked at once): given up."""


class _QuietTrials(logging.Filter):
    """Optuna logs every failed trial with its traceback. A given-up surplus trial is no failure,
    and a stopped one (Ctrl-C, SIGTERM) is said once, in one line, by the command: both go unsaid.
    A trial that failed for a reason the user can fix (a HarnessError: a non-finite loss, missing
    data) keeps Optuna's one line, without the traceback; anything else, a bug, keeps it."""

    numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        m = re.match(r"Trial (\d+) failed", str(record.msg))
        if m and record.exc_info and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.numbers.add(int(m.group(1)))
        if m and record.exc_info and issubclass(record.exc_info[0], HarnessError):
            record.exc_info = None
        return not (m and int(m.group(1)) in self.numbers)


def quiet_trial_logs() -> None:
    """`_QuietTrials` on Optuna's trial log, once: installed when a worker starts, not on import."""
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    if not any(isinstance(f, _QuietTrials) for f in logger.filters):
        logger.addFilter(_QuietTrials())


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
    plan: Plan  # what each trial trains: a sampled config, or a top trial's again with a new seed
    study: optuna.Study
    parent_run_id: str
    client: object
    dataset: Dataset | None = None
    finisher: object = None  # harness.finisher.Finisher: evaluates finished trials in the background
    trial_number: int | None = None  # the trial in progress (to re-queue it when stopped)

    def objective(self, trial: optuna.Trial):
        """What Optuna calls. Signals are held (`hold`) from before Optuna creates the trial until this
        starts, and again from its end until Optuna has recorded the trial's end (its `tell`): a stop
        cut into either would leave the trial RUNNING or half told."""
        self.trial_number = trial.number  # a stop from here on re-queues it: the one held since the ask goes now
        release()
        try:
            return self.train_trial(trial)
        finally:
            hold()  # until `optimize` returns (released in `run`)

    def train_trial(self, trial: optuna.Trial):
        self.refuse_surplus(trial)
        cfg, run, resume_from = self.start_run(trial)
        run.finished_by = (optuna.TrialPruned,)
        try:
            with run:  # however the trial ends, so does its run (train_run ends it first once it runs)
                trial.set_user_attr(MLFLOW_RUN_ID, run.run_id)
                from harness.studies.dashboard import (
                    note_run_link,  # here: the CLI does not load it at start-up
                )

                note_run_link(trial, run)  # the trial's optuna-dashboard note links its run; never fails it
                result = train_run(
                    cfg,
                    run,
                    self.dataset,
                    callbacks=[self.pruning_report(trial, cfg)],
                    progress=self.opts.progress,
                    ok_exceptions=(optuna.TrialPruned,),
                    finisher=self.finisher,
                    resume_from=resume_from,
                )
        except optuna.TrialPruned:
            run.set_tags({TRIAL_STATE: "PRUNED"})
            raise
        except BaseException as e:
            trial.set_user_attr(FAIL_REASON, error_line(e)[:1000])
            with last_try(run.server_gone):  # its server away past the retries: the run stays RUNNING
                run.set_tags({TRIAL_STATE: "FAIL"})
            raise
        run.set_tags({TRIAL_STATE: "COMPLETE"})
        return self.values(trial, run, result)

    def refuse_surplus(self, trial: optuna.Trial) -> None:
        """A trial beyond the study's target (or a confirmation trial with nothing to train) ends
        FAIL at once, marked surplus, before any run exists."""
        if is_surplus(self.study, trial, self.opts.trials) or not self.plan.has_work(trial):
            _QuietTrials.numbers.add(trial.number)
            trial.set_user_attr("surplus", True)
            trial.set_user_attr(
                FAIL_REASON,
                f"surplus: the study reached its {self.opts.trials} trials "
                "while this worker was starting one; given up without a run",
            )
            raise SurplusTrial(f"study {self.opts.study} already has its {self.opts.trials} trials")

    def start_run(self, trial: optuna.Trial):
        """(config, run, the run to resume from): the trial's run started nested under the study run.
        Before the run exists a failure (the tracking server away too) leaves no run behind."""
        try:
            cfg = self.plan.config(trial)
            if self.dataset is None or self.dataset.name != cfg.data.dataset:
                self.dataset = load_dataset(cfg.data)
            tags = {**self.plan.tags(trial), TRIAL_NUMBER: trial.number, TRIAL_STATE: "RUNNING", **slurm_tags()}
            retry_of = trial.user_attrs.get(MLFLOW_RUN_ID)  # a re-queued trial inherits the dead one's attrs
            resume_from = None
            if retry_of:
                tags[RETRY_OF_RUN] = retry_of
                resume_from = self.lineage_checkpoint(trial, retry_of)
            run = RunLogger.start(
                self.client,
                self.study.user_attrs.get(MLFLOW_EXPERIMENT, self.opts.study),
                self.plan.run_name(trial),
                tags=tags,
                parent_run_id=self.parent_run_id,
            )
        except BaseException as e:
            trial.set_user_attr(FAIL_REASON, error_line(e)[:1000])
            raise
        return cfg, run, resume_from

    def pruning_report(self, trial: optuna.Trial, cfg):
        """The epoch callback that reports validation accuracy to Optuna and prunes when it says so."""
        multi = len(self.study.directions) > 1

        def report(m):
            if multi:  # Optuna takes intermediate values (and prunes) in single-objective studies only
                return
            trial.report(m.val_accuracy, m.epoch)
            # (not after the last epoch: the trial has cost its whole budget, pruning would only hide it)
            if m.epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch} (val accuracy {m.val_accuracy:.4f})")

        return report

    def values(self, trial: optuna.Trial, run, result):
        """What the trial tells Optuna: validation accuracy (with its interval as an attribute), and the
        second objective of a multi-objective study."""
        values = [result.fit.best_val_accuracy]
        trial.set_user_attr("val_ci", list(accuracy_interval(values[0], result.val_images)))
        if self.opts.objectives == "accuracy,params":
            values.append(float(count_parameters(result.model)))
        elif self.opts.objectives == "accuracy,latency":
            latency = measure_latency(result.model)
            run.log_metrics({"latency_ms": latency})
            values.append(latency)
        return values if len(values) > 1 else values[0]

    def own_trial(self) -> optuna.trial.FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.trial_number)

    def taken_for_lost(self) -> None:
        """This worker's heartbeat came late (a stalled or overloaded machine): another worker failed
        its trial as lost and queued the retry that trains it again. Its run ends FAILED saying so
        (the retry's run is the trial's), and this worker goes on with the next trial."""
        reason = (
            f"trial {self.trial_number} was failed as lost by another worker (this worker's heartbeat came "
            "late); its retry trains it again"
        )
        print(f"harness: worker {os.getpid()}: {reason}", file=sys.stderr, flush=True)
        run_id = self.own_trial().user_attrs.get(MLFLOW_RUN_ID)
        if run_id:
            logger = RunLogger(self.client, run_id)
            logger.set_tags({TRIAL_STATE: "FAIL"})
            logger.end("FAILED", reason)

    def lineage_checkpoint(self, trial: optuna.Trial, retry_of: str) -> str:
        """The run to resume from: the one this trial retries, or, where that one was stopped before it
        took its predecessor's checkpoint over, the latest earlier run of the lineage that left one."""
        from harness import resume

        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trials[trial.number])
        numbers = list(reversed(history))[1:]  # (the latest is retry_of's own trial)
        runs = {n: t.user_attrs.get(MLFLOW_RUN_ID) for n, t in trials.items()}
        for run_id in [retry_of] + [runs.get(n) for n in numbers]:
            if run_id and resume.path_for(self.client.tracking_uri, run_id).is_file():
                return run_id
        return retry_of

    def run(self) -> None:
        self.client.update_run(self.parent_run_id, status="RUNNING")
        start = time.time()
        failures = 0
        last: dict = {}
        while True:
            check()  # a stop swallowed outside a trial (see harness/interrupts.py)
            # a worker that died (here or anywhere) has its trial failed and re-queued, its run ended
            reconcile_runs(self.study, self.client, self.plan.run_kind)
            if remaining(self.study, self.opts.trials) <= 0:
                break
            if self.opts.timeout and time.time() - start >= self.opts.timeout:
                break
            self.trial_number = None
            hold()  # a stop while Optuna creates the trial would leave it RUNNING without a heartbeat
            try:  # (the objective releases the hold while it runs)
                self.study.optimize(
                    self.objective,
                    n_trials=1,
                    catch=(Exception,),
                    gc_after_trial=True,
                    callbacks=[lambda s, t: last.update(trial=t)],
                )
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is FAIL; queue it again to resume
                if self.trial_number is not None:
                    requeue(self.study, self.own_trial())
                raise
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # "Cannot tell a FAIL trial"
                if self.trial_number is None or self.own_trial().state == TrialState.RUNNING:
                    raise
                self.taken_for_lost()  # failed under us by another worker
                continue
            finally:
                release()  # a stop held while Optuna told the trial's end is raised here
            trial = last["trial"]
            try:
                check()  # a stop a library caught and turned into an error: its trial FAILed with that error
            except KeyboardInterrupt:
                if trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
                    requeue(self.study, trial)  # so it resumes, as a trial stopped the usual way does
                raise
            self.plan.after_trial(self.study, self.client, self.parent_run_id)
            if trial.user_attrs.get("surplus"):
                _QuietTrials.numbers.discard(trial.number)
                break
            failures = failures + 1 if trial.state == TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                reason = trial.user_attrs.get(FAIL_REASON, "see the trial runs")
                raise StudyError(
                    f"{failures} trials in a row failed, the last with {reason}: "
                    "fix the cause and run the same command to resume"
                )


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


def worker_process(opts: TuneOptions, threads: int) -> None:
    """A `--workers` process: stopped by the signals its parent forwards, then exits quietly; a
    reason to stop that the user can fix is one line, as from the command itself."""
    import torch

    stop_cleanly()
    torch.set_num_threads(threads)
    try:
        run_worker(opts)
    except KeyboardInterrupt as e:
        sys.exit(exit_code(e))
    except HarnessError as e:
        print(f"harness: worker {os.getpid()}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        gc.freeze()  # as harness/cli.py's entry: exit without the final collection


def run_worker(opts: TuneOptions) -> Worker:
    from harness.finisher import Finisher

    quiet_trial_logs()
    plan, base, study, parent, client = prepare_plan(opts)
    finisher = None
    if opts.evaluate == "background":
        finisher = Finisher(opts.tracking_uri, umap=base.eval.umap and base.eval.embedding_samples != 0)
    worker = Worker(opts, plan, study, parent, client, finisher=finisher)
    gone, stopped = None, False
    # the modules, stores and data loaded so far live as long as the worker: out of the collections that
    # `gc_after_trial` runs after every trial (0.34 s a trial over ~420k objects, benchmarks/scale.py);
    # given back after the trials, for a caller that goes on in the same process (a notebook, the tests)
    gc.freeze()
    try:
        worker.run()
    except KeyboardInterrupt:
        if finisher is not None:
            finisher.close(wait=False)  # stop at once: its jobs stay in the spool for the next finisher
        stopped = True
        raise
    except Exception as e:  # the tracking server outlasted the retries again, after a trial failed on it
        if (gone := server_unreachable(e)) is None:
            raise
        raise StudyError(
            f"{gone}; runs it could not end stay RUNNING until a worker reaches it again: "
            "run the same command to resume once it answers"
        ) from None
    finally:
        gc.unfreeze()  # (the trials are over: what follows may leave garbage worth collecting)
        if finisher is not None and not stopped:
            finisher.close()  # its last trials' evaluations (a killed finisher leaves them in the spool)
        if gone is None:  # the study run can't be ended while its server is away
            finish_study_run(study, client, parent, "KILLED" if stopped else "FINISHED")
    return worker
