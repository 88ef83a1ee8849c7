"""Image figures: grids, nearest-neighbour retrievals, feature maps, first-layer filters, stage curves.

Images are uint8 CIFAR arrays of shape (n, 3, H, W), numpy or torch.
Every function returns a matplotlib Figure; the caller logs and closes it.
"""

import math

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness.analysis.metrics import neighbour_indices


def _to_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _hwc(images) -> np.ndarray:
    """(n, 3, H, W) or (3, H, W) -> (n, H, W, 3) / (H, W, 3) for imshow; HWC input passes through."""
    a = _to_numpy(images)
    if a.shape[-3] == 3 and a.shape[-1] != 3:
        a = np.moveaxis(a, -3, -1)
    return a


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_grid(
    images,
    titles: list[str] | None,
    ncols: int,
    title: str | None = None,
    title_colors: list[str] | None = None,
) -> Figure:
    """Images in a grid of ncols columns, each with a small title above it."""
    imgs = _hwc(images)
    n = len(imgs)
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(1.3 * ncols, 1.5 * nrows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        _blank(ax)
        if i >= n:
            continue
        ax.imshow(imgs[i], interpolation="nearest")
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            ax.set_title(titles[i], fontsize=7, color=color)
    if title:
        fig.suptitle(title)
    return fig


def nearest_neighbours(x_query: np.ndarray, x_bank: np.ndarray, k: int = 5, exclude_self: bool = False) -> np.ndarray:
    """Indices (n_query, k) of the k most cosine-similar bank rows, nearest first.

    exclude_self=True when the queries are the bank itself (otherwise each
    image's first neighbour is itself).
    """
    return neighbour_indices(x_query, x_bank, k, metric="cosine", exclude_self=exclude_self)


def neighbour_grid(
    query_images,
    neighbour_images,
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
    class_names: list[str],
) -> Figure:
    """One row per query: the query image, then its neighbours (n_query, k, 3, H, W).

    Neighbour titles are green when the label matches the query's, red otherwise,
    so retrieval failures are visible at a glance.
    """
    q, nb = _hwc(query_images), _hwc(neighbour_images)
    q_lab, nb_lab = _to_numpy(query_labels), _to_numpy(neighbour_labels)
    n_query, k = nb.shape[:2]
    images, titles, colors = [], [], []
    for i in range(n_query):
        images.append(q[i])
        titles.append(f"query: {class_names[q_lab[i]]}")
        colors.append("black")
        for j in range(k):
            images.append(nb[i, j])
            titles.append(class_names[nb_lab[i, j]])
            colors.append("green" if nb_lab[i, j] == q_lab[i] else "red")
    return image_grid(np.stack(images), titles, ncols=1 + k, title_colors=colors)


def feature_maps_figure(activations: dict[str, torch.Tensor], image, max_channels: int = 8) -> Figure:
    """For one image: the input, then the first max_channels channels of each stage output (one row per stage).

    activations maps stage name -> (1, c, h, w) or (c, h, w); non-spatial
    entries (e.g. logits) are skipped. Each map uses its own colour scale.
    """
    maps = {}
    for name, a in activations.items():
        a = _to_numpy(a.float() if isinstance(a, torch.Tensor) else a)
        a = a[0] if a.ndim == 4 else a
        if a.ndim == 3:
            maps[name] = a[:max_channels]
    fig = Figure(figsize=(1.2 * max_channels, 1.3 * (1 + len(maps))), layout="constrained")
    axes = fig.subplots(1 + len(maps), max_channels, squeeze=False)
    for ax in axes.ravel():
        _blank(ax)
    axes[0, 0].imshow(_hwc(image), interpolation="nearest")
    axes[0, 0].set_ylabel("input", fontsize=8)
    for row, (name, a) in enumerate(maps.items(), start=1):
        axes[row, 0].set_ylabel(name, fontsize=8)
        for c in range(len(a)):
            axes[row, c].imshow(a[c], cmap="viridis", interpolation="nearest")
            axes[row, c].set_title(f"ch {c}", fontsize=6)
    return fig


def filters_figure(weight: torch.Tensor) -> Figure:
    """First conv layer's filters (out, 3, k, k) as RGB tiles, each min-max normalised on its own.

    Per-filter normalisation shows each filter's pattern (edge, colour blob)
    regardless of its magnitude. Non-RGB inputs are shown as grey (channel mean).
    """
    w = _to_numpy(weight.float() if isinstance(weight, torch.Tensor) else weight).astype(np.float32)
    if w.shape[1] != 3:
        w = np.repeat(w.mean(axis=1, keepdims=True), 3, axis=1)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    tiles = np.moveaxis((w - lo) / np.maximum(hi - lo, 1e-12), 1, -1)
    n = len(tiles)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(0.6 * ncols + 0.4, 0.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        _blank(ax)
        if i < n:
            ax.imshow(tiles[i], interpolation="nearest")
    fig.suptitle(f"conv1 filters ({n} x {w.shape[1]} x {w.shape[2]} x {w.shape[3]})", fontsize=9)
    return fig


def stage_metrics_figure(table: pd.DataFrame) -> Figure:
    """Each numeric metric column (knn@1, probe, nmi, ...) as a line across stages.

    Rows are stages in network order; a 'stage' column, if present, names them,
    otherwise the index does.
    """
    if "stage" in table.columns:
        table = table.set_index("stage")
    metrics = table.select_dtypes("number")
    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(metrics)), 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(metrics))
    for col in metrics.columns:
        ax.plot(x, metrics[col].to_numpy(), marker="o", label=str(col))
    ax.set_xticks(x, [str(s) for s in metrics.index], rotation=30, ha="right")
    ax.set_xlabel("stage")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig
