"""Feature-space metrics: how well do a layer's embeddings separate the classes?

Every function takes plain arrays: embeddings `x` of shape (n, d) and integer
labels `y` of shape (n,). Nothing here knows about models, MLflow or Optuna.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from harness.embeddings import sample_indices


def flatten_features(t: torch.Tensor, pool: int | None = None) -> torch.Tensor:
    """Turn a stage output (n, c, h, w) into one vector per image.

    By default we global-average-pool to (n, c): raw spatial maps are huge
    (64x32x32 = 65k floats per image for an early stage), which makes kNN, CKA
    and probes slow and memory-hungry, and pooling is what the classifier head
    itself does. `pool=p` keeps a coarse p x p grid instead (n, c*p*p) when
    spatial layout matters. Inputs that are already (n, d) pass through.
    """
    t = t.detach().float()
    if t.ndim == 2:
        return t
    if t.ndim != 4:
        raise ValueError(f"expected (n, c, h, w) or (n, d), got shape {tuple(t.shape)}")
    if pool is None:
        return t.mean(dim=(2, 3))
    return F.adaptive_avg_pool2d(t, pool).flatten(1)


def neighbour_indices(
    query: np.ndarray,
    bank: np.ndarray,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
    chunk: int = 1024,
) -> np.ndarray:
    """Indices (n_query, k) of the k nearest `bank` rows for each query row, nearest first.

    A chunked torch matmul: for 10k x 10k this is much faster on CPU than
    sklearn's NearestNeighbors with the cosine metric, and chunking keeps the
    similarity block at chunk x n_bank floats. `exclude_self` assumes query is
    bank (leave-one-out) and drops each point's match with itself.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    q = torch.as_tensor(np.asarray(query), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(bank), dtype=torch.float32)
    if exclude_self and q.shape[0] != b.shape[0]:
        raise ValueError("exclude_self needs query and bank to be the same set")
    if metric == "cosine":
        q, b = F.normalize(q, dim=1), F.normalize(b, dim=1)
    k = min(k, b.shape[0] - int(exclude_self))
    out = []
    for start in range(0, q.shape[0], chunk):
        qc = q[start : start + chunk]
        sim = qc @ b.T if metric == "cosine" else -torch.cdist(qc, b)
        if exclude_self:
            rows = torch.arange(qc.shape[0])
            sim[rows, rows + start] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).numpy()


def _vote(neighbour_labels: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Majority vote over the first k neighbours; ties go to the class whose members are nearer."""
    labels = torch.as_tensor(neighbour_labels[:, :k], dtype=torch.long)
    # 1 vote each, plus a tiny bonus that decreases with rank so ties break towards closer neighbours.
    weights = 1.0 + 1e-3 * torch.linspace(1.0, 0.0, k, dtype=torch.float64)
    votes = torch.zeros(labels.shape[0], n_classes, dtype=torch.float64)
    votes.scatter_add_(1, labels, weights.expand(labels.shape[0], k).contiguous())
    return votes.argmax(dim=1).numpy()


def _knn_scores(nbr_idx: np.ndarray, bank_y: np.ndarray, query_y: np.ndarray, ks) -> dict[int, float]:
    n_classes = int(max(bank_y.max(), query_y.max())) + 1
    nbr_labels = bank_y[nbr_idx]
    return {k: float((_vote(nbr_labels, min(k, nbr_idx.shape[1]), n_classes) == query_y).mean()) for k in ks}


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 20),
    metric: str = "cosine",
) -> dict[int, float]:
    """kNN classification accuracy of test points against a train bank, for each k in ks.

    Cosine is the default because deep features differ mostly in direction;
    k larger than the bank is clipped to the bank size.
    """
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    idx = neighbour_indices(test_x, train_x, max(ks), metric=metric)
    return _knn_scores(idx, train_y, test_y, ks)


def knn_accuracy_loo(
    x: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = (1, 5, 20), metric: str = "cosine"
) -> dict[int, float]:
    """Leave-one-out kNN accuracy within one set (each point is classified by the others)."""
    y = np.asarray(y)
    idx = neighbour_indices(x, x, max(ks), metric=metric, exclude_self=True)
    return _knn_scores(idx, y, y, ks)


def purity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of points whose cluster's majority class is their own class."""
    c = contingency_matrix(y_true, y_pred)
    return float(c.max(axis=0).sum() / c.sum())


def cluster_scores(
    x: np.ndarray,
    y: np.ndarray,
    n_clusters: int | None = None,
    seed: int = 0,
    l2_normalize: bool = True,
    silhouette_max: int = 2000,
) -> dict[str, float]:
    """Cluster the embeddings with k-means and compare clusters with the labels.

    k defaults to the number of classes. Features are L2-normalised first (so
    k-means approximates cosine clustering, matching the kNN metric). NMI, ARI
    and purity compare clusters with labels; silhouette scores the k-means
    clusters themselves, on a seeded subsample because it is O(n^2).
    """
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    if l2_normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = n_clusters or len(np.unique(y))
    pred = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    idx = sample_indices(len(x), silhouette_max, seed)
    sil = silhouette_score(x[idx], pred[idx]) if len(np.unique(pred[idx])) > 1 else float("nan")
    return {
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "ari": float(adjusted_rand_score(y, pred)),
        "purity": purity(y, pred),
        "silhouette": float(sil),
    }


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    max_iter: int = 200,
    C: float = 1.0,
) -> float:
    """Test accuracy of a multinomial logistic regression fit on frozen features.

    Standardised features + lbfgs: on 5,000 x 512 features this converges
    (or nearly) in a few seconds on 2 cores. max_iter is capped on purpose:
    the probe is a relative measure between stages/runs, so we trade the last
    fraction of a percent for bounded time and silence the ConvergenceWarning.
    """
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(train_x), np.asarray(train_y))
    return float(probe.score(np.asarray(test_x), np.asarray(test_y)))
