"""Train, tune and compare CNNs on CIFAR, every run tracked in MLflow: the `harness` command
(harness/cli.py) and, from Python, these functions (harness/api.py), `harness.train(...)`."""

from harness.api import best, compare, confirm, reproduce, train, trials, tune

__all__ = ["train", "tune", "trials", "best", "compare", "reproduce", "confirm"]
