"""Study benchmarks on the real CIFAR-10 copy: pruning, tracking overhead, worker scaling.

    python benchmarks/study_benchmarks.py pruning  --data-dir data   # Hyperband vs none: same trials, same time
    python benchmarks/study_benchmarks.py overhead --data-dir data   # tracking + storage share
    python benchmarks/study_benchmarks.py scaling  --data-dir data   # trials/hour, 1 vs 2 workers
    python benchmarks/study_benchmarks.py extras   --data-dir data   # system metrics and the registry, per trial

Each writes into a fresh temporary store and prints its figures side by side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow import MlflowClient

from harness.studies.driver import tune
from harness.studies.options import TuneOptions


def options(tmp: Path, study: str, data_dir: str, **kw) -> TuneOptions:
    base = dict(
        study=study,
        space="training",
        storage=f"sqlite:///{tmp}/optuna.db",
        tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db",
        data_dir=data_dir,
        progress=False,
    )
    base.update(kw)
    return TuneOptions(**base)


def trial_runs(opts: TuneOptions, study: optuna.Study):
    client = MlflowClient(opts.tracking_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_experiment_by_name(opts.study)
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)


def pruning(args) -> None:
    """Hyperband against no pruning, at the same number of trials and at the same wall time."""
    budget = [
        "epochs=8",
        "data.train_subset=5000",
        "data.val_subset=2000",
        "data.test_subset=2000",
        "eval.tsne=false",
        "eval.umap=false",
        "eval.log_model=false",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, trials, timeout in (
            (f"{args.trials} trials", args.trials, None),
            (f"{args.seconds:.0f} s", 1000, args.seconds),
        ):
            for pruner in ("hyperband", "none"):
                opts = options(
                    Path(d),
                    f"prune-{pruner}-{trials}",
                    args.data_dir,
                    trials=trials,
                    timeout=timeout,
                    pruner=pruner,
                    seed=0,
                    overrides=budget,
                )
                start = time.perf_counter()
                study = tune(opts)
                wall = time.perf_counter() - start
                epochs = sum(len(t.intermediate_values) for t in study.trials)
                pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
                rows.append((label, pruner, len(study.trials), pruned, epochs, study.best_value, wall))
    print("space 'training', 8 epochs at most on 5,000 real images (2,000 validation), TPE seed 0")
    print(f"{'budget':<12}{'pruner':<11}{'trials':>7}{'pruned':>8}{'epochs':>8}{'best val acc':>14}{'wall s':>8}")
    for label, pruner, n, pruned, epochs, best, wall in rows:
        print(f"{label:<12}{pruner:<11}{n:>7d}{pruned:>8d}{epochs:>8d}{best:>14.4f}{wall:>8.0f}")
    for i in (0, 2):
        (label, _, _, _, e_h, b_h, w_h), (_, _, _, _, e_n, b_n, w_n) = rows[i], rows[i + 1]
        print(f"{label}: epochs hyperband/none {e_h / e_n:.2f}, wall {w_h / w_n:.2f}, best val acc {b_h - b_n:+.4f}")


def overhead(args) -> None:
    """Tracking (MLflow calls) and storage (Optuna) time as a share of each trial's wall time."""
    # all 40,000 training images (the space's CPU profile would take 8,000): trials of a minute or more
    budget = [
        "epochs=5",
        "data.train_subset=null",
        "data.val_subset=2000",
        "data.test_subset=2000",
        "eval.embedding_samples=1000",
    ]
    with tempfile.TemporaryDirectory() as d:
        opts = options(Path(d), "overhead", args.data_dir, trials=args.trials, pruner="none", overrides=budget)
        study = tune(opts)
        runs = {r.data.tags["trial_number"]: r for r in trial_runs(opts, study)}
        print(f"{'trial':>5}{'trial s':>9}{'tracking s':>12}{'storage s':>11}{'share':>8}")
        for t in study.trials:
            run = runs[str(t.number)]
            trial_s = t.duration.total_seconds()
            run_s = (run.info.end_time - run.info.start_time) / 1000
            tracking = run.data.metrics.get("tracking_seconds", 0.0)
            storage = max(trial_s - run_s, 0.0)  # ask/tell, sampling, attrs, run creation
            print(
                f"{t.number:>5}{trial_s:>9.1f}{tracking:>12.2f}{storage:>11.2f}{(tracking + storage) / trial_s:>8.1%}"
            )
        # start-up: the same command on the existing store with its budget already met
        cmd = [
            sys.executable,
            "-m",
            "harness.cli",
            "tune",
            "--study",
            "overhead",
            "--space",
            "training",
            "--trials",
            str(args.trials),
            "--pruner",
            "none",
            "--storage",
            opts.storage,
            "--tracking-uri",
            opts.tracking_uri,
            "--data-dir",
            args.data_dir,
            "--quiet",
        ]
        cmd += [a for s in budget for a in ("--set", s)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        print(
            f"`harness tune` start-up on the existing store (imports, open, reconcile, summary): "
            f"{time.perf_counter() - start:.1f} s"
        )


def scaling(args) -> None:
    budget = [
        "epochs=2",
        "data.train_subset=8000",
        "data.val_subset=1000",
        "data.test_subset=1000",
        "eval.tsne=false",
        "eval.umap=false",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for workers in (1, 2):
            opts = options(
                Path(d),
                f"scale-{workers}",
                args.data_dir,
                trials=args.trials,
                pruner="none",
                sampler="random",
                workers=workers,
                overrides=budget,
            )
            start = time.perf_counter()
            tune(opts)
            rows.append((workers, time.perf_counter() - start))
    print(f"{args.trials} trials of 2 epochs on 8,000 images, random sampler, 2 cores")
    print(f"{'workers':>8}{'wall s':>9}{'trials/hour':>13}")
    for workers, wall in rows:
        print(f"{workers:>8}{wall:>9.0f}{args.trials / wall * 3600:>13.0f}")
    print(f"speed-up with 2 workers: {rows[0][1] / rows[1][1]:.2f}x")


def extras(args) -> None:
    """What system metrics and the champion registry add to a trial (issue 11)."""
    import statistics

    from harness import config as C
    from harness.data import load_dataset
    from harness.experiment import train_run
    from harness.recipes import DEFAULT_CONFIG
    from harness.studies.report import settle_champion, update_study_run
    from harness.tracking import RunLogger, client_for

    budget = [
        "epochs=1",
        "data.train_subset=8000",
        "data.val_subset=2000",
        "data.test_subset=2000",
        "eval.embedding_samples=500",
        "patience=0",
        f"data.root={args.data_dir}",
    ]
    with tempfile.TemporaryDirectory() as d:
        # system metrics: the same run with the monitor on and off, alternated
        client = client_for(f"sqlite:///{d}/mlruns/mlflow.db")
        cfg = C.load(DEFAULT_CONFIG, budget)
        ds = load_dataset(cfg.data)
        walls: dict[bool, list[float]] = {True: [], False: []}
        for i in range(2 * args.trials):
            on = i % 2 == 0
            run = RunLogger.start(client, "system-metrics", f"on-{i}" if on else f"off-{i}")
            start = time.perf_counter()
            train_run(C.replace(cfg, {"eval": {"system_metrics": on}}), run, ds, progress=False)
            walls[on].append(time.perf_counter() - start)
        on, off = statistics.median(walls[True]), statistics.median(walls[False])
        print(
            f"system metrics, {args.trials} runs each of 1 epoch on 8,000 images (run wall, median): "
            f"on {on:.2f} s, off {off:.2f} s, difference {on - off:+.2f} s ({(on - off) / off:+.1%})"
        )

        # the registry and the live study row, on a study whose trials log their models
        opts = options(
            Path(d),
            "registry",
            args.data_dir,
            trials=args.trials,
            pruner="none",
            sampler="random",
            overrides=budget[:-1],
        )
        study = tune(opts)
        client = MlflowClient(opts.tracking_uri)
        parent = study.user_attrs["mlflow_parent_run_id"]
        live = []
        for _ in range(5):
            start = time.perf_counter()
            update_study_run(study, client, parent)
            live.append(time.perf_counter() - start)
        changes = len(client.search_model_versions(f"name = '{opts.study}'"))  # one version a change of champion
        moves = []
        others = [
            t
            for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if t.number != study.best_trial.number
        ]
        for t in others + [study.best_trial]:  # the alias moved to each in turn, and back to the best
            start = time.perf_counter()
            settle_champion(client, study, t, parent)
            moves.append(time.perf_counter() - start)
        print(
            f"live study-run update (no champion change), median of 5: {statistics.median(live) * 1000:.0f} ms; "
            f"registering a version and moving the alias, median of {len(moves)}: "
            f"{statistics.median(moves) * 1000:.0f} ms (only when the best trial changes: "
            f"{changes} times in this study's {args.trials} trials)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=("pruning", "overhead", "scaling", "extras"))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=240, help="pruning: the equal wall-time budget")
    args = parser.parse_args()
    args.trials = args.trials or {"pruning": 12, "overhead": 3, "scaling": 12, "extras": 4}[args.which]
    {"pruning": pruning, "overhead": overhead, "scaling": scaling, "extras": extras}[args.which](args)


if __name__ == "__main__":
    main()
