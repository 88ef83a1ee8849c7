"""Linear centred kernel alignment (CKA): how similar are two layers' representations?

Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited".
We use the feature-space form, which never builds the n x n Gram matrices, so
n = 10,000 images costs O(n d^2) time and O(d^2) memory instead of O(n^2).
"""

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x - x.mean(axis=0, keepdims=True)


def _hsic(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """HSIC of linear kernels K = x x^T, L = y y^T for column-centred x, y, up to a constant factor.

    Biased: ||x^T y||_F^2 = tr(K H L H) (the factor 1/(n-1)^2 cancels in CKA).
    Debiased: the unbiased estimator of Song et al. 2012 (used for CKA by
    Nguyen et al. 2021), times n(n-3) which also cancels:
        tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1
    where K~, L~ are K, L with zeroed diagonals. The estimator is unchanged by
    centring, and with centred features K 1 = 0, so with d_i = ||x_i||^2 and
    e_i = ||y_i||^2: tr(K~ L~) = ||x^T y||^2 - d.e, 1^T K~ 1 = -sum(d),
    K~ 1 = -d, giving ||x^T y||^2 - n/(n-2) d.e + sum(d) sum(e) / ((n-1)(n-2)).
    """
    cross = float(np.linalg.norm(x.T @ y) ** 2)
    if not debiased:
        return cross
    n = x.shape[0]
    if n < 4:
        raise ValueError("debiased CKA needs at least 4 examples")
    d, e = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    return cross - n / (n - 2) * float(d @ e) + float(d.sum() * e.sum()) / ((n - 1) * (n - 2))


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA between representations x (n, d1) and y (n, d2) of the same n inputs.

    1 for identical representations; invariant to orthogonal transforms and
    isotropic scaling, not to arbitrary invertible linear maps. The debiased
    version removes the upward bias of the plain estimator when d is large
    relative to n (it can then be slightly negative for unrelated features).
    Extra dimensions (e.g. unpooled maps) are flattened.
    """
    x, y = _centered(x), _centered(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    denom = np.sqrt(_hsic(x, x, debiased) * _hsic(y, y, debiased))
    return float(_hsic(x, y, debiased) / denom) if denom > 0 else float("nan")


def cka_matrix(
    feats_a: list[np.ndarray], feats_b: list[np.ndarray] | None = None, debiased: bool = False
) -> np.ndarray:
    """CKA between every stage of a (rows) and every stage of b (columns); b=None compares a with itself."""
    if feats_b is None:
        m = np.eye(len(feats_a))
        for i in range(len(feats_a)):
            for j in range(i + 1, len(feats_a)):
                m[i, j] = m[j, i] = linear_cka(feats_a[i], feats_a[j], debiased)
        return m
    return np.array([[linear_cka(a, b, debiased) for b in feats_b] for a in feats_a])


def plot_cka_heatmap(matrix: np.ndarray, row_names: list[str], col_names: list[str], title: str) -> Figure:
    """Annotated heatmap of a CKA matrix (colour scale fixed to [0, 1] so runs are comparable)."""
    n_rows, n_cols = np.shape(matrix)
    fig = Figure(figsize=(max(4.0, 1.5 + 0.8 * n_cols), max(3.0, 1.0 + 0.6 * n_rows)), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(
        np.asarray(matrix),
        ax=ax,
        vmin=0.0,
        vmax=1.0,
        cmap="magma",
        annot=True,
        fmt=".2f",
        xticklabels=col_names,
        yticklabels=row_names,
        square=True,
        cbar_kws={"shrink": 0.8},
    )
    ax.set_title(title)
    return fig
