"""Cost at scale (issue 17, item 4): a study of many tiny trials, per storage. Not part of the tests.

    PYTHONPATH=. python benchmarks/scale.py --trials 1000 --workers 4 --storages sqlite,postgresql,journal
    PYTHONPATH=. nice -n 10 python benchmarks/scale.py --trials 300 --storages sqlite,postgresql   # quicker

For each study storage (an SQLite file, a fresh PostgreSQL database dropped afterwards, or an Optuna
journal file, `journal:PATH`), one `harness tune --workers W --evaluate inline` runs a study of
--trials one-epoch trials of a two-stage network (8 and 16 channels) on 200 training, 100
validation and 100 test images, figures, embeddings, model logging and system metrics off, random
sampler, no pruning, a one-parameter space (lr). The MLflow store is an SQLite file in each case.
Generated images in the CIFAR-10 layout by default (--data-dir: a real copy instead).

What a trial costs the harness outside training is read back from what the stores recorded, so no
product code is instrumented. A worker runs its trials one after another, so its trials form a
chain of intervals (Optuna's datetime_start .. datetime_complete); the chains are rebuilt by
giving each trial, in the order they started, to the free worker whose last trial ended first
(workers take about as long between trials, so the one free longest asks first; the total over
all trials does not depend on the choice, and giving it to the one free latest instead leaves
a worker seemingly idle for minutes, then charges that to one trial). For each trial:

  between    the previous trial's tell in that worker .. this trial's creation: the live study row
             (`update_study_run`), reconcile (`reconcile_runs`), `remaining`, gc, Optuna's ask
  ask->run   the trial's creation .. its MLflow run's start: sampling, `is_surplus`, creating the run
  run        the run's wall time less its `train_seconds`: the trial's dashboard note, data and model
             set-up, params and dataset logged, the test set (inline), the last metrics
  tell       the run's end .. the trial's datetime_complete: the run's trial_state tag, the trial's
             user attrs and Optuna's tell

per-trial cost = the sum. Each worker's first trial is left out (its one-off costs: imports, the
dataset, the stores' first calls; the worker's start-up). It prints the mean over the first and
over the last --window trials (by number, complete ones), their ratio, the same ratio at equal
load (each window's cost divided by its mean `train_seconds`: the same work in every trial, so a
gauge of how busy the shared cores were), the slope of a least-squares line through all of them,
then the wall time of `harness compare`, `harness report` and `harness best` on the finished study
(each a fresh process, imports included), and how long the MLflow UI's page of the study (`harness
ui --study`, already answering) takes to show the study run in headless Chromium. Then the
functions a worker calls between trials, timed on the final stores (median of 5 each).
"""

from __future__ import annotations

import argparse
import os
import pickle
import queue
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STUDY = "scale"
SPACE = "params:\n  lr: {type: float, low: 0.003, high: 0.03, log: true}\n"
TINY = [
    "epochs=1",
    "batch_size=32",
    "optimizer=adamw",
    "schedule=none",
    "model.widths=[8,16]",
    "model.head_width=16",
    "data.train_subset=200",
    "data.val_subset=100",
    "data.test_subset=100",
    "data.download=false",
    "eval.tsne=false",
    "eval.umap=false",
    "eval.figures=false",
    "eval.log_model=false",
    "eval.system_metrics=false",
    "device=cpu",
    "precision=fp32",
    "patience=0",
]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------
# Inputs: data, stores


def write_images(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py/` in the released layout: each class a flat colour plus noise."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (10, 3))

    def batch(n: int, label: str) -> dict:
        labels = rng.permutation(np.arange(n) % 10)
        x = colours[labels][:, :, None, None] + rng.integers(-40, 41, (n, 3, 32, 32))
        data = np.clip(x, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {
            "batch_label": label,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"{i}.png" for i in range(n)],
        }

    for b, n in enumerate(np.diff(np.linspace(0, n_train, 6).astype(int)), 1):
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(batch(int(n), f"training batch {b} of 5"), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test, "testing batch 1 of 1"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": n_train // 5, "num_vis": 3072}, f, protocol=2)
    return root


def make_postgres(admin_url: str) -> tuple[str, callable]:
    """A fresh database on the server of `admin_url`: its URL, and a function that drops it."""
    import psycopg2

    admin = urlsplit(admin_url)._replace(path="/postgres").geturl()
    name = f"scale_{secrets.token_hex(4)}"

    def sql(*statements) -> None:
        conn = psycopg2.connect(admin, connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            for s, params in statements:
                cur.execute(s, params)
        conn.close()

    sql((f'CREATE DATABASE "{name}"', None))

    def drop() -> None:
        sql(
            ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)),
            (f'DROP DATABASE IF EXISTS "{name}"', None),
        )

    return urlsplit(admin_url)._replace(path=f"/{name}").geturl(), drop


def open_study(url: str):
    """The study as the harness opens it (studies/study.py `open_storage`: an RDB or a journal storage)."""
    import optuna

    from harness.studies.options import TuneOptions
    from harness.studies.study import open_storage, quiet_experimental

    quiet_experimental()
    return optuna.load_study(study_name=STUDY, storage=open_storage(TuneOptions(study=STUDY, storage=url)))


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.pop("MLFLOW_RUN_ID", None)
    return e


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


# ----------------------------------------------------------------------------
# The study, and what its stores recorded


def run_study(a, tmp: Path, storage: str, tracking: str, data: Path, log: Path) -> float:
    sets = [x for s in TINY for x in ("--set", s)]
    cmd = harness(
        "tune",
        "--study", STUDY,
        "--space", str(tmp / "space.yaml"),
        "--trials", str(a.trials),
        "--workers", str(a.workers),
        "--sampler", "random",
        "--pruner", "none",
        "--evaluate", "inline",
        "--storage", storage,
        "--tracking-uri", tracking,
        "--data-dir", str(data),
        "--quiet",
        *sets,
    )  # fmt: skip
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"harness tune exited {proc.returncode}; its output: {log}\n{log.read_text()[-3000:]}")
    return wall


def trial_runs(client, study) -> dict[int, object]:
    """The study's trial runs by trial number (every page)."""
    exp = client.get_experiment_by_name(study.user_attrs.get("mlflow_experiment", STUDY))
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs, token = {}, None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.run_kind = 'trial'",
            max_results=1000,
            page_token=token,
        )
        for r in page:
            runs[int(r.data.tags["trial_number"])] = r
        token = page.token
        if not token:
            return runs


def chains(trials) -> dict[int, float | None]:
    """Trial number -> the end (s since the epoch) of the previous trial of the same worker (None:
    its first): each trial, by start, goes to the free worker whose last trial ended first."""
    ends: list[float] = []  # each worker's last end
    previous = {}
    for t in sorted(trials, key=lambda t: t.datetime_start):
        start, end = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
        free = [i for i, e in enumerate(ends) if e <= start]
        if free:
            i = min(free, key=lambda i: ends[i])
            previous[t.number] = ends[i]
            ends[i] = end
        else:
            previous[t.number] = None
            ends.append(end)
    return previous


def per_trial(study, client) -> list[dict]:
    """One row per complete trial: its stages outside training, in seconds (see the docstring)."""
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    previous = chains(finished)
    runs = trial_runs(client, study)
    rows = []
    for t in finished:
        run = runs.get(t.number)
        if t.state != TrialState.COMPLETE or run is None or run.info.end_time is None or previous[t.number] is None:
            continue  # (a worker's first trial: its one-off costs, imports and caches, are start-up)
        start, end = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
        run_start, run_end = run.info.start_time / 1000, run.info.end_time / 1000
        train = run.data.metrics.get("train_seconds", 0.0)
        row = {
            "number": t.number,
            "between": start - previous[t.number],
            "ask_run": run_start - start,
            "run": run_end - run_start - train,
            "tell": end - run_end,
            "train": train,
        }
        row["cost"] = row["between"] + row["ask_run"] + row["run"] + row["tell"]
        rows.append(row)
    return sorted(rows, key=lambda r: r["number"])


def summarize(rows: list[dict], window: int) -> dict:
    first, last = rows[:window], rows[-window:]

    def mean(rs, key):
        return statistics.fmean(r[key] for r in rs)

    x = np.array([r["number"] for r in rows], float)
    y = np.array([r["cost"] for r in rows], float)
    slope = float(np.polyfit(x, y, 1)[0]) * 100 if len(rows) > 2 else float("nan")
    stages = ("between", "ask_run", "run", "tell", "cost", "train")
    return {
        "n": len(rows),
        "window": min(window, len(rows)),
        "first": {k: mean(first, k) for k in stages},
        "last": {k: mean(last, k) for k in stages},
        "slope_per_100": slope,
        # the training is the same work in every trial: its time gauges the machine's load (shared
        # cores), so cost / train_seconds compares the windows as if at the same load
        "adjusted": (mean(last, "cost") / mean(last, "train")) / (mean(first, "cost") / mean(first, "train")),
    }


# ----------------------------------------------------------------------------
# The commands at the end, the UI page, the worker's between-trial functions


def time_command(tmp: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(harness(*args), env=env(), cwd=tmp, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"harness {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_page_seconds(tmp: Path, tracking: str, timeout: float = 600) -> tuple[float | None, float | None, str]:
    """(seconds `harness ui` took to answer, seconds the study page took to show the study run, note)."""
    try:
        from tests.chrome import Chrome, find_chromium  # (tests/chrome.py: a DevTools-over-pipe driver)
    except ImportError as e:
        return None, None, f"no UI timing: tests/chrome.py not importable ({e})"
    chromium = find_chromium()
    if chromium is None:
        return None, None, "no UI timing: no Chromium (apt-get install chromium)"
    port = free_port()
    cmd = harness("ui", "--study", STUDY, "--tracking-uri", tracking, "--port", str(port), "--no-browser")
    started = time.monotonic()
    ui = subprocess.Popen(cmd, env=env(), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in ui.stdout] + [lines.put(None)], daemon=True).start()
    browser = None
    try:
        url, seen = None, []
        while url is None:
            line = lines.get(timeout=timeout)
            if line is None:
                return None, None, f"harness ui ended early: {''.join(seen)[-1000:]}"
            seen.append(line)
            m = re.search(r"(http://\S+#/experiments/\S+)", line)
            url = m and m.group(1)
        answered = time.monotonic() - started
        browser = Chrome(chromium, "about:blank")
        start = time.monotonic()
        browser.send("Page.navigate", {"url": url})
        browser.wait_for_text(f"study-{STUDY}", "Run Name", timeout=timeout)
        return answered, time.monotonic() - start, ""
    except (AssertionError, TimeoutError, queue.Empty) as e:
        return None, None, f"UI page not shown: {str(e)[:300]}"
    finally:
        if browser is not None:
            browser.close()
        if ui.poll() is None:
            ui.send_signal(signal.SIGINT)
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ui.kill()


def probe(study, client, target: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each function a worker calls between trials, on the stores as they are."""
    from harness.studies.reconcile import reconcile_runs
    from harness.studies.report import update_study_run
    from harness.studies.worker import is_surplus, remaining

    study.get_trials(deepcopy=False)  # the cache warm, as in a worker
    parent = study.user_attrs["mlflow_parent_run_id"]
    best = study.best_trial.user_attrs.get("mlflow_run_id")
    last = SimpleNamespace(number=len(study.get_trials(deepcopy=False)))
    storage = study._storage
    calls = {
        "remaining": lambda: remaining(study, target),
        "is_surplus": lambda: is_surplus(study, last, target),
        "reconcile_runs": lambda: reconcile_runs(study, client),
        "update_study_run": lambda: update_study_run(study, client, parent, settled={parent: best}),
        "study system attrs": lambda: storage.get_study_system_attrs(study._study_id),
        "study user attrs": lambda: study.user_attrs,
    }
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


# ----------------------------------------------------------------------------


def bench_storage(a, kind: str, data: Path | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"scale-{kind}-"))
    drop = None
    result: dict = {"storage": kind, "folder": str(tmp)}
    try:
        (tmp / "space.yaml").write_text(SPACE)
        data = data or write_images(tmp / "data")
        tracking = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
        if kind == "sqlite":
            storage = f"sqlite:///{tmp / 'optuna.db'}"
        elif kind == "postgresql":
            storage, drop = make_postgres(a.postgres_url)
        else:
            storage = f"journal:{tmp / 'optuna.journal'}"
        print(f"[{kind}] harness tune: {a.trials} trials, {a.workers} workers ({tmp})", flush=True)
        result["wall"] = run_study(a, tmp, storage, tracking, data, tmp / "tune.log")
        from harness.tracking import open_client

        study, client = open_study(storage), open_client(tracking)
        rows = per_trial(study, client)
        result.update(summarize(rows, a.window))
        result["rows"] = rows
        print(f"[{kind}] {len(rows)} complete trials in {result['wall']:.0f} s; timing the commands", flush=True)
        common = ("--study", STUDY, "--storage", storage, "--tracking-uri", tracking)
        result["compare"] = time_command(tmp, "compare", *common)
        result["report"] = time_command(tmp, "report", *common)
        result["best"] = time_command(tmp, "best", *common)
        result["ui_answered"], result["ui_page"], note = ui_page_seconds(tmp, tracking)
        if note:
            result["ui_note"] = note
        result["probe"] = probe(open_study(storage), client, a.trials)
        return result
    finally:
        if drop is not None:
            drop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def report(results: list[dict], a) -> None:
    print(f"\n{a.workers} workers, --evaluate inline, MLflow store: SQLite; per-trial cost outside training, s")
    print(
        "\n| storage | trials | window | first per-trial cost s | last | ratio | ratio at equal load "
        "| slope s/100 trials | compare s | report s | best s | UI page s |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        f, last = r["first"]["cost"], r["last"]["cost"]
        print(
            f"| {r['storage']} | {r['n']} | {r['window']} | {fmt(f, 3)} | {fmt(last, 3)} | {fmt(last / f)} "
            f"| {fmt(r['adjusted'])} "
            f"| {fmt(r['slope_per_100'], 3)} | {fmt(r['compare'], 1)} | {fmt(r['report'], 1)} | {fmt(r['best'], 1)} "
            f"| {fmt(r['ui_page'], 1)} |"
        )
    print("\nStages (mean s per trial, first window / last window):\n")
    print("| storage | between trials | ask -> run | run, not training | tell | total | train_seconds | wall s |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        cells = [
            f"{fmt(r['first'][k], 3)} / {fmt(r['last'][k], 3)}"
            for k in ("between", "ask_run", "run", "tell", "cost", "train")
        ]
        print(f"| {r['storage']} | {' | '.join(cells)} | {r['wall']:.0f} |")
    done = [r for r in results if "probe" in r]
    if done:
        names = list(done[0]["probe"])
        print("\nBetween-trial functions on the final stores (median of 5, ms):\n")
        print("| storage | " + " | ".join(names) + " |")
        print("|---|" + "--:|" * len(names))
        for r in done:
            print(f"| {r['storage']} | " + " | ".join(fmt(r["probe"][n] * 1000, 1) for n in names) + " |")
    for r in results:
        if r.get("ui_note"):
            print(f"{r['storage']}: {r['ui_note']}")
        if r.get("ui_answered") is not None:
            print(
                f"{r['storage']}: `harness ui` answered in {r['ui_answered']:.1f} s; the page showed the study "
                f"run {r['ui_page']:.1f} s after it was asked for"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument(
        "--storages", default="sqlite,postgresql,journal", help="comma-separated: sqlite, postgresql, journal"
    )
    p.add_argument("--journal-trials", type=int, help="trials for the journal storage (default: --trials)")
    p.add_argument("--data-dir", help="a real CIFAR-10 root (default: a few hundred generated images)")
    p.add_argument("--window", type=int, default=100, help="trials in the first and the last window")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("HARNESS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where a fresh database can be created (default: $HARNESS_TEST_POSTGRES_URL or local)",
    )
    p.add_argument("--keep", action="store_true", help="keep each storage's temporary folder")
    a = p.parse_args(argv)
    kinds = [k.strip() for k in a.storages.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in ("sqlite", "postgresql", "journal")]:
        p.error(f"unknown storage(s) {', '.join(bad)}: choose from sqlite, postgresql, journal")
    if a.window > a.trials // 2:
        a.window = max(1, a.trials // 3)
        print(f"(window: {a.window} trials, a third of the study)")
    data = Path(a.data_dir) if a.data_dir else None
    results = []
    for kind in kinds:
        b = argparse.Namespace(**{**vars(a), "trials": a.journal_trials or a.trials}) if kind == "journal" else a
        results.append(bench_storage(b, kind, data))
    report(results, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
