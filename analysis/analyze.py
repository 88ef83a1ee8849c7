"""`harness analyze RUN_ID`: what a trained run's features hold, stage by stage, logged back to MLflow.

For every named stage (global-average-pooled, `flatten_features`) and the penultimate embedding,
on the run's test set: kNN (leave-one-out), k-means scores, a linear probe on a seeded half, t-SNE
and UMAP, image grids and filters, and linear CKA between stages and against a source model. All
of it is logged into the analysed run (or `log_to`) with `RunLogger`, by run id. What each score
is, and why only the test set: docs/analysis.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from harness.analysis.cka import cka_matrix, plot_cka_heatmap
from harness.analysis.figures import (
    feature_maps_figure,
    filters_figure,
    nearest_neighbours,
    neighbour_grid,
    stage_metrics_figure,
)
from harness.analysis.metrics import cluster_scores, flatten_features, knn_accuracy_loo, linear_probe_accuracy
from harness.embeddings import DegenerateEmbeddings, plot_embedding_2d, project_tsne, project_umap, sample_indices
from harness.errors import HarnessError

KS = (1, 5, 20)
METRICS = ("knn1", "knn5", "knn20", "probe", "nmi", "ari", "purity", "silhouette")  # logged as analysis_<name>
PROJECTIONS = ("tsne", "umap")
EMBEDDING = "embedding"
N_QUERIES = 6  # nearest-neighbour grid rows
N_NEIGHBOURS = 5
N_FEATURE_MAP_IMAGES = 3
BATCH = 500
MIN_IMAGES = 20


class AnalysisError(HarnessError):
    """A bad analysis option (too few images, an unknown projection); the message is one line."""


@dataclass
class AnalysisResult:
    run_id: str  # the analysed run
    logged_to: str  # the run that received metrics and artifacts
    n_images: int
    stages: list[str]  # conv stages, then "embedding"; step i in MLflow is stages[i]
    table: pd.DataFrame  # one row per stage: stage, dim, knn1 ... silhouette (+ cka_source)
    cka: pd.DataFrame  # stage x stage linear CKA of this model
    source_run_id: str | None = None
    cka_source: pd.DataFrame | None = None  # rows source stages, columns this model's stages
    artifacts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step, "total" included


@contextmanager
def _quiet_downloads():
    """No MLflow "Downloading artifacts" bars while the config and checkpoints load."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextmanager
def _one_thread():
    """scikit-learn / BLAS / OpenMP work on one thread.

    These problems are small (thousands x hundreds), so two threads gain little, and on a
    2-core machine shared with training, OpenMP and BLAS threads spin waiting for a descheduled
    partner: measured here, the probe on 5,000 x 32 features took 22 s on two threads and
    0.3 s on one, k-means 2.5 s against 0.3 s, t-SNE 28 s against 8 s. One thread also makes
    the numbers independent of the machine's core count.
    """
    with threadpool_limits(1):
        yield


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@torch.no_grad()
def extract_features(model, images: torch.Tensor, normalize, batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """Pooled features (n, c) of every named stage, plus the (n, d) embedding, in fp32 batches.

    Pooling happens per batch, so memory stays at n x (sum of widths) whatever n is.
    """
    was_training = model.training
    model.eval()
    names = [*model.stage_names, EMBEDDING]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    try:
        for batch in images.split(batch_size):
            feats = model.features(normalize(batch), names)
            for n in names:
                out[n].append(flatten_features(feats[n]).cpu())
    finally:
        model.train(was_training)
    return {n: torch.cat(v).numpy() for n, v in out.items()}


def probe_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded half/half split of range(n) for the linear probe: (fit, score) indices."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def stage_scores(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, timer: _Timer) -> dict[str, float]:
    """kNN (LOO), k-means scores and the linear probe of one stage's features."""
    with timer("knn"):
        knn = knn_accuracy_loo(x, y, ks=KS)
    with timer("kmeans"), _one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters (dead units)
        clusters = cluster_scores(x, y, n_clusters=min(n_classes, len(x)), seed=seed)
    with timer("probe"), _one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "more classes than half the samples" on tiny samples
        fit, score = probe_split(len(x), seed)
        probe = (
            linear_probe_accuracy(x[fit], y[fit], x[score], y[score], seed=seed)
            if len(np.unique(y[fit])) > 1
            else float("nan")
        )
    return {**{f"knn{k}": v for k, v in knn.items()}, "probe": probe, **clusters}


def grid_queries(labels: np.ndarray, seed: int, n: int = N_QUERIES) -> np.ndarray:
    """One seeded image from each of n seeded classes present in `labels` (indices into labels)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    classes = np.sort(rng.choice(classes, size=min(n, len(classes)), replace=False))
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])


def neighbours_excluding_self(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(len(queries), k) nearest (cosine) rows of x for rows x[queries], the query itself left out."""
    idx = nearest_neighbours(x[queries], x, k=min(k + 1, len(x)))
    rows = []
    for q, row in zip(queries, idx):
        row = row[row != q]
        rows.append(row[:k])
    return np.stack(rows)


def first_conv_weight(model) -> torch.Tensor | None:
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.weight.detach().cpu()
    return None


def _source_run(client, run, compare_run_id: str | None) -> tuple[str | None, bool]:
    """(source run id, explicit): --compare wins over the run's `source_run_id` tag."""
    if compare_run_id:
        return compare_run_id, True
    return run.data.tags.get("source_run_id") or None, False


def stage_table(
    feats: dict[str, np.ndarray], labels: np.ndarray, n_classes: int, seed: int, timer: _Timer | None = None
) -> pd.DataFrame:
    """One row per stage (in `feats` order): its dimension and every score of `stage_scores`. Pure."""
    timer = timer or _Timer()
    rows = []
    for name, x in feats.items():
        scores = stage_scores(x, labels, n_classes, seed, timer)
        rows.append({"stage": name, "dim": x.shape[1], **{k: scores[k] for k in METRICS}})
    return pd.DataFrame(rows)


def cka_tables(
    feats: dict[str, np.ndarray], source_feats: dict[str, np.ndarray] | None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Linear CKA (debiased) between this model's stages, and from the source model's stages
    (rows) to this model's (columns) on the same images. Pure."""
    names = list(feats)
    cka = pd.DataFrame(cka_matrix([feats[s] for s in names], debiased=True), index=names, columns=names)
    if source_feats is None:
        return cka, None
    src_names = list(source_feats)
    cka_source = pd.DataFrame(
        cka_matrix([source_feats[s] for s in src_names], [feats[s] for s in names], debiased=True),
        index=pd.Index(src_names, name="source"),
        columns=names,
    )
    return cka, cka_source


@dataclass
class _Inputs:
    """What an analysis reads: the run, its config and model, the source model, the data, and
    the logger of the run that receives the results."""

    run: object
    cfg: object
    model: torch.nn.Module
    source_id: str | None
    source_model: torch.nn.Module | None
    ds: object
    logger: object
    target: str
    device: torch.device


def _load(
    run_id: str,
    tracking_uri: str | None,
    data_dir: str | None,
    compare_run_id: str | None,
    log_to: str | None,
    device: str,
) -> _Inputs:
    from harness import config as C
    from harness.checkpoints import RunNotFound, get_run, load_run_model
    from harness.data import load_dataset
    from harness.tracking import RunLogger, client_for
    from harness.training import select_device

    with _quiet_downloads():
        client = client_for(tracking_uri)
        run = get_run(client, run_id)
        dev = select_device(device)
        cfg, model = load_run_model(client, run_id, dev)
        source_id, explicit = _source_run(client, run, compare_run_id)
        source_model = None
        if source_id:
            try:
                _, source_model = load_run_model(client, source_id, dev)
            except RunNotFound as e:
                if explicit:
                    raise
                print(f"harness: warning: skipping the CKA with the source model: {e}", file=sys.stderr)
                source_id = None
        if data_dir:
            cfg = C.replace(cfg, {"data": {"root": data_dir}})
        ds = load_dataset(cfg.data)
        target = log_to or run_id
        if (run if target == run_id else get_run(client, target)).info.lifecycle_stage == "deleted":
            raise RunNotFound(
                f"run {target} is deleted, so nothing can be logged to it: restore it "
                "(`mlflow runs restore --run-id ...`) or pass --log-to another run"
            )
    return _Inputs(run, cfg, model, source_id, source_model, ds, RunLogger(client, target), target, dev)


def analyze_run(
    run_id: str,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    samples: int | None = None,
    compare_run_id: str | None = None,
    log_to: str | None = None,
    progress: bool = True,
    seed: int = 0,
    projections: tuple[str, ...] | None = None,
    projection_samples: int = 2000,
    device: str = "auto",
) -> AnalysisResult:
    """Analyse the features of `run_id`'s model on its dataset's test set and log it all to MLflow.

    samples: analyse a seeded sample of that many test images (default: all of them).
    compare_run_id: a model to compare with by CKA (rows its stages, columns this run's);
        default: the run's `source_run_id` tag, if any (transfer runs). Both models see the
        analysed run's test images.
    log_to: run id that receives the metrics and artifacts (default: the analysed run).
    projections: which of "tsne", "umap" to plot (default: what the run's eval.tsne/eval.umap say).
    Raises RunNotFound (missing run, no config or checkpoint), DatasetError (data missing),
    AnalysisError; all with one-line messages.

    The steps: load, features, the stage table and CKA (`stage_table`, `cka_tables`: pure
    computation), then everything logged (`_log_stages`, `_log_images`).
    """
    timer = _Timer()
    start = time.perf_counter()
    with timer("load"):
        inputs = _load(run_id, tracking_uri, data_dir, compare_run_id, log_to, device)
    idx = _test_sample(inputs.ds, samples, seed)
    projections = _chosen_projections(projections, inputs.cfg)
    log = _Log(inputs.logger, timer)
    table, cka, cka_source, skipped = _analyse(
        inputs, idx, projections, projection_samples, seed, log, run_id, progress
    )
    timings = _log_summary(inputs, run_id, len(idx), samples, seed, projections, skipped, log, start)
    return AnalysisResult(
        run_id,
        inputs.target,
        len(idx),
        [*inputs.model.stage_names, EMBEDDING],
        table,
        cka,
        inputs.source_id,
        cka_source,
        log.artifacts,
        timings,
    )


def _test_sample(ds, samples: int | None, seed: int) -> np.ndarray:
    """The test images analysed (all, or a seeded sample), by index: enough for kNN and k-means to mean something."""
    idx = sample_indices(len(ds.test_labels), samples, seed)
    if len(idx) < MIN_IMAGES:
        raise AnalysisError(f"only {len(idx)} test images to analyse: need at least {MIN_IMAGES} (raise --samples)")
    return idx


def _chosen_projections(projections: tuple[str, ...] | None, cfg) -> tuple[str, ...]:
    """The projections asked for; by default those the run itself drew (its eval.tsne, eval.umap)."""
    if projections is None:
        projections = tuple(p for p in PROJECTIONS if getattr(cfg.eval, p))
    unknown = set(projections) - set(PROJECTIONS)
    if unknown:
        raise AnalysisError(f"unknown projection {sorted(unknown)[0]!r}: choose from {', '.join(PROJECTIONS)}")
    return projections


def _on_device(
    inputs: _Inputs, images_np: np.ndarray
) -> tuple[torch.Tensor, object, torch.nn.Module, torch.nn.Module | None]:
    """The images on the device, their normalization, and both models in the run's memory format."""
    from harness.data import make_normalize

    channels_last = inputs.cfg.channels_last
    images = torch.from_numpy(np.ascontiguousarray(images_np)).to(inputs.device)
    normalize = make_normalize(inputs.device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = inputs.model.to(memory_format=fmt)
    source_model = inputs.source_model.to(memory_format=fmt) if inputs.source_model is not None else None
    return images, normalize, model, source_model


def _analyse(
    inputs: _Inputs,
    idx: np.ndarray,
    projections: tuple[str, ...],
    projection_samples: int,
    seed: int,
    log: _Log,
    run_id: str,
    progress: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, dict[str, str]]:
    """Features, scores, the stages' logging and the images, one step of the progress bar each.
    Returns the stage table, both CKA tables and the tags of skipped projections."""
    ds, timer = inputs.ds, log.timer
    images_np, labels = ds.test_images[idx], ds.test_labels[idx]
    images, normalize, model, source_model = _on_device(inputs, images_np)
    bar = tqdm(
        total=4, desc=f"analyze {run_id[:8]}", unit="step", leave=False, disable=not progress, dynamic_ncols=True
    )
    try:
        bar.set_postfix_str("features")
        with timer("features"):
            feats = extract_features(model, images, normalize)
            source_feats = extract_features(source_model, images, normalize) if source_model is not None else None
        bar.update()
        bar.set_postfix_str("scores")
        table, cka, cka_source = _scores(feats, source_feats, labels, len(ds.classes), seed, timer)
        bar.update()
        bar.set_postfix_str("projections, tables")
        proj_idx = sample_indices(len(labels), projection_samples, seed)
        skipped = _log_stages(
            log, table, feats, labels, ds.classes, cka, cka_source, inputs.source_id, projections, proj_idx, seed
        )
        bar.update()
        bar.set_postfix_str("images")
        _log_images(log, model, feats, images, images_np, labels, idx, ds.classes, normalize, seed)
        bar.update()
    finally:
        bar.close()
    return table, cka, cka_source, skipped


def _scores(
    feats: dict[str, np.ndarray],
    source_feats: dict[str, np.ndarray] | None,
    labels: np.ndarray,
    n_classes: int,
    seed: int,
    timer: _Timer,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """The stage table and the CKA tables; with a source model, the table also says how far each
    stage moved from its same-named source stage (`cka_source`)."""
    table = stage_table(feats, labels, n_classes, seed, timer)
    with timer("cka"):
        cka, cka_source = cka_tables(feats, source_feats)
    if cka_source is not None:
        table["cka_source"] = [cka_source.loc[s, s] if s in cka_source.index else np.nan for s in feats]
    return table, cka, cka_source


def _log_summary(
    inputs: _Inputs,
    run_id: str,
    n_images: int,
    samples: int | None,
    seed: int,
    projections: tuple[str, ...],
    skipped: dict[str, str],
    log: _Log,
    start: float,
) -> dict[str, float]:
    """summary.json, the analysis tags and its duration on the receiving run. Returns the seconds
    of each step, "total" included (the summary's own are those before this logging)."""
    timer = log.timer
    timings = {k: round(v, 3) for k, v in timer.seconds.items()}
    timings["total"] = round(time.perf_counter() - start, 3)
    summary = {
        "run_id": run_id,
        "n_images": n_images,
        "samples": samples,
        "seed": seed,
        "dataset": inputs.ds.name,
        "dataset_digest": inputs.ds.digest,
        "stages": [*inputs.model.stage_names, EMBEDDING],
        "source_run_id": inputs.source_id,
        "projections": list(projections),
        "timings_s": timings,
    }
    tags = {"analysis.n_images": n_images, "analysis.source_run_id": inputs.source_id or "", **skipped}
    if inputs.target != run_id:
        tags["analysis.run_id"] = run_id
    with timer("logging"):
        inputs.logger.log_text(json.dumps(summary, indent=2), "analysis/summary.json")
        inputs.logger.set_tags(tags)
        inputs.logger.log_metrics({"analysis_seconds": timings["total"]})
    log.artifacts.append("analysis/summary.json")
    timings["logging"] = round(timer.seconds["logging"], 3)
    timings["total"] = round(time.perf_counter() - start, 3)
    return timings


class _Log:
    """Logs into the receiving run under `analysis/`, timing figure building and logging apart."""

    def __init__(self, logger, timer: _Timer):
        self.logger, self.timer, self.artifacts = logger, timer, []

    def figure(self, path: str, build) -> None:
        with self.timer("figures"):
            fig = build()
        with self.timer("logging"):
            self.logger.log_figure(fig, f"analysis/{path}")
        self.artifacts.append(f"analysis/{path}")

    def table(self, df: pd.DataFrame, path: str) -> None:
        with self.timer("logging"):
            self.logger.log_table(df, f"analysis/{path}")
        self.artifacts.append(f"analysis/{path}")

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        with self.timer("logging"):
            self.logger.log_metrics(metrics, step=step)


def _log_stages(
    log: _Log,
    table: pd.DataFrame,
    feats,
    labels,
    classes,
    cka,
    cka_source,
    source_id,
    projections,
    proj_idx: np.ndarray,
    seed: int,
) -> dict[str, str]:
    """Per-stage metrics (the stage index as step), the tables, CKA heatmaps and t-SNE/UMAP plots.
    Returns the tags of projections skipped (degenerate features)."""
    n = len(labels)
    stage_names = list(table["stage"])
    skipped = {}
    for step, row in table.iterrows():
        name = row["stage"]
        log.metrics({f"analysis_{k}": row[k] for k in METRICS}, step)
        for proj in projections if len(proj_idx) >= 10 else ():
            try:
                with log.timer(proj), _one_thread(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # umap/numba deprecation chatter
                    xy = (project_tsne if proj == "tsne" else project_umap)(feats[name][proj_idx], seed=seed)
            except DegenerateEmbeddings as e:
                skipped[f"analysis.{proj}_skipped.{name}"] = str(e)
                continue
            title = f"{proj.upper()} of {name} features ({len(proj_idx)} test images)"
            log.figure(f"{proj}/{step}_{name}.png", lambda: plot_embedding_2d(xy, labels[proj_idx], classes, title))
    log.figure(
        "cka_stages.png",
        lambda: plot_cka_heatmap(
            cka.to_numpy(), stage_names, stage_names, f"linear CKA between stages ({n} test images)"
        ),
    )
    log.table(cka, "cka_stages.csv")
    if cka_source is not None:
        title = f"linear CKA: source run {source_id[:8]} (rows) vs this run (columns), {n} test images"
        log.figure(
            "cka_source.png",
            lambda: plot_cka_heatmap(cka_source.to_numpy(), list(cka_source.index), stage_names, title),
        )
        log.table(cka_source, "cka_source.csv")
        for step, v in enumerate(table["cka_source"]):
            if np.isfinite(v):
                log.metrics({"analysis_cka_source": float(v)}, step)
    log.table(table.set_index("stage"), "stage_metrics.csv")

    def metrics_figure():
        fig = stage_metrics_figure(table.drop(columns=["dim"]))
        fig.axes[0].set_title(f"feature-space metrics by stage ({n} test images)")
        return fig

    log.figure("stage_metrics.png", metrics_figure)
    return skipped


def _log_images(log: _Log, model, feats, images, images_np, labels, idx, classes, normalize, seed: int) -> None:
    """Nearest-neighbour grids (first stage, last conv stage, embedding), feature maps, filters."""
    stage_names = [*model.stage_names, EMBEDDING]
    with log.timer("images"):
        queries = grid_queries(labels, seed)
        grid_stages = list(dict.fromkeys([stage_names[0], stage_names[-2], EMBEDDING]))
        neighbours = {s: neighbours_excluding_self(feats[s], queries, N_NEIGHBOURS) for s in grid_stages}
        few = queries[:N_FEATURE_MAP_IMAGES]
        with torch.no_grad():
            maps = model.eval().features(normalize(images[few]), model.stage_names)
        weight = first_conv_weight(model)
    for name, nb in neighbours.items():

        def grid(name=name, nb=nb):
            fig = neighbour_grid(images_np[queries], images_np[nb], labels[queries], labels[nb], classes)
            fig.suptitle(f"{N_NEIGHBOURS} nearest test images (cosine) in {name} features")
            return fig

        log.figure(f"neighbours/{stage_names.index(name)}_{name}.png", grid)
    for i, q in enumerate(few):

        def fmap(i=i, q=q):
            fig = feature_maps_figure({s: a[i] for s, a in maps.items()}, images_np[q])
            fig.suptitle(f"stage outputs of test image {int(idx[q])} ({classes[labels[q]]})")
            return fig

        log.figure(f"feature_maps/image_{int(idx[q])}.png", fmap)
    if weight is not None:
        log.figure("filters_conv1.png", lambda: filters_figure(weight))
