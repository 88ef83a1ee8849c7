"""Chaos: workers killed during a study (issue 10). Not part of the test suite.

    python benchmarks/chaos.py                          # SQLite study storage, 3 workers, 20 kills
    python benchmarks/chaos.py --storage postgresql     # a fresh PostgreSQL database, dropped afterwards
    python benchmarks/chaos.py --storage journal        # Optuna's JournalStorage on one file (journal:PATH)
    python benchmarks/chaos.py --faults slurm --workers 2 --kills 6 --epochs 12   # Slurm preemptions of an array
    python benchmarks/chaos.py --workers 4 --kills 40 --trials 30 --seed 3 --keep

N workers, each a separate `harness tune` process as a user on a cluster would start them, run
one study on tiny generated CIFAR-10 (tests/helpers.py's `write_cifar10`). Once the study
exists, every few seconds (uniform in --interval) a random worker gets SIGKILL or SIGTERM (a
coin toss) and a replacement starts at once, --kills times. The worker is drawn from those past
their start-up (their finisher process started: they are in the study, nearly always in a trial),
and a moment with none passes: on 2 busy cores a worker takes 15-25 s to start, longer than the
~12 s a worker lives at this pace, so drawing from all of them (--target any) kills mostly
workers that have not opened the study yet. Then the workers finish; if the
study is not complete and clean when the last exits (a SIGKILLed trial nobody has declared
stale yet, a re-queued trial nobody took), one more plain worker starts after the heartbeat's
grace period, up to three times.

With --faults slurm the workers are the tasks of a `harness slurm` job array in partition low, and
each fault is a job in partition high that preempts one (SIGTERM, Slurm's KillWait, requeue; the
requeued task is started at once instead of after Slurm's two-minute hold). Then it checks both
stores and the workers' output (and the tasks' logs and end states), and prints
a table of checks and one of figures. Exit status 0 when every check passes, 1 otherwise.

The study storage is SQLite (WAL), PostgreSQL or a journal file (--storage); the MLflow store is an SQLite file
in the temporary folder either way (as `harness tune --tracking-uri sqlite:///...`). A worker is
signalled alone (`kill PID`, as in tests/test_distributed.py); --group signals its process group
(its finisher too), as a batch system or a lost machine would. Kills start only once the study
and its study run exist: a worker killed while creating the study is a known, documented case
(the others stop after 120 s naming it), not what this measures.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import SLURM_ENDED, harness_env, slurm_jobs, tiny_trial, write_cifar10  # noqa: E402  (tests/helpers.py)

from harness.studies.reconcile import STOPPED_OR_LOST  # noqa: E402  (how a stopped or lost trial's reason begins)
from harness.studies.study import MAX_RETRY  # noqa: E402  (retries of a stopped or lost trial)

SPACE = """\
params:
  lr: {type: float, low: 0.005, high: 0.05, log: true}
  model.dropout: {type: float, low: 0.0, high: 0.2}
"""
# trials of several seconds on 2 busy cores, one resumable checkpoint per epoch
FIXED = tiny_trial(
    "data.train_subset=600",
    "eval.misclassified=4",
    "eval.system_metrics=false",
    "checkpoint_every=1",
    drop=("epochs", "eval.figures"),  # --epochs; figures on
)
STUDY = "chaos"
LOCK_ERRORS = ("database is locked", "database table is locked")
STOP_HUNG = 90  # seconds a SIGTERMed worker gets before it counts as hung (and is SIGKILLed)


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    log: Path
    started: float
    signal: str | None = None  # SIGKILL / SIGTERM, once sent
    signalled_at: float | None = None
    signalled_clock: float | None = None  # time.time() of the signal: compared with the trials' datetimes
    phase: str | None = None  # what it was doing when signalled: starting / in study
    exited_at: float | None = None
    final: bool = False  # started after the chaos, to complete the study

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Kill:
    """One fault: the signal, whom it hit, its moment (time.time()), what the target was doing, and
    the seconds from a SIGTERM to the target's exit (None: not known)."""

    signal: str
    target: str
    clock: float
    phase: str
    stop_s: float | None = None


@dataclass
class Chaos:
    args: argparse.Namespace
    tmp: Path
    storage: str
    tracking: str
    workers: list[Worker] = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "harness.cli",
            "tune",
            "--study",
            STUDY,
            "--storage",
            self.storage,
            "--tracking-uri",
            self.tracking,
            "--quiet",
            *self.tune_args(),
        ]

    def tune_args(self) -> list[str]:
        """A worker's `harness tune` options besides the study, its stores and --quiet."""
        a = self.args
        cmd = [
            "--space",
            str(self.tmp / "space.yaml"),
            "--trials",
            str(a.trials),
            "--data-dir",
            str(self.tmp / "data"),
            "--sampler",
            "random",
            "--pruner",
            a.pruner,
            "--seed",
            str(a.seed),
            "--heartbeat",
            "1",
            "--set",
            f"epochs={a.epochs}",
        ]
        for item in FIXED:
            cmd += ["--set", item]
        return cmd

    def start(self, final: bool = False) -> Worker:
        index = len(self.workers)
        log = self.tmp / "logs" / f"worker{index:02d}.log"
        with open(log, "w") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                self.command(),
                cwd=self.tmp,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        w = Worker(index, proc, log, time.monotonic(), final=final)
        self.workers.append(w)
        return w

    def poll(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.exited_at is None and w.proc.poll() is not None:
                w.exited_at = now
            elif w.exited_at is None and w.signal == "SIGTERM" and now - w.signalled_at > STOP_HUNG:
                os.killpg(w.pid, signal.SIGKILL)  # hung after SIGTERM: counted by the exit check
                w.proc.wait()
                w.exited_at = now

    def alive(self) -> list[Worker]:
        self.poll()
        return [w for w in self.workers if w.exited_at is None]

    # what the checks read of the faults and of the processes that ran the study
    def kills(self) -> list[Kill]:
        return [
            Kill(
                w.signal,
                f"worker {w.index}",
                w.signalled_clock,
                w.phase,
                w.exited_at - w.signalled_at if w.signal == "SIGTERM" and w.exited_at else None,
            )
            for w in self.workers
            if w.signal
        ]

    def exits(self) -> list[tuple[str, object, bool]]:
        """(process, its exit status, whether that is the status expected of it)."""
        expected = {None: (0,), "SIGKILL": (-9,), "SIGTERM": (143, -15)}
        return [
            (f"worker {w.index} ({w.signal or 'not killed'})", code, code in expected[w.signal])
            for w in self.workers
            for code in [w.proc.returncode]
        ]

    def outputs(self) -> list[tuple[str, str, bool]]:
        """(process, its output, whether it was signalled)."""
        return [(f"worker {w.index}", w.log.read_text(), w.signal is not None) for w in self.workers]

    def cleanup(self) -> None:
        """Stopped early (Ctrl-C, a timeout): no strays."""
        for w in self.alive():
            os.killpg(w.pid, signal.SIGKILL)
            w.proc.wait()


def phase_of(pid: int) -> str:
    """`in study` once the worker started its finisher (after opening the study), else `starting`."""
    import psutil

    try:
        children = psutil.Process(pid).children()
        return "in study" if any("spawn_main" in " ".join(c.cmdline()) for c in children) else "starting"
    except psutil.Error:
        return "starting"


def storage_url(url: str):
    """The study storage as Optuna's functions take it: the URL the workers open (postgresql:// with
    the driver installed), or the journal file's storage."""
    from harness.studies.study import storage_for
    from harness.studies.study import storage_url as url_of

    return storage_for(url_of(url))


def grace_seconds(url: str) -> float:
    """How long a SIGKILLed trial's heartbeat takes to read as stale (heartbeat 1 s), and 2 s more."""
    from harness.studies import journal

    return 3 * 1 + (journal.LOCK_GRACE if journal.journal_path(url) is not None else 0) + 2


def study_exists(chaos: Chaos) -> bool:
    import optuna

    try:
        return (
            "mlflow_parent_run_id" in optuna.load_study(study_name=STUDY, storage=storage_url(chaos.storage)).user_attrs
        )
    except Exception:  # not created yet (or the storage's tables are being created)
        return False


def load_study(chaos: Chaos):
    import optuna

    return optuna.load_study(study_name=STUDY, storage=storage_url(chaos.storage))


def needs_worker(chaos: Chaos) -> bool:
    """The study is short of its budget, or holds a trial RUNNING (a stale one) or WAITING."""
    from optuna.trial import TrialState

    trials = load_study(chaos).get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return done < chaos.args.trials or any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


def snapshot(chaos: Chaos) -> list:
    return [(t.number, t.state) for t in load_study(chaos).get_trials(deepcopy=False)]


def run_chaos(chaos: Chaos) -> dict:
    a = chaos.args
    rng = random.Random(a.seed)
    low, high = a.interval
    t0 = time.monotonic()
    for _ in range(a.workers):
        chaos.start()
    deadline = t0 + a.wait
    while not study_exists(chaos):
        if time.monotonic() > deadline or not chaos.alive():
            raise SystemExit(f"chaos: the study was not created within {a.wait} s:\n{tail(chaos)}")
        time.sleep(0.5)
    created = time.monotonic() - t0
    kills = skipped = 0
    next_at = time.monotonic() + rng.uniform(low, high)
    while kills < a.kills:
        time.sleep(0.1)
        targets = [w for w in chaos.alive() if w.signal is None]
        if not targets:
            break  # the study finished before all the kills: see the figures
        if time.monotonic() < next_at:
            continue
        next_at = time.monotonic() + rng.uniform(low, high)
        phases = {w.index: phase_of(w.pid) for w in targets}
        if a.target == "working":  # a worker past its start-up: in the study, nearly always in a trial
            targets = [w for w in targets if phases[w.index] == "in study"]
            if not targets:
                skipped += 1  # this moment passes; the next is as random
                continue
        w = rng.choice(targets)
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        w.phase = phases[w.index]
        w.signal, w.signalled_at, w.signalled_clock = sig.name, time.monotonic(), time.time()
        try:
            if a.group:
                os.killpg(w.pid, sig)
            else:
                os.kill(w.pid, sig)
        except ProcessLookupError:  # it ended just now: not a kill
            w.signal = w.signalled_at = w.signalled_clock = w.phase = None
            continue
        kills += 1
        print(
            f"  {time.monotonic() - t0:6.1f} s  {time.strftime('%H:%M:%S')}  kill {kills:2d}: {sig.name} worker "
            f"{w.index} ({w.phase}); "
            f"worker {chaos.start().index} started",
            flush=True,
        )
    chaos_end = time.monotonic() - t0
    while chaos.alive():
        if time.monotonic() > deadline + a.wait:
            for w in chaos.alive():
                os.killpg(w.pid, signal.SIGKILL)
            raise SystemExit(f"chaos: workers still running {a.wait} s after the kills:\n{tail(chaos)}")
        time.sleep(0.5)
    finals = final_workers(chaos, t0)
    return {
        "kills": kills,
        "skipped": skipped,
        "created_s": created,
        "chaos_s": chaos_end,
        "final_workers": finals,
        "wall_s": time.monotonic() - t0,
    }


def final_workers(chaos: Chaos, t0: float) -> int:
    """If the study is not complete and clean once the faults are over (a SIGKILLed trial nobody has
    declared stale yet, a re-queued trial nobody took), plain workers here, one at a time, up to 3."""
    finals = 0
    while needs_worker(chaos) and finals < 3:
        time.sleep(grace_seconds(chaos.storage))  # past the grace period: a SIGKILLed trial reads as stale
        before = snapshot(chaos)
        finals += 1
        print(
            f"  {time.monotonic() - t0:6.1f} s  the study is not complete and clean: a final worker "
            f"{chaos.start(final=True).index} started",
            flush=True,
        )
        while chaos.alive():
            time.sleep(0.5)
        if snapshot(chaos) == before:
            print(f"  {time.monotonic() - t0:6.1f} s  the final worker changed no trial: no more", flush=True)
            break
    return finals


def tail(chaos: Chaos, chars: int = 4000) -> str:
    text = "\n".join(f"--- {w.log.name}\n{w.log.read_text()}" for w in chaos.workers if w.log.exists())
    return text[-chars:]


# ----------------------------------------------------------------------------
# Checks


def check(chaos: Chaos, figures: dict) -> tuple[list[tuple[str, object, object, bool, str]], dict]:
    """(check, found, expected, ok, detail) rows, and more figures."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    from harness import resume
    from harness.finisher import pending, spool_dir

    a = chaos.args
    study = load_study(chaos)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    client = MlflowClient(chaos.tracking)
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id], "", max_results=5000)
    trial_runs = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    study_runs = [r for r in runs if r.data.tags.get("run_kind") == "study"]
    parent = study.user_attrs.get("mlflow_parent_run_id")
    runs_of: dict[int, list] = defaultdict(list)  # trial number -> the runs tagged with it
    for r in trial_runs:
        runs_of[int(r.data.tags.get("trial_number", -1))].append(r)
    run_by_id = {r.info.run_id: r for r in runs}

    done_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = [t for t in trials if t.state in done_states]
    fails = [t for t in trials if t.state == TrialState.FAIL]
    surplus = [t for t in fails if t.user_attrs.get("surplus")]
    killed = [t for t in fails if not t.user_attrs.get("surplus")]

    def own_reason(t) -> str | None:
        """A FAIL trial's own reason. A retry inherits its predecessor's user attrs, fail_reason
        included: one equal to the predecessor's may be inherited (None here)."""
        reason = t.user_attrs.get("fail_reason")
        history = t.system_attrs.get("retry_history") or []
        if history and reason is not None and by_number[history[-1]].user_attrs.get("fail_reason") == reason:
            return None
        return reason

    # how each killed trial ended: its run KILLED (a SIGTERM's clean stop), FAILED (its heartbeat was
    # lost, the run ended by a later worker), or no run yet (killed while starting the trial)
    stopped, stale, before_run, other_fail = [], [], [], []
    for t in killed:
        mine = runs_of.get(t.number, [])
        reason = own_reason(t)
        if reason is not None and not reason.startswith(STOPPED_OR_LOST):
            other_fail.append(t)
        elif not mine:
            before_run.append(t)
        elif mine[0].info.status == "KILLED":
            stopped.append(t)
        else:
            stale.append(t)

    rows = []

    def row(name, found, expected, ok=None, detail=""):
        rows.append((name, found, expected, found == expected if ok is None else ok, detail))

    # the budget
    row(
        "trials COMPLETE + PRUNED",
        len(done),
        a.trials,
        detail=f"{sum(t.state == TrialState.COMPLETE for t in done)}"
        f" complete, {sum(t.state == TrialState.PRUNED for t in done)} pruned",
    )
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    row("trials RUNNING or WAITING", len(left), 0, detail=str(left[:10]) if left else "")
    silent = no_heartbeat(chaos, study)
    row("RUNNING trials without a heartbeat (never stale)", len(silent), 0, detail=str(silent[:10]))
    running = [r.info.run_id[:8] for r in runs if r.info.status == "RUNNING"]
    row("runs RUNNING", len(running), 0, detail=", ".join(running[:5]))
    row(
        "study runs, their status",
        " ".join([str(len(study_runs))] + [r.info.status for r in study_runs]),
        "1 FINISHED",
        ok=len(study_runs) == 1 and study_runs[0].info.run_id == parent and study_runs[0].info.status == "FINISHED",
    )

    # every final trial: exactly one run, its own, FINISHED, nested, tagged with its state
    bad_final, duplicates = [], []
    for t in done:
        mine = runs_of.get(t.number, [])
        rid = t.user_attrs.get("mlflow_run_id")
        r = run_by_id.get(rid)
        if (
            len(mine) != 1
            or r is None
            or mine[0].info.run_id != rid
            or r.info.status != "FINISHED"
            or r.data.tags.get("trial_state") != t.state.name
            or r.data.tags.get("mlflow.parentRunId") != parent
        ):
            bad_final.append(
                f"{t.number}: {len(mine)} runs, {r.info.status if r else 'no run'}, "
                f"{r.data.tags.get('trial_state') if r else ''}"
            )
    root = {t.number: (t.system_attrs.get("retry_history") or [t.number])[0] for t in trials}
    finals_per_root = Counter(root[t.number] for t in done)
    duplicates += [f"trial {n}: {c} final trials" for n, c in finals_per_root.items() if c > 1]
    ids = Counter(t.user_attrs.get("mlflow_run_id") for t in done)
    duplicates += [f"run {i[:8]} final for {c} trials" for i, c in ids.items() if i and c > 1]
    duplicates += [f"trial {n}: {len(rs)} runs" for n, rs in runs_of.items() if len(rs) > 1]
    row("final trials without exactly one FINISHED run", len(bad_final), 0, detail="; ".join(bad_final[:4]))
    row("duplicate final runs", len(duplicates), 0, detail="; ".join(duplicates[:4]))

    # retries: each replaces one attempt, linked to the run it replaces; nothing re-queued twice
    retries = [t for t in trials if t.system_attrs.get("retry_history")]
    replaced = Counter(t.system_attrs["retry_history"][-1] for t in retries)
    twice = [f"trial {n} re-queued {c} times" for n, c in replaced.items() if c > 1]
    row("trials re-queued more than once", len(twice), 0, detail="; ".join(twice[:4]))
    unlinked = []
    for t in retries:
        before = by_number[t.system_attrs["retry_history"][-1]]
        for r in runs_of.get(t.number, []):
            if r.data.tags.get("retry_of_run") != before.user_attrs.get("mlflow_run_id"):
                unlinked.append(
                    f"trial {t.number} (retry of {before.number}): retry_of_run "
                    f"{str(r.data.tags.get('retry_of_run'))[:8]}, expected "
                    f"{str(before.user_attrs.get('mlflow_run_id'))[:8]}"
                )
    row("retries not linked to the run they replace", len(unlinked), 0, detail="; ".join(unlinked[:3]))
    not_retried, exhausted = [], []
    for t in killed:
        if t.number in replaced:
            continue
        if len((t.system_attrs.get("retry_history") or [])) >= MAX_RETRY:
            exhausted.append(t.number)
        else:
            not_retried.append(t.number)
    row("killed trials neither re-queued nor out of retries", len(not_retried), 0, detail=str(not_retried[:10]))

    # runs: every trial run's trial exists and points back to it; a failed trial's run ended, not finished
    orphans, inconsistent, unrecorded = [], [], []
    for r in trial_runs:
        n = int(r.data.tags.get("trial_number", -1))
        t = by_number.get(n)
        if (
            t is not None
            and t.state == TrialState.FAIL
            and r.info.status in ("KILLED", "FAILED")
            and t.user_attrs.get("mlflow_run_id") == r.data.tags.get("retry_of_run") != r.info.run_id
        ):
            unrecorded.append(n)  # a retry killed between creating its run and recording it on the trial
        elif t is None or t.user_attrs.get("mlflow_run_id") != r.info.run_id:
            orphans.append(
                f"run {r.info.run_id[:8]} ({r.info.status}, trial {n} "
                f"{t.state.name if t else 'missing'} points to "
                f"{str(t.user_attrs.get('mlflow_run_id'))[:8] if t else '-'})"
            )
        elif t.state == TrialState.FAIL and r.info.status not in ("KILLED", "FAILED"):
            inconsistent.append(f"trial {n} FAIL, run {r.info.run_id[:8]} {r.info.status}")
        elif r.data.tags.get("trial_state") != t.state.name:
            inconsistent.append(f"trial {n} {t.state.name}, run tagged {r.data.tags.get('trial_state')}")
    row("runs their trial does not point to", len(orphans), 0, detail="; ".join(orphans[:3]))
    row("trial and run states that disagree", len(inconsistent), 0, detail="; ".join(inconsistent[:3]))
    with_run_surplus = [t.number for t in surplus if runs_of.get(t.number)]
    row("surplus trials with a run", len(with_run_surplus), 0, detail=str(with_run_surplus[:10]))

    # failures: only the kills'; no more trials failed by a stop or a lost heartbeat than kills of that kind
    row(
        "trials failed other than by a kill",
        len(other_fail),
        0,
        detail="; ".join(f"{t.number}: {own_reason(t)[:120]}" for t in other_fail[:3]),
    )
    kills = chaos.kills()
    sigkills = sum(k.signal == "SIGKILL" for k in kills)
    sigterms = sum(k.signal == "SIGTERM" for k in kills)
    row("trials stopped (run KILLED) <= SIGTERMs", len(stopped), f"<= {sigterms}", ok=len(stopped) <= sigterms)
    row("trials failed by the heartbeat <= SIGKILLs", len(stale), f"<= {sigkills}", ok=len(stale) <= sigkills)
    row(
        "trials killed in all <= kills", len(killed), f"<= {sigkills + sigterms}", ok=len(killed) <= sigkills + sigterms
    )

    # resumed trials: from the run they replace, their epochs all logged once
    resumed = [r for r in trial_runs if r.data.tags.get("resumed_from")]

    def lineage(
        r,
    ) -> set:  # the runs of the trials this run's trial retries (it resumes the latest that left a checkpoint)
        t = by_number.get(int(r.data.tags.get("trial_number", -1)))
        return (
            {by_number[n].user_attrs.get("mlflow_run_id") for n in (t.system_attrs.get("retry_history") or [])}
            if t
            else set()
        )

    bad_resume = [r.info.run_id[:8] for r in resumed if r.data.tags["resumed_from"] not in lineage(r)]
    gaps = []
    for t in done:
        r = run_by_id.get(t.user_attrs.get("mlflow_run_id"))
        if r is None:
            continue
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy"))
        last = a.epochs if t.state == TrialState.COMPLETE else (steps[-1] if steps else 0)
        if steps != list(range(1, last + 1)):
            gaps.append(f"trial {t.number}{' (resumed)' if r.data.tags.get('resumed_from') else ''}: steps {steps}")
    row("resumed runs not resuming a run of their lineage", len(bad_resume), 0, detail=", ".join(bad_resume[:5]))
    row("final runs whose epochs are not 1..E, once each", len(gaps), 0, detail="; ".join(gaps[:3]))

    # background evaluation, checkpoints
    unevaluated = [
        t.number
        for t in done
        if t.state == TrialState.COMPLETE
        and run_by_id.get(t.user_attrs.get("mlflow_run_id")) is not None
        and run_by_id[t.user_attrs["mlflow_run_id"]].data.tags.get("evaluation") != "done"
    ]
    jobs = pending(spool_dir(chaos.tracking))
    row("complete trials without their evaluation", len(unevaluated), 0, detail=str(unevaluated[:10]))
    row("evaluation jobs left in the spool", len(jobs), 0, detail=", ".join(p.name[:8] for p in jobs[:5]))
    folder = resume.checkpoint_dir(chaos.tracking)
    leftover = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    # a checkpoint left behind is a bug where a later run of its lineage should have taken it over
    # (tag retry_of_run: it adopts the file) or its trial finished; one whose lineage ended (out of
    # retries, its retry given up as surplus) is only a file nobody removes
    # (a retry resumes from the latest checkpoint of its lineage: a file is explained when every later
    # attempt of its lineage was stopped before taking it over and the lineage ran out of retries, or
    # its last retry was given up as surplus)
    finals = {t.user_attrs.get("mlflow_run_id") for t in done}
    run_of_number = {t.number: t.user_attrs.get("mlflow_run_id") for t in trials}
    exhausted_lineages = [
        [run_of_number.get(n) for n in (t.system_attrs.get("retry_history") or []) + [t.number]]
        for t in fails
        if len(t.system_attrs.get("retry_history") or []) >= MAX_RETRY or t.user_attrs.get("surplus")
    ]
    dead_ends = {run for lineage in exhausted_lineages for run in lineage}
    unexplained = [p for p in leftover if p.stem in finals or p.stem not in dead_ends]
    row(
        "checkpoints a later run should have taken over",
        len(unexplained),
        0,
        detail=", ".join(p.stem[:8] for p in unexplained[:5]),
    )

    # the workers: their exits and their output
    bad_exit = [f"{who}: {code}" for who, code, ok in chaos.exits() if not ok]
    row("workers with an unexpected exit status", len(bad_exit), 0, detail="; ".join(bad_exit[:4]))
    killed_numbers = {t.number for t in stopped + stale + before_run + surplus}
    errors = []
    for who, text, signalled in chaos.outputs():
        for line in text.splitlines():
            m = re.search(r"Trial (\d+) failed", line)
            if (
                "Traceback" in line
                or any(e in line for e in LOCK_ERRORS)
                or "harness: error" in line
                or (m and int(m.group(1)) not in killed_numbers)
                or (not signalled and "stopped by SIGTERM" in line)
            ):
                errors.append(f"{who}: {line.strip()[:200]}")
    row("error lines in the workers' output", len(errors), 0, detail="; ".join(errors[:3]))

    stops = [k.stop_s for k in kills if k.stop_s is not None]
    more = {
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
        "surplus": len(surplus),
        "killed_trials": len(killed),
        "stopped_trials": len(stopped),
        "stale_trials": len(stale),
        "before_run": len(before_run),
        "retries": len(retries),
        "retries_exhausted": len(exhausted),
        "retries_final": sum(1 for t in done if t.system_attrs.get("retry_history")),
        "resumed": len(resumed),
        "resumed_final": sum(
            1
            for t in done
            if run_by_id.get(t.user_attrs.get("mlflow_run_id")) is not None
            and run_by_id[t.user_attrs["mlflow_run_id"]].data.tags.get("resumed_from")
        ),
        "trial_runs": len(trial_runs),
        "run_status": Counter(r.info.status for r in trial_runs),
        "sigkill": sigkills,
        "sigterm": sigterms,
        "phases": Counter((k.signal, k.phase) for k in kills),
        "stop_s": stops,
        "workers_started": len(chaos.workers),
        "lost": max(0, a.trials - len(done)),
        "duplicates": len(duplicates),
        "left_running": len(running) + len(left),
        "checkpoints_left": len(leftover),
        "errors": errors,
        "unrecorded": len(unrecorded),
    }
    return rows, more


def no_heartbeat(chaos: Chaos, study) -> list[int]:
    """RUNNING trials with no heartbeat recorded: Optuna never finds them stale (its check skips them)."""
    from harness.studies.reconcile import silent_trials

    return sorted(t.number for t in silent_trials(study))


def near_kills(chaos: Chaos, moment, label: str) -> str:
    """The kills closest to a trial's moment (a datetime): which signal may have caused it."""
    if moment is None:
        return f"{label}: -"
    at = moment.timestamp()
    near = sorted(chaos.kills(), key=lambda k: abs(k.clock - at))[:2]
    return (
        f"{label} {moment:%H:%M:%S.%f}"[:-3]
        + "; nearest kills: "
        + ", ".join(f"{k.signal} {k.target} {k.clock - at:+.2f} s" for k in near)
    )


def diagnose(chaos: Chaos) -> list[str]:
    """For each trial left RUNNING/WAITING, each killed trial not re-queued and each lineage with two
    final trials: when it happened and the nearest kills (a kill's moment against the trial's)."""
    from optuna.trial import TrialState

    trials = load_study(chaos).get_trials(deepcopy=False)
    replaced = {(t.system_attrs.get("retry_history") or [None])[-1] for t in trials}
    lines = []
    for t in trials:
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            lines.append(f"trial {t.number} {t.state.name}: " + near_kills(chaos, t.datetime_start, "started"))
        elif (
            t.state == TrialState.FAIL
            and not t.user_attrs.get("surplus")
            and t.number not in replaced
            and len(t.system_attrs.get("retry_history") or []) < MAX_RETRY
        ):
            lines.append(f"trial {t.number} FAIL, not re-queued: " + near_kills(chaos, t.datetime_complete, "failed"))
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.number in replaced:
            retry = [r.number for r in trials if (r.system_attrs.get("retry_history") or [None])[-1] == t.number]
            lines.append(
                f"trial {t.number} {t.state.name} yet re-queued as {retry}: "
                + near_kills(chaos, t.datetime_complete, "ended")
            )
    return lines


def report(chaos: Chaos, figures: dict, rows, more) -> bool:
    a = chaos.args
    ok = all(r[3] for r in rows)
    print(
        f"\nchecks ({a.storage} storage, {a.workers} workers, {figures['kills']} kills ({a.faults}), {a.trials} trials "
        f"of {a.epochs} epochs, pruner {a.pruner}, seed {a.seed}, target {a.target}"
        f"{', process groups' if a.group else ''})"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'found':>10}  {'expected':>10}  ok")
    for name, found, expected, good, detail in rows:
        found_s = str(found)
        print(
            f"{name:<{width}}  {found_s:>10}  {str(expected):>10}  {'ok' if good else 'FAIL'}"
            f"{'   ' + detail if detail and not good else ''}"
        )
    phases = more["phases"]
    stops = more["stop_s"]
    lines = [
        ("trials lost", more["lost"]),
        ("duplicate final runs", more["duplicates"]),
        ("left RUNNING or WAITING (trials + runs)", more["left_running"]),
        ("kills: SIGKILL / SIGTERM", f"{more['sigkill']} / {more['sigterm']}"),
        ("  SIGKILL: starting / in study", f"{phases[('SIGKILL', 'starting')]} / {phases[('SIGKILL', 'in study')]}"),
        ("  SIGTERM: starting / in study", f"{phases[('SIGTERM', 'starting')]} / {phases[('SIGTERM', 'in study')]}"),
        (
            "trials killed: run KILLED (SIGTERM) / run FAILED (heartbeat) / before their run",
            f"{more['stopped_trials']} / {more['stale_trials']} / {more['before_run']}",
        ),
        (
            "trials in all (complete / pruned / killed / surplus)",
            f"{more['trials']} ({more['complete']} / {more['pruned']} / {more['killed_trials']} / {more['surplus']})",
        ),
        ("retries (re-queued trials); of them final", f"{more['retries']}; {more['retries_final']}"),
        ("killed trials out of retries (max 3)", more["retries_exhausted"]),
        ("runs resumed from a checkpoint; of them final", f"{more['resumed']}; {more['resumed_final']}"),
        ("trial runs: " + ", ".join(f"{k} {v}" for k, v in sorted(more["run_status"].items())), more["trial_runs"]),
        ("SIGTERM to exit, median / max s", f"{statistics.median(stops):.1f} / {max(stops):.1f}" if stops else "-"),
        ("workers started (final ones)", f"{more['workers_started']} ({figures['final_workers']})"),
        ("checkpoint files left (of lineages out of retries)", more["checkpoints_left"]),
        ("retry runs killed before their trial recorded them (linked by tag)", more["unrecorded"]),
        ("study created after s", f"{figures['created_s']:.0f}"),
        ("kill moments passed (no worker past start-up)", figures["skipped"]),
        ("kills over, s", f"{figures['chaos_s']:.0f}"),
        ("wall time, s", f"{figures['wall_s']:.0f}"),
    ]
    print("\nfigures")
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    if more["errors"]:
        print("\nerror lines:\n" + "\n".join(more["errors"][:20]))
    if not ok:
        print("\ndiagnosis (a trial's moment against the kills' moments):")
        for line in diagnose(chaos):
            print("  " + line)
    print(
        f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}"
        f"{'' if not a.keep else f'; kept {chaos.tmp} (logs/, mlruns/, optuna.db or a copy of the study)'}"
    )
    return ok


# ----------------------------------------------------------------------------
# Slurm preemptions as the faults (--faults slurm)


@dataclass
class SlurmChaos(Chaos):
    """The study's workers are the tasks of a `harness slurm` job array in partition low; each fault
    is a job in partition high that preempts one of them (Slurm: SIGTERM, KillWait, requeue)."""

    job: str | None = None
    high_jobs: list[str] = field(default_factory=list)
    preemptions: list[Kill] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)

    def submit(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "harness.cli", "slurm", "--study", STUDY, "--storage", self.storage]
            + ["--tracking-uri", self.tracking, "--partition", "low", "--array-size", str(self.args.workers)]
            + ["--cpus-per-task", "1", "--", *self.tune_args()],
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        m = re.match(r"submitted job array (\d+)", out.stdout)
        if out.returncode != 0 or not m:
            raise SystemExit(f"chaos: harness slurm failed: {out.stderr.strip() or out.stdout.strip()}")
        self.job = m.group(1)

    def tasks(self) -> dict[str, dict]:
        return slurm_jobs(self.job) if self.job else {}

    def preempt(self) -> None:
        """A one-CPU job in partition high: Slurm preempts one running task of the array for it."""
        out = subprocess.run(
            ["sbatch", "--parsable", "--partition", "high", "--ntasks", "1", "--cpus-per-task", "1"]
            + ["--output", "/dev/null", "--wrap", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise SystemExit(f"chaos: sbatch in partition high failed: {out.stderr.strip()}")
        self.high_jobs.append(out.stdout.strip().split(";")[0])
        self.preemptions.append(Kill("SIGTERM", "a task", time.time(), "in study"))

    def preempting(self) -> bool:
        """A job in high not yet ended: its preemption is still under way."""
        return any(
            t.get("JobState") not in SLURM_ENDED for job in self.high_jobs[-1:] for t in slurm_jobs(job).values()
        )

    def release_requeued(self, tasks: dict[str, dict]) -> None:
        """Name the task each preemption hit, and start a requeued task now (Slurm holds it 2 minutes)."""
        for task, t in tasks.items():
            restarts = int(t.get("Restarts", 0))
            for _ in range(restarts - self.restarts.get(task, 0)):
                hit = next((k for k in self.preemptions if k.target == "a task"), None)
                if hit is not None:
                    hit.target = f"task {task}"
            self.restarts[task] = restarts
            if t["JobState"] == "PENDING" and restarts > 0 and t.get("Reason") == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={t['JobId']}", "StartTime=now"], timeout=30)

    def kills(self) -> list[Kill]:
        return super().kills() + self.preemptions

    def exits(self) -> list[tuple[str, object, bool]]:
        tasks = [(f"task {i} (restarts {t.get('Restarts')})", t["JobState"]) for i, t in sorted(self.tasks().items())]
        return super().exits() + [(who, state, state == "COMPLETED") for who, state in tasks]

    def outputs(self) -> list[tuple[str, str, bool]]:
        logs = sorted((self.tmp / "slurm-logs").glob("*.out"))
        restarted = {i for i, n in self.restarts.items() if n > 0}
        return super().outputs() + [(p.name, p.read_text(), p.stem.rsplit("_", 1)[-1] in restarted) for p in logs]

    def cleanup(self) -> None:
        super().cleanup()
        for job in [self.job, *self.high_jobs]:
            if job:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)


def run_slurm_chaos(chaos: SlurmChaos) -> dict:
    """Submit the array; every few seconds while every task is in a trial, preempt one; then let it finish."""
    from optuna.trial import TrialState

    a = chaos.args
    rng = random.Random(a.seed)
    t0 = time.monotonic()
    deadline = t0 + a.wait
    chaos.submit()
    while not study_exists(chaos):
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos: the study was not created within {a.wait} s; tasks {chaos.tasks()}")
        time.sleep(0.5)
    created = time.monotonic() - t0
    kills = skipped = 0
    next_at = time.monotonic() + rng.uniform(*a.interval)
    while kills < a.kills:
        time.sleep(0.5)
        tasks = chaos.tasks()
        chaos.release_requeued(tasks)
        if tasks and all(t["JobState"] in SLURM_ENDED for t in tasks.values()):
            break  # the study finished before all the faults: see the figures
        if time.monotonic() < next_at:
            continue
        next_at = time.monotonic() + rng.uniform(*a.interval)
        if chaos.preempting() or len(load_study(chaos).get_trials(states=(TrialState.RUNNING,))) < a.workers:
            skipped += 1  # a preemption under way, or a task not in a trial (pending, starting): this moment passes
            continue
        chaos.preempt()
        kills += 1
        print(f"  {time.monotonic() - t0:6.1f} s  {time.strftime('%H:%M:%S')}  preemption {kills:2d}", flush=True)
    chaos_end = time.monotonic() - t0
    while not (tasks := chaos.tasks()) or any(t["JobState"] not in SLURM_ENDED for t in tasks.values()):
        if time.monotonic() > deadline + a.wait:
            raise SystemExit(f"chaos: the array had not ended {a.wait} s after the faults; tasks {tasks}")
        chaos.release_requeued(tasks)
        time.sleep(0.5)
    return {
        "kills": kills,
        "skipped": skipped,
        "created_s": created,
        "chaos_s": chaos_end,
        "final_workers": final_workers(chaos, t0),
        "wall_s": time.monotonic() - t0,
    }


# ----------------------------------------------------------------------------
# Stores


def make_postgres(admin_url: str) -> tuple[str, callable]:
    """A fresh database on the server of `admin_url`; returns its URL and a function that drops it."""
    import psycopg2

    admin = urlsplit(admin_url)._replace(path="/postgres").geturl()
    name = f"chaos_{secrets.token_hex(4)}"
    conn = psycopg2.connect(admin, connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()

    def drop() -> None:
        conn = psycopg2.connect(admin, connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()

    return urlsplit(admin_url)._replace(path=f"/{name}").geturl(), drop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", choices=("sqlite", "postgresql", "journal"), default="sqlite")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("HARNESS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where a fresh database can be created (default: $HARNESS_TEST_POSTGRES_URL or local)",
    )
    p.add_argument(
        "--faults",
        choices=("signals", "slurm"),
        default="signals",
        help="SIGKILL/SIGTERM to local workers, or Slurm preemptions of a `harness slurm` array (partitions "
        "low and high, as .ci/slurm.sh makes them; --workers tasks of one CPU each)",
    )
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pruner", choices=("hyperband", "median", "none"), default="hyperband")
    p.add_argument(
        "--interval",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=(2.0, 6.0),
        help="seconds between kills: LOW,HIGH (uniform)",
    )
    p.add_argument(
        "--target",
        choices=("working", "any"),
        default="working",
        help="kill a random worker past its start-up (a moment with none passes), or any worker",
    )
    p.add_argument("--group", action="store_true", help="signal a worker's process group (its finisher too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait", type=float, default=900, help="seconds to wait for the study's start, then for its end")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores) for inspection")
    a = p.parse_args(argv)

    from mlflow import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    drop = chaos = None
    try:
        (tmp / "logs").mkdir()
        (tmp / "space.yaml").write_text(SPACE)
        write_cifar10(tmp / "data", n_train=1000, n_test=200, seed=a.seed)
        tracking = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
        (tmp / "mlruns").mkdir()
        MlflowClient(tracking).search_experiments()  # the MLflow store made once (a tracking server's part)
        if a.storage == "postgresql":
            storage, drop = make_postgres(a.postgres_url)
        elif a.storage == "journal":
            storage = f"journal:{tmp / 'optuna.journal'}"
        else:
            storage = f"sqlite:///{tmp / 'optuna.db'}"
        env = {
            **harness_env(),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        for var in (
            "MLFLOW_TRACKING_URI",
            "HARNESS_STORAGE",
            "HARNESS_CHECKPOINT_DIR",
            "HARNESS_DATA_DIR",
        ):
            env.pop(var, None)
        chaos = (SlurmChaos if a.faults == "slurm" else Chaos)(a, tmp, storage, tracking, env=env)
        print(
            f"chaos: {a.workers} workers on study '{STUDY}' ({a.trials} trials of {a.epochs} epochs), "
            f"{a.kills} kills every {a.interval[0]:g}-{a.interval[1]:g} s, storage {a.storage}, folder {tmp}",
            flush=True,
        )
        figures = run_slurm_chaos(chaos) if a.faults == "slurm" else run_chaos(chaos)
        rows, more = check(chaos, figures)
        ok = report(chaos, figures, rows, more)
        if a.keep and drop is not None:  # the database is dropped: keep a copy of the study beside the logs
            import optuna

            try:
                optuna.copy_study(
                    from_study_name=STUDY,
                    from_storage=storage_url(storage),
                    to_storage=f"sqlite:///{tmp / 'optuna-copy.db'}",
                )
            except Exception as e:  # (a copy is a convenience)
                print(f"chaos: the study could not be copied ({type(e).__name__}: {e})")
        return 0 if ok else 1
    finally:
        if chaos is not None:
            chaos.cleanup()
        if drop is not None:
            drop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
