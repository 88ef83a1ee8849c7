"""Evaluation: batched inference, classification metrics and diagnostic figures.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot, so
they never enter pyplot's global figure registry: nothing leaks across the many
runs of an Optuna study and no backend has to be chosen (they save with Agg). Callers log them
(`RunLogger.log_figures`, all of a run's in one request) and may `plt.close(fig)` them; that is
harmless either way.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# Above this many classes, figures drop per-cell annotations and shrink tick labels.
MANY_CLASSES = 20


# ----------------------------------------------------------------------------
# Inference


@dataclass(frozen=True, eq=False)
class Predictions:
    logits: torch.Tensor  # (n, C) float32, on the images' device
    embeddings: torch.Tensor | None  # (n, d) float32, on the images' device; only when embed=True

    def cpu(self) -> "Predictions":
        return Predictions(self.logits.cpu(), self.embeddings.cpu() if self.embeddings is not None else None)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int | None = None,
    embed: bool = False,
    bf16: bool | None = None,
    tta: bool = False,
) -> Predictions:
    """Run `model` in eval mode over uint8 `images` (already on the model's device).

    Batches keep memory bounded: by default 256 images on a CPU, where they keep the activations
    in cache (1.5x as fast as 1,000), 1,000 elsewhere. bf16 autocast is used when `bf16` is set
    (default: on CUDA).
    Results stay on the device, so evaluating during training reads nothing back per batch;
    call `.cpu()` on them once. With `tta`, logits are averaged over each image and its mirror
    image (embeddings are the plain image's). The model's previous train/eval mode is restored,
    so this is safe to call mid-training.
    """
    device_type = images.device.type
    batch_size = batch_size or (256 if device_type == "cpu" else 1000)
    was_training = model.training
    model.eval()
    logits, embeddings = [], []
    try:
        for batch in images.split(batch_size):
            with torch.autocast(
                device_type=device_type, dtype=torch.bfloat16, enabled=device_type == "cuda" if bf16 is None else bf16
            ):
                x = normalize(batch)
                if embed:
                    out, emb = model.forward_with_embedding(x)
                    embeddings.append(emb.float())
                else:
                    out = model(x)
                out = out.float()
                if tta:
                    out = (out + model(x.flip(3)).float()) / 2
            logits.append(out)
    finally:
        model.train(was_training)
    return Predictions(
        logits=torch.cat(logits),
        embeddings=torch.cat(embeddings) if embed else None,
    )


# ----------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True, eq=False)
class EvalResult:
    loss: float  # mean cross entropy
    accuracy: float
    top5_accuracy: float  # top-min(5, C)
    confusion: np.ndarray  # (C, C) counts, rows = true class, cols = predicted
    per_class: pd.DataFrame  # index class name; columns precision, recall, f1, support
    predictions: np.ndarray  # (n,) argmax class
    confidence: np.ndarray  # (n,) max softmax probability


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalResult:
    """All the numbers we report for one split, computed from logits once."""
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    num_classes = len(class_names)
    assert logits.shape == (len(labels), num_classes), (logits.shape, len(labels), num_classes)

    probs = logits.softmax(dim=1)
    confidence, preds = probs.max(dim=1)
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    top5 = (topk == labels[:, None]).any(dim=1).float().mean().item()

    # imported when used: scikit-learn takes ~2 s to import (of a worker's ~7), which the processes
    # that never evaluate (a worker whose finisher does, a study's parent) are spared
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = labels.numpy(), preds.numpy()
    class_ids = list(range(num_classes))  # fixes shapes even if a class never appears
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=class_ids, zero_division=0)
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support},
        index=pd.Index(class_names, name="class"),
    )
    return EvalResult(
        loss=F.cross_entropy(logits, labels).item(),
        accuracy=(preds == labels).float().mean().item(),
        top5_accuracy=top5,
        confusion=confusion_matrix(y_true, y_pred, labels=class_ids),
        per_class=per_class,
        predictions=y_pred,
        confidence=confidence.numpy(),
    )


def sanitize_name(name: str) -> str:
    """Make a class name usable inside an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def metrics_dict(result: EvalResult, prefix: str = "test_") -> dict[str, float]:
    """Flatten an EvalResult into MLflow metrics: headline, macro and per-class values."""
    pc = result.per_class
    out = {
        f"{prefix}loss": result.loss,
        f"{prefix}accuracy": result.accuracy,
        f"{prefix}top5_accuracy": result.top5_accuracy,
        f"{prefix}macro_precision": float(pc["precision"].mean()),
        f"{prefix}macro_recall": float(pc["recall"].mean()),
        f"{prefix}macro_f1": float(pc["f1"].mean()),
    }
    seen: set[str] = set()
    for i, (name, row) in enumerate(pc.iterrows()):
        safe = sanitize_name(str(name))
        if safe in seen:  # two names sanitised to the same key: keep both, disambiguated
            safe = f"{safe}_{i}"
        seen.add(safe)
        for metric in ("precision", "recall", "f1"):
            out[f"{prefix}{metric}_{safe}"] = float(row[metric])
    return out


# ----------------------------------------------------------------------------
# Figures


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _show_image(ax: Axes, image_chw: np.ndarray) -> None:
    ax.imshow(image_chw.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def confusion_figure(confusion: np.ndarray, class_names: list[str], normalize: bool) -> Figure:
    """Heatmap of the confusion matrix: raw counts, or rows normalised to recall per class."""
    confusion = np.asarray(confusion)
    num_classes = len(class_names)
    many = num_classes > MANY_CLASSES
    if normalize:
        row_sums = confusion.sum(axis=1, keepdims=True)
        data = np.divide(confusion, row_sums, out=np.zeros(confusion.shape), where=row_sums > 0)
        fmt = ".2f"
    else:
        data, fmt = confusion.astype(np.int64), "d"
    side = min(max(6.0, 0.45 * num_classes), 24.0)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(
        data,
        ax=ax,
        cmap="Blues",
        square=True,
        annot=not many,
        fmt=fmt,
        annot_kws={"fontsize": 8},
        xticklabels=class_names,
        yticklabels=class_names,
        vmin=0,
        vmax=1 if normalize else None,
    )
    if many:
        ax.tick_params(labelsize=4)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    return fig


def per_class_figure(per_class: pd.DataFrame) -> Figure:
    """Grouped bars of precision / recall / F1 for every class."""
    metrics = ["precision", "recall", "f1"]
    num_classes = len(per_class)
    x = np.arange(num_classes)
    width = 0.8 / len(metrics)
    fig = Figure(figsize=(min(max(6.0, 0.35 * num_classes), 40.0), 4), layout="constrained")
    ax = fig.subplots()
    for i, metric in enumerate(metrics):
        ax.bar(x + (i - 1) * width, per_class[metric].to_numpy(), width, label=metric)
    ax.set_xticks(x, [str(n) for n in per_class.index], rotation=90, fontsize=5 if num_classes > MANY_CLASSES else 9)
    ax.set_xlim(-0.6, num_classes - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("per-class precision / recall / F1")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def misclassified_figure(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    predictions: np.ndarray | torch.Tensor,
    confidence: np.ndarray | torch.Tensor,
    class_names: list[str],
    k: int = 25,
) -> Figure:
    """Grid of the k most confidently wrong predictions: the model's worst surprises."""
    images, labels = _to_numpy(images), _to_numpy(labels)
    predictions, confidence = _to_numpy(predictions), _to_numpy(confidence)
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    if len(wrong) == 0:
        fig = Figure(figsize=(4, 2), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.set_axis_off()
        return fig
    ncols = math.ceil(math.sqrt(len(wrong)))
    nrows = math.ceil(len(wrong) / ncols)
    fig = Figure(figsize=(1.8 * ncols, 1.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(wrong) :]:
        ax.set_axis_off()
    for ax, i in zip(axes, wrong):
        _show_image(ax, images[i])
        true, pred = class_names[labels[i]], class_names[predictions[i]]
        ax.set_title(f"{true}→{pred} (p={confidence[i]:.2f})", fontsize=7)
    fig.suptitle(f"{len(wrong)} most confident mistakes")
    return fig


def class_samples_figure(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    class_names: list[str],
    per_class: int = 5,
    seed: int = 0,
    max_classes: int = 20,
) -> Figure:
    """Dataset preview: one row per class of `per_class` seeded-random images.

    Only the first `max_classes` classes get a row (CIFAR-100 would otherwise
    need 100 rows); the title says when classes were left out.
    """
    images, labels = _to_numpy(images), _to_numpy(labels)
    rng = np.random.default_rng(seed)
    shown = class_names[:max_classes]
    fig = Figure(figsize=(1.2 * per_class + 1.2, 1.2 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), per_class, squeeze=False)
    for c, name in enumerate(shown):
        idx = np.flatnonzero(labels == c)
        picks = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(picks):
                _show_image(ax, images[picks[j]])
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    title = "samples per class"
    if len(shown) < len(class_names):
        title += f" (first {len(shown)} of {len(class_names)} classes)"
    fig.suptitle(title)
    return fig
