"""Sanity tests for analysis/: metrics on synthetic embeddings with known structure, and figure shapes."""

import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from harness.analysis.cka import cka_matrix, linear_cka, plot_cka_heatmap
from harness.analysis.figures import (
    feature_maps_figure,
    filters_figure,
    image_grid,
    nearest_neighbours,
    neighbour_grid,
    stage_metrics_figure,
)
from harness.analysis.metrics import (
    cluster_scores,
    flatten_features,
    knn_accuracy,
    knn_accuracy_loo,
    linear_probe_accuracy,
    purity,
)
from harness.embeddings import plot_embedding_2d, project_tsne, project_umap, sample_indices


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


def hsic_unbiased_gram(k, m):
    """Unbiased HSIC (Song et al. 2012) written directly on Gram matrices, as a reference."""
    n = len(k)
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    one = np.ones(n)
    return (
        np.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ m @ one)
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


@pytest.mark.slow
def test_tsne_projection_keeps_separate_clusters_apart():
    x, y = blobs(n_per_class=12)
    xy = project_tsne(x, seed=0)
    assert xy.shape == (len(x), 2) and np.isfinite(xy).all()
    assert knn_accuracy_loo(xy, y, ks=(1,))[1] > 0.9  # the classes stay apart in the plane


def test_embedding_plot_draws_each_class_in_its_own_colour():
    x, y = blobs(n_per_class=12)
    xy = x[:, :2]  # any 2-D points: what is drawn is what is given
    fig = plot_embedding_2d(xy, y, [f"c{i}" for i in range(5)], "t-SNE")
    ax = fig.axes[0]
    assert ax.get_title() == "t-SNE"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"c{i}" for i in range(5)]
    # one scatter per class, holding exactly that class's points, each class in its own colour
    assert len(ax.collections) == 5
    for c, points in enumerate(ax.collections):
        np.testing.assert_allclose(points.get_offsets(), xy[y == c])
    assert len({tuple(p.get_facecolor()[0]) for p in ax.collections}) == 5
    check_figure(fig, 1)
    # 100 classes: no legend, still one axes, every point drawn once.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, 300)
    fig = plot_embedding_2d(rng.normal(size=(300, 2)), labels, [str(i) for i in range(100)], "x")
    assert fig.axes[0].get_legend() is None
    assert len(fig.axes[0].collections) == len(np.unique(labels))
    assert sum(len(p.get_offsets()) for p in fig.axes[0].collections) == 300
    check_figure(fig, 1)


@pytest.mark.slow
def test_umap_projection():
    pytest.importorskip("umap", reason="umap-learn failed to import")
    x, _ = blobs(n_per_class=12, spread=0.5)  # overlapping blobs: a connected kNN graph, no spectral warning
    xy = project_umap(x, seed=0)
    assert xy.shape == (len(x), 2) and np.isfinite(xy).all()


def test_cka_heatmap():
    m = np.array([[1.0, 0.25], [0.5, 0.875], [0.125, 0.0]])  # 3 stages against 2 (exact in binary)
    fig = plot_cka_heatmap(m, ["s1", "s2", "s3"], ["t1", "t2"], "CKA")
    ax = fig.axes[0]
    assert ax.get_title() == "CKA"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["s1", "s2", "s3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["t1", "t2"]
    # every cell, row by row, annotated and coloured with its CKA, on the fixed [0, 1] scale
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.25", "0.50", "0.88", "0.12", "0.00"]
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()).reshape(3, 2), m)
    assert ax.collections[0].get_clim() == (0.0, 1.0)
    check_figure(fig, 2)  # heatmap + colorbar


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_image_grid():
    images = random_images(7)
    fig = image_grid(images, [str(i) for i in range(7)], ncols=4, title="grid")
    assert fig.get_suptitle() == "grid"
    # image i, as height x width x RGB, under its title, row by row; the eighth cell stays empty
    for i, ax in enumerate(fig.axes[:7]):
        assert ax.get_title() == str(i)
        np.testing.assert_array_equal(ax.images[0].get_array(), images[i].transpose(1, 2, 0))
    assert not fig.axes[7].images and not fig.axes[7].get_title()
    check_figure(fig, 8)
    fig = image_grid(torch.from_numpy(random_images(3)), None, ncols=3)
    assert [ax.get_title() for ax in fig.axes] == ["", "", ""]
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), random_images(3)[2].transpose(1, 2, 0))
    check_figure(fig, 3)


def test_neighbour_grid():
    q, nb = random_images(3), random_images(15, seed=1).reshape(3, 5, 3, 32, 32)
    q_lab, nb_lab = np.array([0, 1, 2]), np.array([[0, 0, 1, 2, 0], [1, 1, 1, 1, 1], [0, 1, 2, 2, 2]])
    fig = neighbour_grid(q, nb, q_lab, nb_lab, ["cat", "dog", "ship"])
    titles = [ax.get_title() for ax in fig.axes]
    names = np.array(["cat", "dog", "ship"])
    # one row per query: the query, then its neighbours' classes, green where they match the query's
    assert titles == [t for i in range(3) for t in [f"query: {names[q_lab[i]]}", *names[nb_lab[i]]]]
    colours = [ax.title.get_color() for ax in fig.axes]
    assert colours == [
        c for i in range(3) for c in ["black", *("green" if lab == q_lab[i] else "red" for lab in nb_lab[i])]
    ]
    np.testing.assert_array_equal(fig.axes[6].images[0].get_array(), q[1].transpose(1, 2, 0))  # row 2: query 1
    np.testing.assert_array_equal(fig.axes[8].images[0].get_array(), nb[1, 1].transpose(1, 2, 0))
    check_figure(fig, 3 * 6)


def test_feature_maps_figure():
    acts = {"stage1": torch.randn(1, 16, 32, 32), "stage2": torch.randn(1, 4, 16, 16), "logits": torch.randn(1, 10)}
    image = random_images(1)[0]
    fig = feature_maps_figure(acts, image, max_channels=8)
    rows = np.array(fig.axes).reshape(3, 8)  # the input, then one row per spatial stage (logits skipped)
    assert [r[0].get_ylabel() for r in rows] == ["input", "stage1", "stage2"]
    np.testing.assert_array_equal(rows[0, 0].images[0].get_array(), image.transpose(1, 2, 0))
    # stage1: its first 8 of 16 channels; stage2: its 4 channels, the rest of the row empty
    for c in range(8):
        assert rows[1, c].get_title() == f"ch {c}"
        np.testing.assert_allclose(rows[1, c].images[0].get_array(), acts["stage1"][0, c].numpy())
    assert [len(ax.images) for ax in rows[2]] == [1] * 4 + [0] * 4
    np.testing.assert_allclose(rows[2, 3].images[0].get_array(), acts["stage2"][0, 3].numpy())
    check_figure(fig, 3 * 8)


def test_filters_figure():
    weight = torch.randn(64, 3, 3, 3)
    fig = filters_figure(weight)
    assert fig.get_suptitle() == "conv1 filters (64 x 3 x 3 x 3)"
    # each filter as an RGB tile stretched to [0, 1] on its own
    w = weight[5].numpy()
    np.testing.assert_allclose(
        fig.axes[5].images[0].get_array(),
        ((w - w.min()) / (w.max() - w.min())).transpose(1, 2, 0),
        rtol=1e-5,
        atol=1e-6,
    )
    assert all(
        ax.images[0].get_array().min() == 0 and ax.images[0].get_array().max() == pytest.approx(1) for ax in fig.axes
    )
    check_figure(fig, 64)
    fig = filters_figure(torch.randn(10, 3, 5, 5))
    assert fig.get_suptitle() == "conv1 filters (10 x 3 x 5 x 5)"
    assert [len(ax.images) for ax in fig.axes] == [1] * 10 + [0] * 2
    check_figure(fig, 12)  # 4 x 3 grid


def test_stage_metrics_figure():
    table = pd.DataFrame(
        {"stage": ["s1", "s2", "s3"], "knn@1": [0.3, 0.5, 0.8], "probe": [0.4, 0.6, 0.85], "nmi": [0.1, 0.3, 0.6]}
    )
    fig = stage_metrics_figure(table)
    ax = fig.axes[0]
    # one line per metric, through its value at each stage, the stages named on the x axis
    assert [line.get_label() for line in ax.lines] == ["knn@1", "probe", "nmi"]
    for line in ax.lines:
        assert list(line.get_xdata()) == [0, 1, 2]
        assert list(line.get_ydata()) == pytest.approx(table[line.get_label()].tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s1", "s2", "s3"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["knn@1", "probe", "nmi"]
    check_figure(fig, 1)


def test_identical_or_non_finite_points_are_refused_before_projection():
    from harness.embeddings import DegenerateEmbeddings, check_projectable, project_tsne

    with pytest.raises(DegenerateEmbeddings, match="identical"):
        project_tsne(np.zeros((50, 8)), seed=0)  # unguarded, scikit-learn segfaults here
    with pytest.raises(DegenerateEmbeddings, match="non-finite"):
        check_projectable(np.full((50, 8), np.nan))
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert check_projectable(x).dtype == np.float32
