"""One short experiment into a temporary real MLflow store, checked end to end; and the ways a run
can end early (FAILED with the reason, KILLED with what was logged kept, refused before it exists)."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.image import imread
from mlflow import MlflowClient

from harness import config as C
from harness.checkpoints import load_run_model
from harness.config import ConfigError
from harness.data import DatasetError, load_dataset, make_normalize
from harness.experiment import run_experiment, train_run
from harness.tracking import RunLogger, client_for
from harness.training import NonFiniteLoss

EPOCH_METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_s", "epoch_seconds"]
ARTIFACTS = [
    "config.yaml",
    "model_summary.txt",
    "data/train_samples.png",
    "eval/confusion_counts.png",
    "eval/confusion_normalized.png",
    "eval/per_class.csv",
    "eval/per_class.png",
    "eval/misclassified.png",
    "embeddings/tsne.png",
    "embeddings/umap.png",
    "checkpoint/model.pt",
]


def all_runs(uri: str):
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


# ----------------------------------------------------------------------------
# One full run, shared by the tests below


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, cifar10_root, empty_mlflow_db):
    """Two epochs on the generated CIFAR-10 with every output on: t-SNE, UMAP and the logged model."""
    from helpers import make_tiny_config, new_tracking_uri

    tmp = tmp_path_factory.mktemp("train_run")
    uri = new_tracking_uri(tmp, empty_mlflow_db)
    cfg = make_tiny_config(
        cifar10_root,
        name="e2e",
        epochs=2,
        eval={"tsne": True, "umap": True, "log_model": True, "embedding_samples": 80},
    )
    result = run_experiment(cfg, uri, progress=False)
    client = MlflowClient(uri)
    return {
        "cfg": cfg,
        "uri": uri,
        "result": result,
        "client": client,
        "run": client.get_run(result.run_id),
        "tmp": tmp,
    }


@pytest.mark.slow
def test_run_finished_in_the_dataset_experiment(e2e):
    run = e2e["run"]
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    assert e2e["client"].get_experiment(run.info.experiment_id).name == "cifar10-train"
    assert run.info.run_name == "e2e"
    # artifacts live beside the temporary store, not in the project's mlruns/
    assert run.info.artifact_uri.startswith(str(e2e["tmp"]))


@pytest.mark.slow
def test_params_are_the_flattened_config(e2e):
    params, cfg = e2e["run"].data.params, e2e["cfg"]
    flat = C.flatten(C.to_dict(cfg))
    for key, value in flat.items():
        assert params[key] == str(value), key
    assert params["model.widths"] == "[8, 16]" and params["data.root"] == str(cfg.data.root)
    assert int(params["num_params"]) == int(e2e["run"].data.metrics["num_params"]) > 0
    assert int(params["macs_per_image"]) > 0


@pytest.mark.slow
def test_tags_identify_code_device_seed_config_and_data(e2e):
    tags, cfg = e2e["run"].data.tags, e2e["cfg"]
    commit = tags["git_commit"]
    assert commit == "unknown" or (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit))
    assert tags["device"] == "cpu"
    assert tags["seed"] == str(cfg.seed)
    assert tags["config_hash"] == C.config_hash(cfg)
    assert tags["dataset"] == "cifar10"
    assert tags["dataset_digest"] == load_dataset(cfg.data).digest
    assert tags["stopped_early"] == "False"


@pytest.mark.slow
def test_per_epoch_metrics_history(e2e):
    client, run_id = e2e["client"], e2e["result"].run_id
    history = e2e["result"].fit.history
    for key in EPOCH_METRICS:
        logged = client.get_metric_history(run_id, key)
        assert [m.step for m in sorted(logged, key=lambda m: m.step)] == [1, 2], key
        expected = [getattr(h, key) for h in history]
        assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(expected), key
    metrics = e2e["run"].data.metrics
    assert metrics["epochs_trained"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["best_val_accuracy"] == pytest.approx(e2e["result"].fit.best_val_accuracy)
    assert metrics["train_seconds"] > 0 and metrics["tracking_seconds"] > 0


@pytest.mark.slow
def test_test_metrics_with_per_class_values(e2e):
    metrics, result = e2e["run"].data.metrics, e2e["result"]
    for key in (
        "test_accuracy",
        "test_loss",
        "test_top5_accuracy",
        "test_macro_precision",
        "test_macro_recall",
        "test_macro_f1",
    ):
        assert metrics[key] == pytest.approx(result.metrics[key]), key
    for name in load_dataset(e2e["cfg"].data).classes:
        for kind in ("precision", "recall", "f1"):
            assert 0 <= metrics[f"test_{kind}_{name}"] <= 1
    assert metrics["test_accuracy"] >= 0.35  # it learned: chance is 0.10
    assert metrics["test_top5_accuracy"] >= metrics["test_accuracy"]
    assert math.isfinite(metrics["test_loss"])


@pytest.mark.slow
def test_artifacts_figures_and_table(e2e, tmp_path):
    client, run_id = e2e["client"], e2e["result"].run_id
    paths = artifact_paths(client, run_id)
    assert set(ARTIFACTS) <= set(paths), sorted(set(ARTIFACTS) - set(paths))
    for png in (p for p in ARTIFACTS if p.endswith(".png")):
        image = imread(download(client, run_id, png, tmp_path))
        assert image.ndim == 3 and min(image.shape[:2]) > 100, png
        assert image.std() > 0.01, f"{png} is blank"
    table = pd.read_csv(download(client, run_id, "eval/per_class.csv", tmp_path))
    classes = load_dataset(e2e["cfg"].data).classes
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert table["class"].tolist() == classes
    assert table["support"].sum() == 200  # every test image
    recall = dict(zip(table["class"], table["recall"]))
    assert e2e["run"].data.metrics["test_recall_cat"] == pytest.approx(recall["cat"])
    logged = yaml.safe_load(download(client, run_id, "config.yaml", tmp_path).read_text())
    assert C.from_dict(logged) == e2e["cfg"]


@pytest.mark.slow
def test_dataset_inputs_carry_our_digest(e2e):
    inputs = e2e["run"].inputs.dataset_inputs
    digest = e2e["run"].data.tags["dataset_digest"]
    contexts = {}
    for i in inputs:
        tags = {t.key: t.value for t in i.tags}
        contexts[tags["mlflow.data.context"]] = i.dataset
    assert set(contexts) == {"training", "testing"}
    assert all(d.digest == digest for d in contexts.values())
    assert '"features_shape": [600, 3, 32, 32]' in contexts["training"].profile
    assert '"features_shape": [200, 3, 32, 32]' in contexts["testing"].profile


def _inputs(n: int = 16) -> torch.Tensor:
    ds_images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return make_normalize("cpu")(ds_images)


def test_fixed_costs_are_logged_by_stage(e2e):
    """What a run spends besides training, stage by stage (benchmarks/gpu.py prints them)."""
    metrics = e2e["run"].data.metrics
    for stage in ("setup", "eval_test", "eval_figures", "eval_embeddings", "eval_model"):
        assert metrics[f"{stage}_seconds"] > 0, stage


@pytest.mark.slow
def test_logged_model_loads_and_predicts_like_the_trained_one(e2e):
    client_for(e2e["uri"])  # the fluent tracking URI that runs:/ resolves against
    run_id = e2e["result"].run_id
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    trained = e2e["result"].model.eval()
    x = _inputs()
    with torch.no_grad():
        expected = trained(x)
        assert torch.allclose(loaded.eval()(x), expected, atol=1e-5)
    assert type(loaded).__name__ == "CNN" and loaded.stage_names == ["stage1", "stage2"]
    # the generic pyfunc flavour, fed a numpy batch as described by the input example, agrees
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature is not None and info.metadata["num_classes"] == 10
    assert info.signature.to_dict() == mlflow.models.infer_signature(x.numpy(), expected.numpy()).to_dict()
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    out = np.asarray(pyfunc.predict(x.numpy()))
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_checkpoint_round_trip(e2e):
    cfg, model = load_run_model(e2e["client"], e2e["result"].run_id)
    assert cfg == e2e["cfg"]
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(x), e2e["result"].model.eval()(x), atol=1e-6)
    trained = e2e["result"].model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------
# Other datasets and the ways a run ends early


@pytest.mark.slow
def test_cifar100_run_logs_coarse_accuracy(cifar100_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar100_root, "data.dataset=cifar100", eval={"figures": False})  # 100-class figures: seconds
    result = run_experiment(cfg, tracking_uri, progress=False)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert MlflowClient(tracking_uri).get_experiment(run.info.experiment_id).name == "cifar100-train"
    m = run.data.metrics
    assert m["test_coarse_accuracy"] >= m["test_accuracy"]  # a right fine label is a right superclass
    assert "test_f1_fine_99" in m and len(result.test.per_class) == 100


def test_figures_off_keeps_the_metrics_and_tables(cifar10_root, tracking_uri, tiny_config, tmp_path):
    cfg = tiny_config(cifar10_root, eval={"figures": False})
    result = run_experiment(cfg, tracking_uri, progress=False)
    client = MlflowClient(tracking_uri)
    paths = artifact_paths(client, result.run_id)
    assert {"eval/per_class.csv", "eval/confusion.csv"} <= set(paths)
    assert not [p for p in paths if p.startswith(("eval/", "data/")) and p.endswith(".png")], paths
    assert "test_accuracy" in client.get_run(result.run_id).data.metrics
    confusion = pd.read_csv(download(client, result.run_id, "eval/confusion.csv", tmp_path), index_col=0)
    assert confusion.to_numpy().sum() == len(result.test.predictions)  # every test image, true class by row


def test_non_finite_loss_ends_the_run_failed_with_the_reason(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, optimizer="sgd", lr=1e30, epochs=2)
    with pytest.raises(NonFiniteLoss):
        run_experiment(cfg, tracking_uri, progress=False)
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    error = run.data.tags["error"]
    assert error.startswith("NonFiniteLoss: non-finite training loss") and "lr=1e+30" in error
    assert "\n" not in error
    assert run.data.tags["mlflow.note.content"].startswith("FAILED: NonFiniteLoss")
    assert run.data.params["lr"] == "1e+30"  # what was logged before the failure is kept
    assert "test_accuracy" not in run.data.metrics


def test_ctrl_c_ends_the_run_killed_keeping_its_metrics(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, epochs=4, data={"train_subset": 96, "val_subset": 32})
    client = client_for(tracking_uri)
    run = RunLogger.start(client, "interrupts", "ctrl-c")

    def interrupt(m):
        if m.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, callbacks=[interrupt], progress=False)
    info = client.get_run(run.run_id)
    assert info.info.status == "KILLED" and info.info.end_time is not None
    assert "Ctrl-C" in info.data.tags["error"]
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_accuracy")) == [1, 2]
    assert "config.yaml" in artifact_paths(client, run.run_id)
    assert info.data.tags["config_hash"] == C.config_hash(cfg)


def test_an_expected_stop_ends_the_run_finished(cifar10_root, tracking_uri, tiny_config):
    """What a study's pruning signal does: FINISHED, tagged with what stopped it, then re-raised."""

    class Pruned(Exception):
        pass

    cfg = tiny_config(cifar10_root, epochs=3, data={"train_subset": 64, "val_subset": 32})
    client = client_for(tracking_uri)
    run = RunLogger.start(client, "prunes", "pruned")

    def prune(m):
        raise Pruned

    with pytest.raises(Pruned):
        train_run(cfg, run, callbacks=[prune], progress=False, ok_exceptions=(Pruned,))
    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED" and info.data.tags["stopped_by"] == "Pruned"
    assert len(client.get_metric_history(run.run_id, "val_accuracy")) == 1


def test_a_multi_line_error_keeps_its_type_in_the_runs_error_tag(cifar10_root, tracking_uri, tiny_config):
    cfg = tiny_config(cifar10_root, data={"train_subset": 64, "val_subset": 32})
    client = client_for(tracking_uri)
    run = RunLogger.start(client, "errors", "multi-line")

    def fail(m):
        raise ValueError("a first line of context\nand the line that says what went wrong")

    with pytest.raises(ValueError):
        train_run(cfg, run, callbacks=[fail], progress=False)
    info = client.get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags["error"] == "ValueError: and the line that says what went wrong"


def test_logging_the_model_leaves_the_callers_model_as_it_was(cifar10_root, tracking_uri, tiny_config):
    from harness.eval_logging import log_model
    from harness.models import build_model

    cfg = tiny_config(cifar10_root)
    model = build_model(cfg.model, 10).to(memory_format=torch.channels_last).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log_model(RunLogger.start(client_for(tracking_uri), "models", "logged"), cfg, model)
    assert model.training and model.stages.stage1.block.convs[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )  # not switched to eval mode or to another layout in place
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_config_fails_before_any_run_exists(cifar10_root, tracking_uri, tmp_path):
    with pytest.raises(ConfigError):
        C.load(None, ["epochs=abc", f"data.root={cifar10_root}"])  # before anything runs
    # data and device are checked before the run is created, too
    with pytest.raises(DatasetError):
        run_experiment(C.load(None, [f"data.root={tmp_path / 'none'}", "data.download=false"]), tracking_uri)
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ConfigError):
        run_experiment(C.load(None, [f"data.root={cifar10_root}", f"device={missing}"]), tracking_uri)
    assert all_runs(tracking_uri) == []
