"""Bring a run back from MLflow: its config, and its model rebuilt from a weights-only checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from harness import config as C
from harness.errors import HarnessError
from harness.models import CNN, build_model


class RunNotFound(HarnessError, LookupError):
    """A run id that the store does not know, or a run without what was asked of it."""


def get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise RunNotFound(
            f"run {run_id} not found in {client.tracking_uri}: check the id "
            "(`harness compare` lists runs) or pass --tracking-uri"
        ) from None


def load_run_config(client: MlflowClient, run_id: str) -> C.Config:
    get_run(client, run_id)
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, "config.yaml", d)
        except (MlflowException, OSError):
            raise RunNotFound(f"run {run_id} has no config.yaml artifact: it was not made by harness") from None
        return C.from_dict(yaml.safe_load(Path(path).read_text()))


def load_run_model(client: MlflowClient, run_id: str, device: str | torch.device = "cpu") -> tuple[C.Config, CNN]:
    """The run's config and its trained CNN, loaded with `torch.load(weights_only=True)`."""
    cfg = load_run_config(client, run_id)
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, "checkpoint/model.pt", d)
        except (MlflowException, OSError):
            raise RunNotFound(
                f"run {run_id} has no model checkpoint (checkpoint/model.pt): it was pruned, "
                "failed, or ran with eval.log_model=false; pick a finished run"
            ) from None
        state = torch.load(path, map_location=device, weights_only=True)
    num_classes = state["classifier.1.weight"].shape[0]
    model = build_model(cfg.model, num_classes).to(device)
    model.load_state_dict(state)
    return cfg, model.eval()
