"""What a trained run logs about its model: test metrics and tables, figures, embeddings, the model.

harness/evaluation.py computes (inference, metrics, figures) and knows no MLflow; this module
runs it on a run's test set and logs the results to the run. `log_evaluation` is the one entry:
`train_run` calls it before its run ends, a study's finisher (harness/finisher.py) after.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness import config as C
from harness.data import MEAN, STD, Dataset, make_normalize
from harness.embeddings import DegenerateEmbeddings, plot_embedding_2d, project_tsne, project_umap, sample_indices
from harness.evaluation import (
    EvalResult,
    class_samples_figure,
    classification_metrics,
    confusion_figure,
    metrics_dict,
    misclassified_figure,
    per_class_figure,
    predict,
)
from harness.models import CNN
from harness.tracking import RunLogger
from harness.training import use_bf16
from harness.uncertainty import interval_metrics


@dataclass
class Stopwatch:
    """Seconds per stage of what a run does besides training, logged as `<prefix><stage>_seconds`:
    where its fixed cost goes (`benchmarks/gpu.py` prints them)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{stage}_seconds": s for stage, s in self.seconds.items()}


def log_evaluation(
    run: RunLogger, cfg: C.Config, model: CNN, ds: Dataset, test_x: torch.Tensor, test_y: torch.Tensor
) -> tuple[EvalResult, dict]:
    """Everything a trained run logs about its model: the test set's metrics and figures, the
    embedding plots, a look at the data, and the model itself. `test_x`, `test_y` on the model's device.

    The figures go in one request at the end; the seconds of each stage (test, embeddings,
    figures, model) are logged as `eval_<stage>_seconds`.
    """
    clock = Stopwatch()
    test, metrics, figures = log_test(run, cfg, model, ds, test_x, test_y, clock)
    with clock("figures"):
        if cfg.eval.figures:
            figures["data/train_samples.png"] = class_samples_figure(
                ds.train_images, ds.train_labels, ds.classes, seed=cfg.seed
            )
        run.log_figures(figures)
    if cfg.eval.log_model:
        with clock("model"):
            log_model(run, cfg, model)
    run.log_metrics(clock.metrics("eval_"))
    return test, metrics


def log_test(
    run: RunLogger, cfg: C.Config, model: CNN, ds: Dataset, test_x: torch.Tensor, test_y: torch.Tensor, clock: Stopwatch
) -> tuple[EvalResult, dict, dict[str, Figure]]:
    """Test metrics (`test_*`, CIFAR-100's superclass accuracy too), confusion matrix and per-class
    table (logged), and the figures of the test set and its embeddings (returned by artifact path,
    for the caller to log at once). One pass over the test set gives both the logits and the embeddings."""
    bf16 = use_bf16(test_x.device, cfg.precision)
    with clock("test"):
        normalize = make_normalize(test_x.device, cfg.channels_last)
        pred = predict(model, test_x, normalize, embed=True, bf16=bf16, tta=cfg.eval.tta).cpu()
        labels = test_y.cpu().numpy()
        result = classification_metrics(pred.logits, test_y.cpu(), ds.classes)
        metrics = metrics_dict(result, prefix="test_")
        metrics.update(interval_metrics("test_accuracy", metrics["test_accuracy"], len(labels)))
        if ds.fine_to_coarse is not None and cfg.data.label == "fine":  # CIFAR-100: superclass accuracy too
            to_coarse = ds.fine_to_coarse
            metrics["test_coarse_accuracy"] = float(np.mean(to_coarse[result.predictions] == to_coarse[labels]))
        run.log_metrics(metrics)
        run.log_table(result.per_class, "eval/per_class.csv")
        run.log_table(
            pd.DataFrame(result.confusion, index=ds.classes, columns=ds.classes).rename_axis("true"),
            "eval/confusion.csv",
        )
    figures = {}
    if cfg.eval.figures:
        with clock("figures"):
            figures.update(test_figures(result, test_x, labels, ds.classes, cfg.eval.misclassified))
    figures.update(embedding_figures(run, cfg, pred.embeddings.numpy(), labels, ds.classes, clock))
    return result, metrics, figures


def test_figures(
    result: EvalResult, test_x: torch.Tensor, labels: np.ndarray, classes: list[str], misclassified: int
) -> dict[str, Figure]:
    """Confusion matrices (counts, row-normalised), per-class chart and the most confident mistakes."""
    return {
        "eval/confusion_counts.png": confusion_figure(result.confusion, classes, normalize=False),
        "eval/confusion_normalized.png": confusion_figure(result.confusion, classes, normalize=True),
        "eval/per_class.png": per_class_figure(result.per_class),
        "eval/misclassified.png": misclassified_figure(
            test_x.cpu().numpy(), labels, result.predictions, result.confidence, classes, k=misclassified
        ),
    }


def embedding_figures(
    run: RunLogger, cfg: C.Config, embeddings: np.ndarray, labels: np.ndarray, classes: list[str], clock: Stopwatch
) -> dict[str, Figure]:
    """t-SNE and UMAP plots of `cfg.eval.embedding_samples` test embeddings; a projection the
    embeddings cannot have (a dead network) is skipped with a tag saying why."""
    idx = sample_indices(len(labels), cfg.eval.embedding_samples, cfg.seed)
    emb = embeddings[idx]
    figures = {}
    for name, enabled, project in (("tsne", cfg.eval.tsne, project_tsne), ("umap", cfg.eval.umap, project_umap)):
        if enabled and len(idx) >= 10:
            try:
                with clock("embeddings"):
                    xy = project(emb, seed=cfg.seed)
            except DegenerateEmbeddings as e:
                run.set_tags({f"{name}_skipped": str(e)})
                continue
            title = f"{name.upper()} of penultimate-layer embeddings ({len(idx)} test images)"
            with clock("figures"):
                figures[f"embeddings/{name}.png"] = plot_embedding_2d(xy, labels[idx], classes, title)
    return figures


def log_model(run: RunLogger, cfg: C.Config, model: CNN) -> None:
    """The MLflow model and a weights-only checkpoint, from a CPU copy: the caller's model stays
    where it is (a transfer or a latency measurement may still use it). The signature is the
    one MLflow would infer, given rather than inferred by running the model."""
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, model.num_classes), dtype=np.float32))
    meta = {
        "input": "float32 (n, 3, 32, 32), pixels/255 normalized by mean and std",
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": model.num_classes,
        "stages": model.stage_names,
    }
    run.log_torch_model(model, example, meta, signature=signature)
    run.log_state_dict(model.state_dict())
