"""The Python API (harness/api.py): `import harness` stays cheap, settings come as `--set` items or a
dict, and a Config trains as it is. The rest of it runs in docs/tour.ipynb (test_notebook.py) and
under the commands (test_cli.py, test_studies.py, test_confirm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import harness
from harness.api import _sets

ROOT = Path(__file__).resolve().parent.parent

HEAVY = "import harness, sys; print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'pandas') if m in sys.modules))"


def test_import_harness_loads_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", HEAVY], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert callable(harness.train) and callable(harness.reproduce)  # the function, not harness/reproduction.py


def test_settings_as_a_dict_are_the_set_items():
    assert _sets(None) == [] and _sets(["epochs=1"]) == ["epochs=1"]
    items = _sets({"epochs": 2, "model": {"widths": [8, 16]}, "data.download": False, "optimizer": "adamw"})
    assert items == ["epochs=2", "model.widths=[8, 16]", "data.download=false", 'optimizer="adamw"']
    from harness import config as C

    cfg = C.load(None, items)
    assert (cfg.epochs, cfg.model.widths, cfg.data.download, cfg.optimizer) == (2, [8, 16], False, "adamw")


@pytest.mark.slow
def test_a_config_trains_as_it_is_but_for_its_overrides(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config("/nowhere", name="as-given", eval={"figures": False})
    run = harness.train(
        cfg, {"data.test_subset": 50}, data_dir=str(cifar10_root), tracking_uri=tracking_uri, progress=False
    )
    params = MlflowClient(tracking_uri).get_run(run.run_id).data.params
    assert params["name"] == "as-given" and params["data.root"] == str(cifar10_root)
    assert params["data.test_subset"] == "50" and params["optimizer"] == "adamw"  # TINY's, not the default config's
    assert len(run.fit.history) == cfg.epochs and 0 <= run.metrics["test_accuracy"] <= 1
