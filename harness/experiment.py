"""One experiment end to end: data, model, training, evaluation, and all of it in MLflow.

`train_run` is what `harness train`, every study trial and `harness reproduce` call. It ends
the MLflow run FINISHED, FAILED (with the reason) or KILLED (Ctrl-C), keeping what was logged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from analysis.embeddings import DegenerateEmbeddings, plot_embedding_2d, project_tsne, project_umap, sample_indices
from harness import config as C
from harness.data import MEAN, STD, Dataset, load_dataset, make_normalize, make_splits
from harness.evaluation import (EvalResult, class_samples_figure, classification_metrics, confusion_figure,
                                metrics_dict, misclassified_figure, per_class_figure, predict)
from harness.models import CNN, build_model, count_macs, count_parameters
from harness.tracking import RunLogger, client_for, git_commit
from harness.training import Callback, FitResult, fit, seed_everything, select_device, use_bf16


@dataclass
class RunResult:
    run_id: str
    fit: FitResult
    test: EvalResult
    metrics: dict[str, float]
    model: CNN


def run_tags(cfg: C.Config, ds: Dataset, device: torch.device) -> dict[str, str]:
    return {"git_commit": git_commit(), "device": str(device), "seed": cfg.seed,
            "config_hash": C.config_hash(cfg), "dataset": ds.name, "dataset_digest": ds.digest}


def log_setup(run: RunLogger, cfg: C.Config, ds: Dataset, model: CNN, device: torch.device) -> None:
    """What a run is, before it trains: config, data, model size, and a look at the data."""
    run.set_tags(run_tags(cfg, ds, device))
    run.log_params(C.flatten(C.to_dict(cfg)))
    run.log_text(C.to_yaml(cfg), "config.yaml")
    run.log_text(str(model), "model_summary.txt")
    size = {"num_params": count_parameters(model), "macs_per_image": count_macs(model)}
    run.log_params(size)
    run.log_metrics(size)
    # one name per split: MLflow keeps a single input per (name, digest) in a run, so a shared
    # name would drop the testing input; the digest is the whole dataset's, on both
    run.log_dataset(f"{ds.name}-train", ds.digest, ds.train_images, ds.train_labels, cfg.data.root, "training")
    run.log_dataset(f"{ds.name}-test", ds.digest, ds.test_images, ds.test_labels, cfg.data.root, "testing")
    run.log_figure(class_samples_figure(ds.train_images, ds.train_labels, ds.classes, seed=cfg.seed),
                   "data/train_samples.png")


def log_test(run: RunLogger, cfg: C.Config, model: CNN, splits, normalize, ds: Dataset, bf16: bool = False,
             prefix: str = "test_") -> tuple[EvalResult, dict]:
    """Test metrics, confusion matrices, per-class table, mistakes and embedding plots."""
    pred = predict(model, splits.test_x, normalize, embed=True, bf16=bf16)
    result = classification_metrics(pred.logits, splits.test_y.cpu(), splits.classes)
    metrics = metrics_dict(result, prefix=prefix)
    if ds.fine_to_coarse is not None and cfg.data.label == "fine":  # CIFAR-100: superclass accuracy too
        to_coarse = ds.fine_to_coarse
        metrics[f"{prefix}coarse_accuracy"] = float(np.mean(
            to_coarse[result.predictions] == to_coarse[splits.test_y.cpu().numpy()]))
    run.log_metrics(metrics)
    run.log_figure(confusion_figure(result.confusion, splits.classes, normalize=False), "eval/confusion_counts.png")
    run.log_figure(confusion_figure(result.confusion, splits.classes, normalize=True), "eval/confusion_normalized.png")
    run.log_table(result.per_class, "eval/per_class.csv")
    run.log_figure(per_class_figure(result.per_class), "eval/per_class.png")
    test_x = splits.test_x.cpu().numpy()
    labels = splits.test_y.cpu().numpy()
    run.log_figure(misclassified_figure(test_x, labels, result.predictions, result.confidence, splits.classes,
                                        k=cfg.eval.misclassified), "eval/misclassified.png")
    idx = sample_indices(len(labels), cfg.eval.embedding_samples, cfg.seed)
    emb = pred.embeddings.numpy()[idx]
    for name, enabled, project in (("tsne", cfg.eval.tsne, project_tsne), ("umap", cfg.eval.umap, project_umap)):
        if enabled and len(idx) >= 10:
            try:
                xy = project(emb, seed=cfg.seed)
            except DegenerateEmbeddings as e:
                run.set_tags({f"{name}_skipped": str(e)})
                continue
            title = f"{name.upper()} of penultimate-layer embeddings ({len(idx)} test images)"
            run.log_figure(plot_embedding_2d(xy, labels[idx], splits.classes, title), f"embeddings/{name}.png")
    return result, metrics


def log_model(run: RunLogger, cfg: C.Config, model: CNN) -> None:
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    meta = {"input": "float32 (n, 3, 32, 32), pixels/255 normalized by mean and std",
            "mean": list(MEAN), "std": list(STD), "num_classes": model.num_classes,
            "stages": model.stage_names}
    run.log_torch_model(model, example, meta)
    run.log_state_dict(model.state_dict())


def train_run(cfg: C.Config, run: RunLogger, ds: Dataset | None = None, callbacks: list[Callback] = (),
              progress: bool = True, ok_exceptions: tuple[type[BaseException], ...] = (),
              model: CNN | None = None, param_groups=None) -> RunResult:
    """Train and evaluate `cfg` inside the already-created MLflow `run`, then end the run.

    `model` and `param_groups` let transfer start from trained weights with some of them
    frozen or at a smaller learning rate; by default a fresh model is built from `cfg.model`.
    Exceptions in `ok_exceptions` (a study's pruning signal) end the run FINISHED before they
    propagate; Ctrl-C ends it KILLED; anything else FAILED with the reason.
    """
    try:
        ds = ds or load_dataset(cfg.data)
        seed_everything(cfg.seed, cfg.deterministic)
        device = select_device(cfg.device)
        splits = make_splits(ds, cfg.data, device)
        model = (model or build_model(cfg.model, len(ds.classes))).to(device)
        log_setup(run, cfg, ds, model, device)

        def log_epoch(m):
            run.log_metrics(m.as_dict(), step=m.epoch)

        start = time.perf_counter()
        result = fit(model, splits, cfg, device, callbacks=[log_epoch, *callbacks], param_groups=param_groups,
                     progress=progress)
        run.log_metrics({"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                         "epochs_trained": len(result.history), "train_seconds": time.perf_counter() - start})
        run.set_tags({"stopped_early": result.stopped_early})
        normalize = make_normalize(device, cfg.channels_last)
        test, metrics = log_test(run, cfg, model, splits, normalize, ds, use_bf16(device, cfg.precision))
        if cfg.eval.log_model:
            log_model(run, cfg, model)
    except ok_exceptions as e:
        run.set_tags({"stopped_by": type(e).__name__})
        run.end("FINISHED")
        raise
    except KeyboardInterrupt:
        run.end("KILLED", "interrupted by the user (Ctrl-C)")
        raise
    except BaseException as e:
        run.end("FAILED", f"{type(e).__name__}: {e}")
        raise
    run.log_metrics({"tracking_seconds": run.seconds})
    run.end("FINISHED")
    return RunResult(run.run_id, result, test, metrics, model)


def run_experiment(cfg: C.Config, tracking_uri: str | None = None, experiment: str | None = None,
                   progress: bool = True) -> RunResult:
    """`harness train`: one top-level run in the experiment named after the dataset (or given)."""
    ds = load_dataset(cfg.data)  # missing data fails here, before a run exists
    select_device(cfg.device)  # and so does a device this machine lacks
    client = client_for(tracking_uri)
    run = RunLogger.start(client, experiment or f"{cfg.data.dataset}-train", cfg.name)
    return train_run(cfg, run, ds, progress=progress)


def reproduce(run_id: str, tracking_uri: str | None = None, data_dir: str | None = None,
              progress: bool = True) -> tuple[RunResult, dict[str, tuple[float, float]]]:
    """Retrain a run from its logged config and seed into a new run tagged `reproduces`.

    Returns the new run and, per test metric, (original, reproduced). With `deterministic`
    on the CPU the two match exactly.
    """
    from harness.checkpoints import get_run, load_run_config

    client = client_for(tracking_uri)
    original = get_run(client, run_id)
    cfg = load_run_config(client, run_id)
    if data_dir:
        cfg = C.replace(cfg, {"data": {"root": data_dir}})
    ds = load_dataset(cfg.data)
    tags = {"reproduces": run_id}
    if original.data.tags.get("dataset_digest") not in (None, ds.digest):
        tags["dataset_digest_differs"] = "true"  # another copy of the data: expect different figures
    exp_name = client.get_experiment(original.info.experiment_id).name
    run = RunLogger.start(client, exp_name, f"reproduce-{original.info.run_name}", tags=tags)
    result = train_run(cfg, run, ds, progress=progress)
    diffs = {k: (original.data.metrics[k], v) for k, v in result.metrics.items()
             if k in original.data.metrics and not k.startswith(("test_precision_", "test_recall_", "test_f1_"))}
    diffs["best_val_accuracy"] = (original.data.metrics.get("best_val_accuracy", float("nan")),
                                  result.fit.best_val_accuracy)
    return result, diffs
