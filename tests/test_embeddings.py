"""The projections' fixed costs: UMAP's numba code compiled once per machine, t-SNE on one thread."""

from pathlib import Path

import numba
import numpy as np
from numba.core.caching import NullCache

from harness.embeddings import load_umap, numba_cache_dir, project_tsne, project_umap


def test_numba_cache_dir_is_the_users_or_numbas_own(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert numba_cache_dir() == tmp_path / "xdg" / "harness" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert numba_cache_dir() == tmp_path / "mine"


def test_umaps_functions_keep_their_machine_code_on_disk():
    umap = load_umap()
    from umap import layouts, umap_

    folder = Path(numba.config.CACHE_DIR)
    for fn in (umap_.smooth_knn_dist, umap_.compute_membership_strengths, layouts.clip):
        assert not isinstance(fn._cache, NullCache), fn
        assert Path(fn._cache.cache_path).is_relative_to(folder), fn._cache.cache_path
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    xy = project_umap(x, seed=0)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    assert any(folder.rglob("*umap_*.nbi")), "compiled UMAP code was written to the cache"
    assert umap is load_umap()  # loading again changes nothing


def test_tsne_is_seeded_and_two_dimensional():
    x = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    a, b = project_tsne(x, seed=0), project_tsne(x, seed=0)
    assert a.shape == (80, 2) and np.array_equal(a, b)
