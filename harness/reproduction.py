"""`harness reproduce RUN [--seeds N]`: is a run's accuracy what its config gives, or a lucky seed?

With no seeds the run is retrained once with its own seed, and each metric compared with the original.

The run's config is retrained with N new seeds (model initialization and data order; the same
train/validation split), each a run tagged `reproduces`; the report gives, per metric, the
seeds' mean with its 95% t interval, their spread, and the 95% prediction interval, where one
more seed would fall: an original value outside it was unusual for its config (docs/uncertainty.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.uncertainty import mean_interval, prediction_interval

METRICS = ("best_val_accuracy", "test_accuracy")


@dataclass
class SeedReport:
    runs: pd.DataFrame  # the new runs: seed, run_id, one column per metric
    # per metric: with new seeds, original, n, mean, interval, sd, min, max, prediction interval, inside;
    # retrained once with the run's own seed, original, reproduced, difference
    table: pd.DataFrame


def new_seeds(base_seed: int, n: int) -> list[int]:
    """N seeds a run was not trained with: base+1..base+N (model initialization and data order; the
    train/validation split has a seed of its own). `harness confirm` uses the same."""
    return [base_seed + 1 + i for i in range(n)]


def reproduce_once(
    run_id: str, tracking_uri: str | None = None, data_dir: str | None = None, progress: bool = True
) -> SeedReport:
    """Retrain `run_id` with its own seed and compare each test metric (and the best validation
    accuracy) with the original's: with `deterministic` on the CPU the differences are zero."""
    from harness.experiment import reproduce
    from harness.tracking import client_for

    result, diffs = reproduce(run_id, tracking_uri, data_dir, progress=progress)
    seed = int(client_for(tracking_uri).get_run(result.run_id).data.tags["seed"])
    table = pd.DataFrame(
        [{"metric": k, "original": a, "reproduced": b, "difference": b - a} for k, (a, b) in diffs.items()]
    )
    return SeedReport(pd.DataFrame([_row(result, seed)]), table)


def reproduce_seeds(
    run_id: str, seeds: int, tracking_uri: str | None = None, data_dir: str | None = None, progress: bool = True
) -> SeedReport:
    """Retrain `run_id`'s config with seeds base+1..base+N and compare the original with them."""
    from harness.checkpoints import get_run, load_run_config
    from harness.config import ConfigError

    if seeds < 2:
        raise ConfigError(f"--seeds {seeds}: a distribution needs at least 2 seeds")
    from harness.experiment import reproduce
    from harness.tracking import client_for

    client = client_for(tracking_uri)
    original = get_run(client, run_id).data.metrics
    base = load_run_config(client, run_id).seed
    rows = []
    for seed in new_seeds(base, seeds):
        result, _ = reproduce(run_id, tracking_uri, data_dir, progress=progress, seed=seed)
        rows.append(_row(result, seed))
    runs = pd.DataFrame(rows)
    return SeedReport(runs, seed_table(runs, original))


def _row(result, seed: int) -> dict:
    return {
        "seed": seed,
        "run_id": result.run_id,
        "best_val_accuracy": result.fit.best_val_accuracy,
        "test_accuracy": result.metrics.get("test_accuracy"),
    }


def seed_table(runs: pd.DataFrame, original: dict[str, float]) -> pd.DataFrame:
    rows = []
    for metric in METRICS:
        values = runs[metric].dropna().tolist()
        s, (low, high) = mean_interval(values), prediction_interval(values)
        value = original.get(metric)
        rows.append(
            {
                "metric": metric,
                "original": value,
                "n": s.n,
                "mean": s.mean,
                "ci_low": s.low,
                "ci_high": s.high,
                "sd": s.std,
                "min": min(values, default=None),
                "max": max(values, default=None),
                "predict_low": low,
                "predict_high": high,
                "original_inside": None if value is None or s.n < 2 else bool(low <= value <= high),
            }
        )
    return pd.DataFrame(rows)
