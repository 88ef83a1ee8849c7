"""How long `harness` takes to answer what needs no training: help and bad input, beside the imports
that a run needs (torch, MLflow, a study worker's modules), in one run on this machine.

    python benchmarks/startup.py [--repeats 3]

Each command runs in a fresh process in an empty folder (it must leave it empty); the table gives the
median wall time of `--repeats` runs and its ratio to the worker's imports.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = [sys.executable]
CASES = {
    "harness --help": ["-m", "harness.cli", "--help"],
    "harness train --set nope=1": ["-m", "harness.cli", "train", "--set", "nope=1"],
    "harness train --set epochs=many": ["-m", "harness.cli", "train", "--set", "epochs=many"],
    "harness tune --space nope": ["-m", "harness.cli", "tune", "--study", "s", "--space", "nope"],
    "import torch": ["-c", "import torch"],
    "import mlflow": ["-c", "import mlflow"],
    "import a study worker's modules": ["-c", "import harness.studies.worker"],
}
REFERENCE = "import a study worker's modules"


def seconds(args: list[str], folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(PYTHON + args, cwd=folder, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if any(folder.iterdir()):
        raise SystemExit(f"{' '.join(args)} left files in its folder: {sorted(p.name for p in folder.iterdir())}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        medians = {
            name: statistics.median(seconds(a, folder) for _ in range(args.repeats)) for name, a in CASES.items()
        }
    print(f"| what | median s ({args.repeats} runs) | x of the worker's imports |")
    print("|---|--:|--:|")
    for name, s in medians.items():
        print(f"| `{name}` | {s:.2f} | {s / medians[REFERENCE]:.2f} |")


if __name__ == "__main__":
    main()
