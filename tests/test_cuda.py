"""The CUDA subset: it runs where a CUDA GPU exists and skips, saying so, everywhere else.

On the GPU the promises that matter most: the training loop reads nothing back from the device
per step, the augmentation's generator lives on the device and repeats with its seed, and a
short run of the fast recipe trains, evaluates and logs there.
"""

from __future__ import annotations

import pytest
import torch

from harness.data import augment, load_dataset, make_splits
from harness.host_reads import HostReads
from harness.models import build_model
from harness.training import fit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the CUDA subset runs on machines with one"
)
CUDA = torch.device("cuda")


def test_augmentation_draws_on_the_gpu_and_repeats_with_its_seed():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    with HostReads() as reads:
        a = augment(x, torch.Generator(device=CUDA).manual_seed(3))
    assert reads.total == 0
    assert torch.equal(a, augment(x, torch.Generator(device=CUDA).manual_seed(3)))
    assert not torch.equal(a, augment(x, torch.Generator(device=CUDA).manual_seed(4)))


def test_an_epoch_on_the_gpu_reads_back_twice(cifar10_root, tiny_config):
    cfg = tiny_config(
        cifar10_root,
        epochs=2,
        batch_size=4,
        device="cuda",
        precision="bf16",
        optimizer="sgd",
        schedule="onecycle",
        lookahead=True,
        eval={"tta": True},
        data={"train_subset": 440, "val_subset": 40},
    )
    ds = load_dataset(cfg.data)
    splits = make_splits(ds, cfg.data, CUDA)
    model = build_model(cfg.model, len(ds.classes)).to(CUDA)
    with HostReads() as reads:
        result = fit(model, splits, cfg, CUDA, progress=False)
    assert reads.total == 2 * cfg.epochs, dict(reads.counts)
    assert result.best_val_accuracy > 0.2


def test_a_fast_recipe_run_trains_and_logs_on_the_gpu(cifar10_root, tracking_uri):
    from mlflow import MlflowClient

    from harness import config as C
    from harness.experiment import run_experiment
    from harness.recipes import config_path

    cfg = C.load(
        config_path("fast"),
        [
            "device=cuda",
            "epochs=2",
            "eval.umap=false",
            "eval.tsne=false",
            "data.download=false",
            "eval.embedding_samples=60",
        ],
        str(cifar10_root),
        profile="full",
    )
    result = run_experiment(cfg, tracking_uri, progress=False)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["device"].startswith("cuda")
    assert run.data.metrics["test_accuracy"] > 0.2
