"""2-D projections of embeddings (t-SNE, UMAP) and the scatter plot that shows them."""

import os
import sys
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits


def sample_indices(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted seeded sample of k of range(n) (all of them if k is None or >= n).

    Projections and silhouette are super-linear in n, so we run them on a
    reproducible subset; sorting keeps the subset in dataset order.
    """
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class DegenerateEmbeddings(ValueError):
    """Points that cannot be projected: the caller skips the plot and says why."""


def check_projectable(x: np.ndarray) -> np.ndarray:
    """`x` as float32, or DegenerateEmbeddings. A dead network gives identical points, and on
    those scikit-learn's t-SNE crashes the whole process (segfault), so this check comes first."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DegenerateEmbeddings("embeddings hold non-finite values")
    if x.std(axis=0).max() < 1e-12:
        raise DegenerateEmbeddings("all embeddings are identical (the network outputs a constant)")
    return x


def project_tsne(x: np.ndarray, seed: int) -> np.ndarray:
    """t-SNE to (n, 2). Perplexity 30 unless n is small (it must stay below n); all 1,000
    iterations, PCA init.

    On one thread: at a few thousand points the Barnes-Hut gradient's OpenMP threads mostly
    spin waiting for each other, and on a shared CPU for a descheduled partner (1,000 points on
    2 busy cores: 10 s of CPU on two threads, 3 s on one, no sooner done).
    """
    from sklearn.manifold import TSNE  # (when used: scikit-learn takes ~2 s to import, see evaluation.py)

    x = check_projectable(x)
    perplexity = float(max(1.0, min(30.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed, n_jobs=1)
    with threadpool_limits(1):
        return tsne.fit_transform(x)


def project_umap(x: np.ndarray, seed: int) -> np.ndarray:
    """UMAP to (n, 2). n_neighbors 15 unless n is small. Seeded, hence single-threaded."""
    umap = load_umap()
    x = check_projectable(x)
    n_neighbors = max(2, min(15, len(x) - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


def numba_cache_dir() -> Path:
    """Where numba keeps compiled code between processes: $NUMBA_CACHE_DIR, else
    $XDG_CACHE_HOME/harness/numba (~/.cache by default), one per machine and user."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harness" / "numba"


def load_umap():
    """The umap module, its numba functions compiled once per machine rather than once per process.

    umap-learn compiles most of its functions on first call and caches few of them: that is
    most of the ~20 s a first UMAP takes in a fresh process. Here every numba function of umap's
    modules keeps its machine code in `numba_cache_dir()`; a later process loads it instead (the
    same code, so the same projection). Imported lazily: importing umap (numba) takes seconds.
    """
    import numba

    if not numba.config.CACHE_DIR:  # before umap's import: pynndescent's cached functions go there too
        folder = numba_cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            numba.config.CACHE_DIR = str(folder)
        except OSError:  # no writable cache: numba's own default (beside the sources, if writable)
            pass
    import umap
    import umap.umap_  # noqa: F401  (its submodules, whose functions get cached below)

    for name, module in list(sys.modules.items()):
        if name == "umap" or name.startswith("umap."):
            cache_compiled(module)
    return umap


def cache_compiled(module) -> None:
    """Turn on numba's on-disk cache for `module`'s jitted functions that were declared without it."""
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    for value in list(vars(module).values()):
        if isinstance(value, CPUDispatcher) and isinstance(value._cache, NullCache):
            try:
                value.enable_caching()
            except RuntimeError:  # numba finds nowhere to write this one's cache: it compiles as before
                pass


def plot_embedding_2d(xy: np.ndarray, labels: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Scatter of a 2-D projection coloured by class.

    Up to 20 classes get a qualitative palette and a legend; beyond that
    (CIFAR-100) a legend would hide the plot, so we use a continuous colormap
    and no legend.
    """
    xy, labels = np.asarray(xy), np.asarray(labels)
    n_classes = len(class_names)
    cmap = matplotlib.colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"]
    colors = cmap(np.linspace(0, 1, n_classes)) if n_classes > 20 else cmap(np.arange(n_classes))

    fig = Figure(figsize=(8, 7) if n_classes <= 20 else (7, 7), layout="constrained")
    ax = fig.add_subplot()
    for c in range(n_classes):
        m = labels == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=colors[c], label=class_names[c], linewidths=0)
    if n_classes <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=3, frameon=False)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
