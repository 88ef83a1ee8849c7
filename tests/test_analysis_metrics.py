"""Sanity tests for analysis/: metrics on synthetic embeddings with known structure, and figure shapes."""

import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from analysis.cka import cka_matrix, linear_cka, plot_cka_heatmap
from analysis.embeddings import plot_embedding_2d, project_tsne, project_umap, sample_indices
from analysis.figures import (
    feature_maps_figure,
    filters_figure,
    image_grid,
    nearest_neighbours,
    neighbour_grid,
    stage_metrics_figure,
)
from analysis.metrics import (
    cluster_scores,
    flatten_features,
    knn_accuracy,
    knn_accuracy_loo,
    linear_probe_accuracy,
    purity,
)


def blobs(n_per_class=60, n_classes=5, d=32, spread=10.0, seed=0):
    """Well-separated Gaussian clusters: class c is centred at a random point scaled by `spread`."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * spread
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), d))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def check_figure(fig, n_axes):
    """The figure has the expected axes and actually renders; then close it."""
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


# ---------------------------------------------------------------- metrics


def test_knn_separable_clusters():
    x, y = blobs()
    acc = knn_accuracy(x[:200], y[:200], x[200:], y[200:], ks=(1, 5, 20))
    assert set(acc) == {1, 5, 20}
    assert all(v > 0.95 for v in acc.values())
    acc_loo = knn_accuracy_loo(x, y, ks=(1, 5))
    assert all(v > 0.95 for v in acc_loo.values())
    acc_euc = knn_accuracy(x[:200], y[:200], x[200:], y[200:], ks=(1,), metric="euclidean")
    assert acc_euc[1] > 0.95


def test_knn_loo_excludes_self():
    # Every point's most similar other point has a different label: LOO 1-NN must be 0, not 1.
    x = np.array([[1.0, 0.0], [1.0, 0.1], [0.1, 1.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    assert knn_accuracy_loo(x, y, ks=(1,))[1] == 0.0
    # Without exclusion each point would find itself.
    assert knn_accuracy(x, y, x, y, ks=(1,))[1] == 1.0


def test_knn_random_labels_near_chance():
    x, _ = blobs()
    y = np.random.default_rng(1).integers(0, 5, size=len(x))
    assert knn_accuracy_loo(x, y, ks=(5,))[5] < 0.4


def test_nearest_neighbours():
    x, _ = blobs(n_per_class=10)
    idx = nearest_neighbours(x, x, k=5, exclude_self=False)
    assert idx.shape == (len(x), 5)
    assert (idx[:, 0] == np.arange(len(x))).all()
    idx = nearest_neighbours(x, x, k=5, exclude_self=True)
    assert (idx != np.arange(len(x))[:, None]).all()


def test_cluster_scores_separable_and_shuffled():
    x, y = blobs()
    s = cluster_scores(x, y, seed=0)
    assert set(s) == {"nmi", "ari", "purity", "silhouette"}
    assert s["nmi"] > 0.95 and s["ari"] > 0.95 and s["purity"] > 0.95
    assert s["silhouette"] > 0.5
    y_shuffled = np.random.default_rng(0).permutation(y)
    s = cluster_scores(x, y_shuffled, seed=0)
    assert s["nmi"] < 0.05 and abs(s["ari"]) < 0.05


def test_purity_and_ari_sanity():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert purity(y, np.array([5, 5, 3, 3, 9, 9])) == 1.0  # relabelled perfect clustering
    assert purity(y, np.zeros(6, dtype=int)) == pytest.approx(1 / 3)  # one big cluster
    assert purity(y, np.arange(6)) == 1.0  # singletons are trivially pure


def test_linear_probe_separable():
    x, y = blobs()
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], seed=0) > 0.95


def test_flatten_features():
    t = torch.randn(4, 8, 6, 6)
    assert torch.allclose(flatten_features(t), t.mean(dim=(2, 3)))
    assert flatten_features(t, pool=2).shape == (4, 8 * 2 * 2)
    assert flatten_features(torch.randn(4, 10)).shape == (4, 10)


def test_sample_indices():
    idx = sample_indices(100, 10, seed=0)
    assert len(idx) == 10 and len(set(idx)) == 10 and (np.diff(idx) > 0).all()
    assert (idx == sample_indices(100, 10, seed=0)).all()
    assert (sample_indices(5, None, seed=0) == np.arange(5)).all()
    assert (sample_indices(5, 50, seed=0) == np.arange(5)).all()


# ---------------------------------------------------------------- CKA


def hsic_unbiased_gram(k, l):
    """Unbiased HSIC (Song et al. 2012) written directly on Gram matrices, as a reference."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ l @ one)
    ) / (n * (n - 3))


def test_debiased_cka_matches_gram_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 7)) + 3.0  # not centred: the estimator must not care
    y = x @ rng.normal(size=(7, 5)) + rng.normal(size=(30, 5))
    kx, ky = x @ x.T, y @ y.T
    ref = hsic_unbiased_gram(kx, ky) / np.sqrt(hsic_unbiased_gram(kx, kx) * hsic_unbiased_gram(ky, ky))
    assert linear_cka(x, y, debiased=True) == pytest.approx(ref, rel=1e-8)
    # Biased CKA against the Gram form tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)).
    h = np.eye(30) - 1 / 30
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    ref = hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_identity_and_invariances(debiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20))
    assert linear_cka(x, x, debiased) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    y = x @ q[:, :10] + 0.5 * rng.normal(size=(200, 10))
    base = linear_cka(x, y, debiased)
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base)
    assert linear_cka(3.7 * x, y, debiased) == pytest.approx(base)
    assert linear_cka(x, 0.01 * y, debiased) == pytest.approx(base)
    assert linear_cka(x, x @ q, debiased) == pytest.approx(1.0)


def test_cka_independent_features_small():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 20)), rng.normal(size=(500, 20))
    assert linear_cka(x, y) < 0.1
    assert abs(linear_cka(x, y, debiased=True)) < 0.02
    # With d close to n the plain estimator is biased upwards; the debiased one is not.
    x, y = rng.normal(size=(100, 80)), rng.normal(size=(100, 80))
    assert linear_cka(x, y) > 0.4
    assert abs(linear_cka(x, y, debiased=True)) < 0.05


def test_cka_matrix():
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(50, d)) for d in (4, 8, 16)]
    m = cka_matrix(feats)
    assert m.shape == (3, 3)
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
    m2 = cka_matrix(feats, feats[:2], debiased=True)
    assert m2.shape == (3, 2)
    assert m2[1, 1] == pytest.approx(1.0)


# ---------------------------------------------------------------- projections and figures


def test_tsne_and_embedding_plot():
    x, y = blobs(n_per_class=12)
    xy = project_tsne(x, seed=0)
    assert xy.shape == (len(x), 2) and np.isfinite(xy).all()
    check_figure(plot_embedding_2d(xy, y, [f"c{i}" for i in range(5)], "t-SNE"), 1)
    # 100 classes: no legend, still one axes.
    rng = np.random.default_rng(0)
    fig = plot_embedding_2d(rng.normal(size=(300, 2)), rng.integers(0, 100, 300), [str(i) for i in range(100)], "x")
    assert fig.axes[0].get_legend() is None
    check_figure(fig, 1)


def test_umap_projection():
    pytest.importorskip("umap", reason="umap-learn failed to import")
    x, _ = blobs(n_per_class=12, spread=0.5)  # overlapping blobs: a connected kNN graph, no spectral warning
    xy = project_umap(x, seed=0)
    assert xy.shape == (len(x), 2) and np.isfinite(xy).all()


def test_cka_heatmap():
    check_figure(plot_cka_heatmap(np.eye(3), ["a", "b", "c"], ["a", "b", "c"], "CKA"), 2)  # heatmap + colorbar


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_image_grid():
    check_figure(image_grid(random_images(7), [str(i) for i in range(7)], ncols=4, title="grid"), 8)
    check_figure(image_grid(torch.from_numpy(random_images(3)), None, ncols=3), 3)


def test_neighbour_grid():
    q, nb = random_images(3), random_images(15, seed=1).reshape(3, 5, 3, 32, 32)
    q_lab, nb_lab = np.array([0, 1, 2]), np.array([[0, 0, 1, 2, 0], [1, 1, 1, 1, 1], [0, 1, 2, 2, 2]])
    fig = neighbour_grid(q, nb, q_lab, nb_lab, ["cat", "dog", "ship"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "query: cat" and titles[1] == "cat"
    assert fig.axes[1].title.get_color() == "green" and fig.axes[3].title.get_color() == "red"
    check_figure(fig, 3 * 6)


def test_feature_maps_figure():
    acts = {"stage1": torch.randn(1, 16, 32, 32), "stage2": torch.randn(1, 4, 16, 16), "logits": torch.randn(1, 10)}
    check_figure(feature_maps_figure(acts, random_images(1)[0], max_channels=8), 3 * 8)


def test_filters_figure():
    check_figure(filters_figure(torch.randn(64, 3, 3, 3)), 64)
    check_figure(filters_figure(torch.randn(10, 3, 5, 5)), 12)  # 4 x 3 grid


def test_stage_metrics_figure():
    table = pd.DataFrame(
        {"stage": ["s1", "s2", "s3"], "knn@1": [0.3, 0.5, 0.8], "probe": [0.4, 0.6, 0.85], "nmi": [0.1, 0.3, 0.6]}
    )
    fig = stage_metrics_figure(table)
    assert len(fig.axes[0].lines) == 3
    check_figure(fig, 1)


def test_identical_or_non_finite_points_are_refused_before_projection():
    from analysis.embeddings import DegenerateEmbeddings, check_projectable, project_tsne

    with pytest.raises(DegenerateEmbeddings, match="identical"):
        project_tsne(np.zeros((50, 8)), seed=0)  # unguarded, scikit-learn segfaults here
    with pytest.raises(DegenerateEmbeddings, match="non-finite"):
        check_projectable(np.full((50, 8), np.nan))
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert check_projectable(x).dtype == np.float32
