"""Speed on whatever device this machine has: throughput, time to accuracy, per-trial overhead.

    python benchmarks/gpu.py --data-dir data                       # all three, side by side
    python benchmarks/gpu.py --data-dir data --only accuracy --seed-baseline   # + the seed-style script
    python benchmarks/gpu.py --data-dir data --only accuracy --airbench        # + airbench94 (CUDA)
    python benchmarks/gpu.py --data-dir data --only accuracy --default-epochs 0 --fast-epochs 1  # fixed cost

Named for the GPU, where most studies run, but it measures the device it finds (`--device`):
- throughput: training images/s of the harness loop (`fit`, second epoch) for the default
  network and the fast recipe's, at their own batch sizes;
- accuracy: `harness train` runs (tracking on: what a user waits for) of the default config and
  of the fast recipe at a few epoch budgets: wall time and test accuracy; beside them, on request,
  the seed-style script (`../shared/peers/seed_baseline.py --epochs 3`, CPU) and airbench94
  (`../shared/peers/airbench94.py`, CUDA), both on the same data; and, per `harness train` run,
  the seconds outside training: start-up, setup, test set, embeddings, figures, model;
- overhead: a short study (`training` space, one-epoch trials on 2,000 images, the quick
  profile's evaluation: 2,000 test images, 500 embedding samples) and each trial's run wall time
  less its training time, first trial and median of the rest; the plots every trial must have.
Each section prints its table; every run goes to a temporary store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import config as C
from harness.data import load_dataset, make_splits
from harness.models import build_model
from harness.recipes import config_path
from harness.training import fit, select_device

PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"


def recipes(device: str, profile: str) -> dict[str, C.Config]:
    return {name: C.load(config_path(name), [f"device={device}"], profile=profile) for name in ("default", "fast")}


def throughput(args) -> None:
    print(f"\n## Training throughput ({args.images} images an epoch, second epoch, no tracking)")
    rows = []
    for name, cfg in recipes(args.device, args.profile).items():
        cfg = C.replace(
            cfg,
            {
                "epochs": 2,
                "patience": 0,
                "eval": {"tta": False},
                "data": {"root": args.data_dir, "train_subset": args.images, "val_subset": 1000},
            },
        )
        device = select_device(cfg.device)
        splits = make_splits(load_dataset(cfg.data), cfg.data, device)
        model = build_model(cfg.model, 10).to(device)
        result = fit(model, splits, cfg, device, progress=False)
        rows.append((name, cfg.batch_size, cfg.model.widths, result.history[-1].images_per_s))
    print(f"{'config':<10}{'batch':>7}  {'widths':<18}{'images/s':>10}{'ratio':>8}")
    for name, batch, widths, ips in rows:
        print(f"{name:<10}{batch:>7}  {str(widths):<18}{ips:>10.0f}{ips / rows[0][3]:>8.2f}")


def harness_train(args, config: str, sets: list[str], store: Path) -> dict:
    """One `harness train` in a subprocess: wall time as a user sees it, tracking included."""
    cmd = [
        sys.executable,
        "-m",
        "harness.cli",
        "train",
        "--config",
        config,
        "--data-dir",
        args.data_dir,
        "--tracking-uri",
        f"sqlite:///{store}/mlflow.db",
        "--quiet",
        "--profile",
        args.profile,
        "--set",
        f"device={args.device}",
        *[a for s in sets for a in ("--set", s)],
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"harness train failed: {out.stderr.strip().splitlines()[-1]}")
    from mlflow import MlflowClient

    run_id = out.stdout.split()[1].rstrip(":")
    run = MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(run_id)
    m = run.data.metrics
    return {
        "wall": wall,
        "train": m["train_seconds"],
        "test": m["test_accuracy"],
        "epochs": int(m["epochs_trained"]),
        "stages": {stage: m.get(key, 0.0) for stage, key in FIXED_STAGES.items()},
    }


# what a `harness train` spends besides training, as its run logs it (harness.eval_logging.Stopwatch)
FIXED_STAGES = {
    "setup": "setup_seconds",
    "test set": "eval_test_seconds",
    "embeddings": "eval_embeddings_seconds",
    "figures": "eval_figures_seconds",
    "model": "eval_model_seconds",
}


def print_fixed_costs(rows: list[tuple[str, dict]]) -> None:
    """Seconds outside training per `harness train` run: its logged stages, and start-up (the rest of
    the wall time: interpreter, imports, reading the data, opening the store, ending the run)."""
    print("\nFixed cost outside training (s): start-up = wall - training - the logged stages")
    print(f"{'run':<34}{'train':>7}{'outside':>9}{'start-up':>10}" + "".join(f"{s:>12}" for s in FIXED_STAGES))
    for name, r in rows:
        if "stages" not in r:
            continue
        outside = r["wall"] - r["train"]
        startup = outside - sum(r["stages"].values())
        print(
            f"{name:<34}{r['train']:>7.1f}{outside:>9.1f}{startup:>10.1f}"
            + "".join(f"{v:>12.1f}" for v in r["stages"].values())
        )


def seed_baseline(args) -> dict:
    script = PEERS / "seed_baseline.py"
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), "--data", args.data_dir, "--epochs", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {"wall": wall, "train": sum(r.get("train_s", 0) for r in lines), "test": lines[-1]["test_acc"], "epochs": 3}


def airbench(args, runs: int = 4) -> dict:
    data = Path(tempfile.mkdtemp(prefix="airbench-"))
    subprocess.run([sys.executable, str(PEERS / "airbench_data.py"), args.data_dir, str(data)], check=True)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(PEERS / "airbench94.py")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "AB_DATA": str(data), "AB_RUNS": str(runs)},
        cwd=data,
    )
    wall = time.perf_counter() - start
    mean = [line for line in out.stdout.splitlines() if line.startswith("Mean:")][-1]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") > 6]
    seconds = [float(r[-2]) for r in rows if r[2].strip() == "eval"]
    return {"wall": wall / runs, "train": statistics.mean(seconds), "test": float(mean.split()[1]), "epochs": 10}


def accuracy(args) -> None:
    print(f"\n## Time to accuracy ({args.device}, `harness train` with tracking; test accuracy on 10,000 images)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        if args.seed_baseline:
            rows.append(("seed-style script, 3 epochs", seed_baseline(args)))
        if args.airbench:
            rows.append(("airbench94 (mean of 4 runs)", airbench(args)))
        if args.default_epochs:
            rows.append(
                (
                    f"default config, {args.default_epochs} epochs",
                    harness_train(args, "default", [f"epochs={args.default_epochs}"], Path(d)),
                )
            )
        for epochs in args.fast_epochs:
            rows.append((f"fast recipe, {epochs} epochs", harness_train(args, "fast", [f"epochs={epochs}"], Path(d))))
    print(f"{'run':<34}{'epochs':>7}{'wall s':>9}{'train s':>9}{'test acc':>10}")
    for name, r in rows:
        print(f"{name:<34}{r['epochs']:>7}{r['wall']:>9.1f}{r['train']:>9.1f}{r['test']:>10.4f}")
    print_fixed_costs(rows)
    ref = {name: r for name, r in rows}
    for name, r in rows:
        for other, o in rows:
            if name.startswith("fast") and not other.startswith("fast") and r["test"] >= o["test"]:
                print(
                    f"{name} reaches {other}'s accuracy ({o['test']:.4f}) in {r['wall'] / o['wall']:.2f} of its "
                    f"time ({r['wall']:.0f} s against {o['wall']:.0f} s)"
                )
    return ref


def overhead(args) -> None:
    from mlflow import MlflowClient

    from harness.studies.driver import tune
    from harness.studies.options import TuneOptions

    print(
        f"\n## Per-trial overhead (`training` space, {args.trials} one-epoch trials on 2,000 images, "
        "2,000 test images, 500 embedding samples)"
    )
    budget = [
        "epochs=1",
        "data.train_subset=2000",
        "data.val_subset=2000",
        "data.test_subset=2000",
        "eval.embedding_samples=500",
        f"device={args.device}",
        "patience=0",
    ]
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlruns/mlflow.db"
        opts = TuneOptions(
            study="overhead",
            space="training",
            trials=args.trials,
            storage=f"sqlite:///{d}/optuna.db",
            tracking_uri=uri,
            data_dir=args.data_dir,
            overrides=budget,
            pruner="none",
            sampler="random",
            progress=False,
        )
        start = time.perf_counter()
        study = tune(opts)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        rows = []
        for t in sorted(study.trials, key=lambda t: t.number):
            run = client.get_run(t.user_attrs["mlflow_run_id"])
            run_s = (run.info.end_time - run.info.start_time) / 1000
            train_s = run.data.metrics.get("train_seconds", float("nan"))
            plots = {
                a.path for folder in ("eval", "embeddings") for a in client.list_artifacts(run.info.run_id, folder)
            }
            rows.append(
                (
                    t.number,
                    t.state.name,
                    run_s,
                    train_s,
                    run_s - train_s,
                    len(plots),
                    run.data.metrics.get("evaluation_seconds", float("nan")),
                )
            )
    print(f"{'trial':>5}  {'state':<9}{'run s':>7}{'train s':>9}{'overhead s':>12}{'plots':>7}{'background s':>14}")
    for number, state, run_s, train_s, over, plots, bg in rows:
        print(f"{number:>5}  {state:<9}{run_s:>7.2f}{train_s:>9.2f}{over:>12.2f}{plots:>7d}{bg:>14.2f}")
    later = [r[4] for r in rows[1:]]
    print(
        f"first trial's overhead {rows[0][4]:.2f} s; median of the others {statistics.median(later):.2f} s; "
        f"training share of the study's wall time {sum(r[3] for r in rows) / wall:.0%} ({wall:.0f} s); "
        f"every complete trial has its plots: {all(r[5] >= 6 for r in rows if r[1] == 'COMPLETE')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", default="auto", choices=C.PROFILES, help="the recipes' CPU or GPU sizes")
    parser.add_argument("--only", default="throughput,accuracy,overhead")
    parser.add_argument("--images", type=int, default=10000, help="throughput: training images an epoch")
    parser.add_argument("--default-epochs", type=int, default=15, help="accuracy: the default config's (0: skip)")
    parser.add_argument(
        "--fast-epochs",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=None,
        help="accuracy: the fast recipe's epoch budgets, e.g. 1,4 (default: its profile's)",
    )
    parser.add_argument("--seed-baseline", action="store_true", help="accuracy: run the seed-style script too")
    parser.add_argument("--airbench", action="store_true", help="accuracy: run airbench94 too (CUDA)")
    parser.add_argument("--trials", type=int, default=6, help="overhead: trials of the short study")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.fast_epochs is None:
        args.fast_epochs = [recipes(args.device, args.profile)["fast"].epochs]
    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {device} ({name}), torch {torch.__version__}")
    for section in args.only.split(","):
        {"throughput": throughput, "accuracy": accuracy, "overhead": overhead}[section](args)


if __name__ == "__main__":
    main()
