"""`harness tune`: a study run by one or several worker processes on this machine.

    tune(TuneOptions(study="cifar10-cnn", space="cnn", trials=20, workers=4))

One worker runs in this process; several are spawned, spread over the GPUs, and stopped together
(a Ctrl-C or SIGTERM here is forwarded to each). When they are done, the background evaluations
left over are finished and the study's summary is written on its study run. Stopped by SIGUSR1
(a Slurm job near its time limit), it requeues its own job while the study has trials left. How a study is
opened, how a worker runs trials, how a dead worker's leftovers are set straight and how results
are looked up live in studies/study.py, worker.py, reconcile.py and results.py.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import replace

import optuna

from harness.interrupts import TimeUp, finishing, stop_cleanly
from harness.studies.options import StudyError, TuneOptions, directions
from harness.studies.space import load_space

# the workers' modules (torch, MLflow: 5-10 s to import on a CPU) load once the options are known good

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


def tune(opts: TuneOptions) -> optuna.Study:
    """Run the study with `opts.workers` processes here, then refresh its summary."""
    load_space(opts.space)  # a bad space or objective is one line here, before any heavy import
    directions(opts.objectives)
    from harness.finisher import drain
    from harness.studies.report import write_summary

    study, client, parent = run_workers(opts)
    with finishing():  # a time-limit SIGUSR1 from here on has nothing to stop
        drain(opts.tracking_uri)  # evaluations a killed worker or finisher left behind
        write_summary(study, client, parent)
    return study


def run_workers(opts: TuneOptions) -> tuple[optuna.Study, object, str]:
    """The study's trials, by one worker here or `opts.workers` processes; (study, client, study run).
    Near a Slurm job's time limit (SIGUSR1) the job is requeued while the study has trials left."""
    try:
        return _run_workers(opts)
    except TimeUp:  # everything is stopped and recorded: the job's next attempt takes over
        continue_in_slurm(opts)
        raise


def continue_in_slurm(opts: TuneOptions) -> None:
    """Requeue this Slurm job while the study has trials to run (its stopped ones were re-queued).
    Done here, by the top process, once everything is stopped: Slurm ends the attempt at once."""
    from harness.studies.slurm import requeue_self
    from harness.studies.study import open_storage
    from harness.studies.worker import remaining

    study = optuna.load_study(study_name=opts.study, storage=open_storage(opts))
    if remaining(study, opts.trials) > 0:
        print(f"harness: {requeue_self()}", file=sys.stderr, flush=True)


def _run_workers(opts: TuneOptions) -> tuple[optuna.Study, object, str]:
    from harness.studies.plans import prepare_plan
    from harness.studies.worker import run_worker, worker_process

    if opts.workers <= 1:
        worker = run_worker(opts)
        study, client, parent = worker.study, worker.client, worker.parent_run_id
    else:
        # the study, its run and both stores exist before any worker starts: they only join
        _, base, study, parent, client = prepare_plan(opts)
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // opts.workers)
        gpus = gpu_count()
        procs = [
            ctx.Process(
                target=worker_process,
                args=(replace(opts, progress=False, device=worker_device(i, base.device, gpus)), threads),
            )
            for i in range(opts.workers)
        ]
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
            raise StudyError(
                f"{sum(p.exitcode != 0 for p in procs)} of {opts.workers} workers failed: "
                "see their output above; run the same command to resume"
            )
    return study, client, parent
