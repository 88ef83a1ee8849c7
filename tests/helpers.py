"""What the tests and the benchmarks share, importable by both without pytest's conftest.py:
generated CIFAR-10/100 in the official python layouts, fresh MLflow stores, the tiny-run settings,
child-process environments and waits, and a study's folder with `harness` commands run in this process.

    from helpers import tiny_trial, write_cifar10

Generated images are learnable: each class has a colour of its own and a stripe pattern, under
pixel noise, so a tiny CNN trained for an epoch or two beats chance clearly. tests/conftest.py
turns these into fixtures; benchmarks put tests/ on sys.path and import this module.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------
# Generated data in the official layouts


@dataclass
class FakeCifar:
    """What was written: root (the data root) and the arrays as the loader should return them."""

    root: Path
    train_images: np.ndarray  # (n, 3, 32, 32) uint8
    train_labels: np.ndarray  # int64; cifar100: fine labels
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    train_coarse: np.ndarray | None = None  # cifar100 only
    test_coarse: np.ndarray | None = None
    coarse_classes: list[str] | None = None
    fine_to_coarse: np.ndarray | None = None


def class_colours(num_classes: int, seed: int = 1) -> np.ndarray:
    """Well separated colours: a seeded shuffle of a grid of the RGB cube."""
    levels = np.linspace(30, 225, 5).astype(np.int64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    order = np.random.default_rng(seed).permutation(len(grid))
    return grid[order[:num_classes]]


def fake_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator, noise: int = 30) -> np.ndarray:
    """(n, 3, 32, 32) uint8: the class colour, stripes of a class-dependent period, pixel noise."""
    n = len(labels)
    colours = class_colours(num_classes)
    period = 2 + labels % 6  # stripes along rows, so flips and crops keep them
    rows = np.arange(32)
    stripes = ((rows[None, :] // period[:, None]) % 2) * 40 - 20  # (n, 32)
    x = colours[labels][:, :, None, None] + stripes[:, None, :, None]
    x = x + rng.integers(-noise, noise + 1, (n, 3, 32, 32))
    return np.clip(x, 0, 255).astype(np.uint8)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class present (as long as n >= num_classes), in a shuffled order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _rows(images: np.ndarray) -> np.ndarray:
    """(n, 3, 32, 32) -> (n, 3072) rows: 1024 red, then 1024 green, then 1024 blue, as released."""
    return np.ascontiguousarray(images.reshape(len(images), 3072))


def _dump(path: Path, obj: dict, bytes_keys: bool = False) -> None:
    if bytes_keys:  # what a python-2 style pickle looks like when loaded with encoding="bytes"
        obj = {k.encode(): v for k, v in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> FakeCifar:
    """`root/cifar-10-batches-py/`: data_batch_1..5, test_batch, batches.meta, as the official release."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_labels = balanced_labels(n_train, 10, rng)
    train_images = fake_images(train_labels, 10, rng)
    test_labels = balanced_labels(n_test, 10, rng)
    test_images = fake_images(test_labels, 10, rng)
    chunks = np.array_split(np.arange(n_train), 5)
    for b, idx in enumerate(chunks, 1):
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": train_labels[idx].tolist(),
                "data": _rows(train_images[idx]),
                "filenames": [f"{classes[y]}_{i:05d}.png" for i, y in zip(idx, train_labels[idx])],
            },
            bytes_keys=b == 2,
        )
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": _rows(test_images),
            "filenames": [f"{classes[y]}_{i:05d}.png" for i, y in enumerate(test_labels)],
        },
    )
    _dump(folder / "batches.meta", {"label_names": classes, "num_cases_per_batch": len(chunks[0]), "num_vis": 3072})
    return FakeCifar(Path(root), train_images, train_labels, test_images, test_labels, classes)


def write_cifar100(
    root: Path, n_train: int = 500, n_test: int = 200, seed: int = 0, num_fine: int = 100, num_coarse: int = 20
) -> FakeCifar:
    """`root/cifar-100-python/`: train, test (fine and coarse labels), meta (both name lists).
    Fewer classes than the real 100/20 keep the same layout (tests that train many runs)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = [f"fine_{i:02d}" for i in range(num_fine)]
    coarse_names = [f"coarse_{i:02d}" for i in range(num_coarse)]
    # as many fine classes in each superclass (five, as released)
    fine_to_coarse = rng.permutation(np.arange(num_fine) % num_coarse).astype(np.int64)

    def split(n: int, name: str):
        fine = balanced_labels(n, num_fine, rng)
        images = fake_images(fine, num_fine, rng)
        _dump(
            folder / name,
            {
                "filenames": [f"img_{i:05d}.png" for i in range(n)],
                "batch_label": f"{name}ing batch",
                "fine_labels": fine.tolist(),
                "coarse_labels": fine_to_coarse[fine].tolist(),
                "data": _rows(images),
            },
        )
        return images, fine

    train_images, train_fine = split(n_train, "train")
    test_images, test_fine = split(n_test, "test")
    _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return FakeCifar(
        Path(root),
        train_images,
        train_fine,
        test_images,
        test_fine,
        fine_names,
        fine_to_coarse[train_fine],
        fine_to_coarse[test_fine],
        coarse_names,
        fine_to_coarse,
    )


# ----------------------------------------------------------------------------
# Tracking stores and tiny runs


def new_tracking_uri(folder: Path, template: Path | None = None) -> str:
    """`sqlite:///<folder>/mlruns/mlflow.db`, a fresh store (from `template` when given)."""
    import shutil

    (Path(folder) / "mlruns").mkdir(parents=True, exist_ok=True)
    db = Path(folder) / "mlruns" / "mlflow.db"
    if template is not None:
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"


# A config that trains in about a second on a few hundred 32x32 images on one CPU core.
TINY = {
    "name": "tiny",
    "seed": 0,
    "epochs": 1,
    "batch_size": 32,
    "device": "cpu",
    "precision": "fp32",
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.0,
    "schedule": "none",
    "patience": 0,
    "model": {"widths": [8, 16], "head_width": 16, "dropout": 0.0},
    "data": {"download": False, "test_subset": None},
    "eval": {"tsne": False, "umap": False, "embedding_samples": 60, "misclassified": 4, "log_model": False},
}


def make_tiny_config(root, *sets: str, **overrides):
    """A fast Config on the data root `root`: TINY, then nested-dict `overrides`
    (`model={"widths": [8]}`), then `key=value` strings like the CLI's --set."""
    from harness import config as C

    d = C.merge(TINY, {"data": {"root": str(root)}})
    d = C.merge(d, overrides)
    if sets:
        d = C.merge(d, C.parse_overrides(list(sets)))
    return C.from_dict(d)


# a study's search space of four parameters, one conditional
TINY_SPACE = """\
params:
  optimizer: {type: categorical, choices: [adamw, sgd]}
  lr: {type: float, low: 0.005, high: 0.05, log: true}
  momentum: {type: float, low: 0.8, high: 0.95, if: {optimizer: sgd}}
  model.dropout: {type: float, low: 0.0, high: 0.2}
"""

# `--set` items of a run (a study trial, a `harness train`) of a second or two on the generated data:
# its size and what it evaluates, the optimizer left to the config or the space
TINY_TRIAL = [
    "epochs=2",
    "batch_size=32",
    "model.widths=[8,16]",
    "data.train_subset=200",
    "data.val_subset=100",
    "data.test_subset=100",
    "eval.tsne=false",
    "eval.umap=false",
    "eval.figures=false",
    "eval.log_model=false",
    "data.download=false",
    "device=cpu",
    "precision=fp32",
    "patience=0",
]


def tiny_trial(*changes: str, drop: tuple[str, ...] = ()) -> list[str]:
    """TINY_TRIAL with `key=value` items replacing (or adding to) its own, and the keys in `drop`
    left to the config: tiny_trial("epochs=4"), tiny_trial(drop=("model.widths",))."""
    keys = {c.split("=", 1)[0] for c in changes} | set(drop)
    return [s for s in TINY_TRIAL if s.split("=", 1)[0] not in keys] + list(changes)


def as_sets(items: list[str]) -> list[str]:
    """["epochs=1", ...] -> ["--set", "epochs=1", ...]"""
    return [a for item in items for a in ("--set", item)]


# ----------------------------------------------------------------------------
# Real processes


def harness_env() -> dict:
    """A child `harness` process: one thread (float sums come out the same), no inherited run id."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def wait_until(condition, what: str, procs=(), logs=(), timeout: float = 300.0):
    """Poll `condition` until it returns something true, and return that; fail, showing the
    processes' output, if one of them ends first or `timeout` seconds pass (a bound, not a measure)."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    pytest.fail(
        f"no {what} (a process ended, or {timeout:.0f} s passed):\n"
        + "\n".join(f"--- {Path(log).name}\n{Path(log).read_text()[-3000:]}" for log in logs)
    )


# ----------------------------------------------------------------------------
# A real Slurm (tests/test_slurm.py, benchmarks/chaos.py --faults slurm)

# the states a job ends in (a preempted task of a requeueing job is pending again, not ended)
SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def slurm_jobs(job: str) -> dict[str, dict]:
    """`scontrol show job` of a job (each array task of an array), by array task id ("" for a plain job)."""
    import subprocess

    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    jobs = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        task = fields.get("ArrayTaskId", "")
        if task.isdigit() or "ArrayTaskId" not in fields:  # (an array's pending remainder reads 0-1)
            jobs[task] = fields
    return jobs


# ----------------------------------------------------------------------------
# A study's folder


class StudyEnv:
    """One folder's study stores (an Optuna SQLite storage; an MLflow SQLite store, a copy of the
    migrated empty `template` when given), its search space and base config, and `harness`
    commands in this process. `fixed`: the trials' `--set` items; `options`: more of every tune's;
    `name`: the study the lookups default to."""

    def __init__(
        self,
        tmp: Path,
        data: Path,
        space: str,
        fixed: list[str],
        template: Path | None = None,
        config: str | None = None,
        options: tuple[str, ...] = (),
        name: str | None = None,
    ):
        self.tmp, self.data, self.fixed, self.options, self.name = Path(tmp), data, list(fixed), list(options), name
        self.storage = f"sqlite:///{self.tmp / 'optuna.db'}"
        self.tracking = new_tracking_uri(self.tmp, template)
        self.space = self.tmp / "space.yaml"
        self.space.write_text(space)
        self.config = None
        if config is not None:
            self.config = self.tmp / "base.yaml"
            self.config.write_text(config)

    def stores(self) -> list[str]:
        return ["--storage", self.storage, "--tracking-uri", self.tracking]

    def tune_args(self, study: str, trials: int, *extra: str, fixed: list[str] | None = None) -> list[str]:
        config = ["--config", str(self.config)] if self.config else []
        return [
            "tune",
            "--study",
            study,
            "--space",
            str(self.space),
            *config,
            "--trials",
            str(trials),
            *self.stores(),
            "--data-dir",
            str(self.data),
            "--quiet",
            *self.options,
            *extra,
            *as_sets(self.fixed if fixed is None else fixed),
        ]

    def tune(self, study: str, trials: int, *extra: str, fixed: list[str] | None = None) -> int:
        from harness.cli import main

        return main(self.tune_args(study, trials, *extra, fixed=fixed))

    def tune_output(self, capsys, study: str, trials: int, *extra: str, fixed=None) -> tuple[int, str, str]:
        """`tune`, and what it printed (capsys or capfd)."""
        return self.cli(capsys, *self.tune_args(study, trials, *extra, fixed=fixed))

    def cli(self, capsys, *args: str) -> tuple[int, str, str]:
        from harness.cli import main

        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    def study(self, name: str | None = None):
        import optuna

        return optuna.load_study(study_name=name or self.name, storage=self.storage)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking)

    def runs(self, name: str | None = None, kind: str | None = None) -> list:
        """The runs of a study's experiment, of one `run_kind` (study, trial, confirmation) or all."""
        client = self.client()
        exp = client.get_experiment_by_name(name or self.name)
        where = f"tags.run_kind = '{kind}'" if kind else ""
        return client.search_runs([exp.experiment_id], where, max_results=1000)

    def run_of(self, trial):
        return self.client().get_run(trial.user_attrs["mlflow_run_id"])

    def study_run(self, name: str | None = None):
        return self.client().get_run(self.study(name).user_attrs["mlflow_parent_run_id"])
