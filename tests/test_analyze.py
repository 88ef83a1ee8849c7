"""`analyze_run` end to end on generated data: tiny trained runs in a temporary MLflow store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_tiny_config  # the tiny_config fixture's helper, usable at module scope
from mlflow import MlflowClient

from harness.analysis.analyze import METRICS, analyze_run, grid_queries, neighbours_excluding_self, probe_split
from harness.checkpoints import RunNotFound
from harness.data import DatasetError


def _run_with(client, experiment_id, config_text, state=None, tags=None) -> str:
    """A finished run holding config.yaml and, given `state`, a weights-only checkpoint."""
    from harness.tracking import RunLogger

    run = RunLogger(client, client.create_run(experiment_id, tags=tags or {}).info.run_id)
    run.log_text(config_text, "config.yaml")
    if state is not None:
        run.log_state_dict(state)
    run.end("FINISHED")
    return run.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, cifar10_root):
    """One tiny trained run with its checkpoint, plus cheap runs made from it without training:
    one without a checkpoint, one 'fine-tuned' (perturbed weights) tagged with it as source."""
    from harness import config as C
    from harness.experiment import run_experiment
    from harness.tracking import RunLogger

    uri = f"sqlite:///{tmp_path_factory.mktemp('analyze')}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "HARNESS_DATA_DIR"):
            mp.delenv(var, raising=False)
        cfg = make_tiny_config(cifar10_root)  # eval.log_model false: we log the checkpoint alone (faster)
        result = run_experiment(cfg, uri, experiment="analyze-test", progress=False)
    client = MlflowClient(uri)
    state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
    RunLogger(client, result.run_id).log_state_dict(state)
    exp = client.get_run(result.run_id).info.experiment_id
    cfg_text = C.to_yaml(cfg)
    no_model = _run_with(client, exp, cfg_text)
    torch.manual_seed(0)
    tuned = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    fine_tuned = _run_with(client, exp, cfg_text, tuned, {"source_run_id": result.run_id})
    dead = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()}
    dead_run = _run_with(client, exp, cfg_text, dead)  # every image maps to the same features
    return {
        "uri": uri,
        "run_id": result.run_id,
        "no_model": no_model,
        "fine_tuned": fine_tuned,
        "dead": dead_run,
        "client": client,
    }


def _artifacts(client, run_id, path="analysis"):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return set(out)


@pytest.mark.slow
def test_analyze_logs_stage_metrics_table_and_figures(store):
    client, run_id = store["client"], store["run_id"]
    result = analyze_run(run_id, store["uri"], progress=False, projections=("tsne",))

    stages = ["stage1", "stage2", "embedding"]
    assert result.stages == stages and result.logged_to == run_id and result.n_images == 200
    assert result.source_run_id is None and result.cka_source is None

    # Per-stage metrics in MLflow, the stage index as step: 0..S (S conv stages, then the embedding).
    for name in METRICS:
        history = client.get_metric_history(run_id, f"analysis_{name}")
        assert sorted(m.step for m in history) == [0, 1, 2], name
        assert all(np.isfinite(m.value) for m in history)
    for name in ("knn1", "knn5", "knn20", "probe", "purity"):
        assert all(0.0 <= v <= 1.0 for v in result.table[name])
    # Class colours are visible to every stage: far above chance (0.1).
    assert result.table["knn1"].min() > 0.3

    # The CSV table: one row per stage, named.
    text = client.download_artifacts(run_id, "analysis/stage_metrics.csv")
    table = pd.read_csv(text)
    assert list(table["stage"]) == stages
    assert {*METRICS, "dim"} <= set(table.columns)

    logged = _artifacts(client, run_id)
    expected = {
        "analysis/stage_metrics.png",
        "analysis/cka_stages.png",
        "analysis/cka_stages.csv",
        "analysis/filters_conv1.png",
        "analysis/summary.json",
        *(f"analysis/tsne/{i}_{s}.png" for i, s in enumerate(stages)),
        "analysis/neighbours/0_stage1.png",
        "analysis/neighbours/2_embedding.png",
    }
    assert expected <= logged, expected - logged
    assert any(p.startswith("analysis/feature_maps/") for p in logged)
    assert not any(p.startswith("analysis/umap/") for p in logged)
    assert set(result.artifacts) == logged

    # Logging to the finished run leaves it FINISHED.
    assert client.get_run(run_id).info.status == "FINISHED"
    # Stage-vs-stage CKA: symmetric, ones on the diagonal.
    m = result.cka.to_numpy()
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)


@pytest.mark.slow
def test_cka_with_itself_is_one_on_the_diagonal(store):
    client, run_id = store["client"], store["run_id"]
    exp = client.get_run(run_id).info.experiment_id
    target = client.create_run(exp, run_name="analysis-target").info.run_id
    result = analyze_run(
        run_id, store["uri"], samples=120, compare_run_id=run_id, log_to=target, progress=False, projections=()
    )
    assert result.n_images == 120 and result.logged_to == target
    assert result.source_run_id == run_id
    cka = result.cka_source
    assert list(cka.index) == list(cka.columns) == result.stages
    assert np.allclose(np.diag(cka.to_numpy()), 1.0, atol=1e-6)
    assert np.allclose(result.table["cka_source"], 1.0, atol=1e-6)
    assert sorted(m.step for m in client.get_metric_history(target, "analysis_cka_source")) == [0, 1, 2]
    assert {"analysis/cka_source.png", "analysis/cka_source.csv"} <= _artifacts(client, target)
    assert client.get_run(target).data.tags["analysis.run_id"] == run_id
    # Nothing went to the analysed run this time.
    assert not client.get_metric_history(run_id, "analysis_cka_source")


@pytest.mark.slow
def test_source_run_tag_is_compared_automatically(store):
    client, fine_tuned = store["client"], store["fine_tuned"]
    result = analyze_run(fine_tuned, store["uri"], samples=100, progress=False, projections=())
    assert result.source_run_id == store["run_id"]
    assert result.cka_source.shape == (3, 3)
    diag = np.diag(result.cka_source.to_numpy())
    assert (diag > 0.5).all() and (diag < 1.0 - 1e-6).all()  # similar, not identical
    assert client.get_run(fine_tuned).data.tags["analysis.source_run_id"] == store["run_id"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.slow
def test_missing_run_fails_with_one_line(store):
    with pytest.raises(RunNotFound) as e:
        analyze_run("0123456789abcdef0123456789abcdef", store["uri"], progress=False)
    assert "0123456789abcdef0123456789abcdef not found" in _one_line(e)
    with pytest.raises(RunNotFound) as e:  # an explicit comparison that does not exist
        analyze_run(store["run_id"], store["uri"], compare_run_id="f" * 32, progress=False, samples=50)
    assert "not found" in _one_line(e)


@pytest.mark.slow
def test_run_without_model_fails_with_one_line(store):
    with pytest.raises(RunNotFound) as e:
        analyze_run(store["no_model"], store["uri"], progress=False)
    assert "no model checkpoint" in _one_line(e)


@pytest.mark.slow
def test_missing_dataset_fails_with_one_line(store, tmp_path):
    with pytest.raises(DatasetError) as e:
        analyze_run(store["run_id"], store["uri"], data_dir=str(tmp_path / "nowhere"), progress=False)
    assert "cifar10 not found" in _one_line(e)


@pytest.mark.slow
def test_bad_options_fail_with_one_line(store):
    from harness.analysis.analyze import AnalysisError

    with pytest.raises(AnalysisError) as e:
        analyze_run(store["run_id"], store["uri"], samples=5, progress=False)
    assert "raise --samples" in _one_line(e)
    with pytest.raises(AnalysisError) as e:
        analyze_run(store["run_id"], store["uri"], projections=("pca",), progress=False)
    assert "unknown projection 'pca'" in _one_line(e)


# ---------------------------------------------------------------- helpers


def test_probe_split_and_queries():
    fit, score = probe_split(101, seed=0)
    assert len(fit) == 50 and len(score) == 51 and not set(fit) & set(score)
    assert (probe_split(101, seed=0)[0] == fit).all()
    labels = np.repeat(np.arange(10), 5)
    q = grid_queries(labels, seed=0)
    assert len(q) == 6 and len(set(labels[q])) == 6


def test_neighbours_exclude_the_query():
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    x[7] = x[3]  # an exact duplicate is still a neighbour; the query itself is not
    nb = neighbours_excluding_self(x, np.array([3, 10]), k=5)
    assert nb.shape == (2, 5)
    assert 3 not in nb[0] and nb[0, 0] == 7 and 10 not in nb[1]


@pytest.mark.slow
def test_analyze_from_the_command_line(store, capsys):
    from harness.cli import main

    code = main(["analyze", store["run_id"], "--tracking-uri", store["uri"], "--samples", "100", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "embedding" in out and f"logged to run {store['run_id']}" in out
    code = main(["analyze", store["no_model"], "--tracking-uri", store["uri"], "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no model checkpoint" in lines[0]


@pytest.mark.slow
def test_a_dead_network_is_analysed_with_its_projections_skipped(store):
    """Identical points crash scikit-learn's t-SNE (segfault): the plots are skipped and say why."""
    result = analyze_run(store["dead"], store["uri"], samples=60, progress=False, projections=("tsne", "umap"))
    tags = store["client"].get_run(store["dead"]).data.tags
    assert "identical" in tags["analysis.tsne_skipped.embedding"]
    assert "identical" in tags["analysis.umap_skipped.stage1"]
    assert not any(a.startswith(("analysis/tsne/", "analysis/umap/")) for a in result.artifacts)


def test_the_stage_table_is_computed_without_a_run_or_a_store():
    """Pure: features in, one row of scores per stage out. A stage whose features are the class
    (one-hot, a little noise) scores near 1 everywhere; one of pure noise near chance."""
    from harness.analysis.analyze import METRICS, cka_tables, stage_table

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    separated = np.eye(4)[labels] * 5 + rng.normal(size=(120, 4)) * 0.1
    feats = {"noise": rng.normal(size=(120, 8)), "classes": separated}
    table = stage_table(feats, labels, n_classes=4, seed=0)
    assert list(table["stage"]) == ["noise", "classes"] and list(table["dim"]) == [8, 4]
    assert set(METRICS) <= set(table.columns)
    good, bad = table.set_index("stage").loc["classes"], table.set_index("stage").loc["noise"]
    assert good["knn1"] > 0.95 and good["probe"] > 0.95 and good["nmi"] > 0.9 and good["purity"] > 0.95
    assert bad["knn1"] < 0.5 and bad["nmi"] < 0.2
    cka, none = cka_tables(feats, None)
    assert none is None and np.allclose(np.diag(cka.to_numpy()), 1.0)
