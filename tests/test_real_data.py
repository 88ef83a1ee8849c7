"""Real CIFAR-10 (HARNESS_TEST_DATA_DIR; .ci/run materializes it): a short run must learn.

One epoch on 10,000 training images with the default network (three conv stages with BatchNorm,
max pooling, a 256-unit head), the default batch size, optimizer and one-cycle schedule, but no
dropout: dropout regularizes the 15-epoch default run and only slows a one-epoch one.
Measured on the JPEG-q75 copy from ../shared/datasets (2000 test images, chance 0.10):
- dropout 0: 0.439-0.486 over 20 seeds (mean 0.457, H200) and 0.45-0.46 on this 2-core CPU;
- default dropout 0.25: 0.33-0.37 on both.
The bound, 0.40, is four times chance and about four standard deviations below the lowest seed.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from harness import config as C
from harness.data import load_dataset
from harness.experiment import run_experiment
from harness.recipes import DEFAULT_CONFIG

pytestmark = [pytest.mark.real_data, pytest.mark.slow]  # a minute and a half on 2 busy cores

BOUND = 0.40


def test_one_epoch_on_10000_real_images_learns(real_data_root, tracking_uri):
    cfg = C.load(
        DEFAULT_CONFIG,
        [
            "epochs=1",
            "model.dropout=0",
            "data.train_subset=10000",
            "data.val_subset=2000",
            "data.test_subset=2000",
            "data.download=false",
            "eval.tsne=false",
            "eval.umap=false",
            "eval.log_model=false",
        ],
        str(real_data_root),
    )
    default = C.load(DEFAULT_CONFIG)
    assert cfg.model.widths == default.model.widths and cfg.batch_size == default.batch_size
    ds = load_dataset(cfg.data)
    assert len(ds.train_labels) == 50000 and len(ds.test_labels) == 10000 and len(ds.classes) == 10
    result = run_experiment(cfg, tracking_uri, progress=False)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    acc = run.data.metrics["test_accuracy"]
    print(
        f"\nreal CIFAR-10, 1 epoch on 10,000 images: test accuracy {acc:.4f} "
        f"({result.fit.history[0].images_per_s:.0f} images/s on {run.data.tags['device']})"
    )
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset_digest"] == ds.digest
    assert acc >= BOUND, f"test accuracy {acc:.4f} < {BOUND} after one epoch on 10,000 real images"
