"""One experiment end to end: data, model, training, evaluation, and all of it in MLflow.

`train_run` is what `harness train`, every study trial and `harness reproduce` call. It ends
the MLflow run FINISHED, FAILED (with the reason) or KILLED (Ctrl-C), keeping what was logged.
What follows training (`log_evaluation`: test set, figures, embeddings, the model) happens
before the run ends, or, for study trials, in a background `Finisher` while the next trains.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness import config as C
from harness import resume
from harness.data import MEAN, STD, Dataset, load_dataset, make_normalize, make_splits
from harness.embeddings import DegenerateEmbeddings, plot_embedding_2d, project_tsne, project_umap, sample_indices
from harness.evaluation import (
    EvalResult,
    class_samples_figure,
    classification_metrics,
    confusion_figure,
    metrics_dict,
    misclassified_figure,
    per_class_figure,
    predict,
)
from harness.models import CNN, build_model, count_macs, count_parameters, whiten_stem
from harness.tracking import RunLogger, client_for, experiment_id, git_commit
from harness.training import Callback, FitResult, fit, seed_everything, select_device, use_bf16
from harness.uncertainty import interval_metrics

STEM_IMAGES = 2000  # training images whose patches set a whitening stem


@dataclass
class RunResult:
    run_id: str
    fit: FitResult
    test: EvalResult | None  # None when a finisher evaluates it in the background
    metrics: dict[str, float]
    model: CNN
    val_images: int = 0  # the size of the validation set behind `fit.best_val_accuracy`


def run_tags(cfg: C.Config, ds: Dataset, device: torch.device) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "device": str(device),
        "seed": cfg.seed,
        "config_hash": C.config_hash(cfg),
        "dataset": ds.name,
        "dataset_digest": ds.digest,
    }


def log_setup(run: RunLogger, cfg: C.Config, ds: Dataset, model: CNN, device: torch.device) -> None:
    """What a run is, before it trains: config, data, model size, and a look at the data."""
    run.set_tags(run_tags(cfg, ds, device))
    run.log_params(C.flatten(C.to_dict(cfg)))
    run.log_text(C.to_yaml(cfg), "config.yaml")
    run.log_text(str(model), "model_summary.txt")
    size = {"num_params": count_parameters(model), "macs_per_image": count_macs(model)}
    run.log_params(size)
    run.log_metrics(size)
    # one name per split: MLflow keeps a single input per (name, digest) in a run, so a shared
    # name would drop the testing input; the digest is the whole dataset's, on both
    run.log_dataset(f"{ds.name}-train", ds.digest, ds.train_images, ds.train_labels, cfg.data.root, "training")
    run.log_dataset(f"{ds.name}-test", ds.digest, ds.test_images, ds.test_labels, cfg.data.root, "testing")


@dataclass
class Stopwatch:
    """Seconds per stage of what a run does besides training, logged as `<prefix><stage>_seconds`:
    where its fixed cost goes (`benchmarks/gpu.py` prints them)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{stage}_seconds": s for stage, s in self.seconds.items()}


def log_evaluation(
    run: RunLogger, cfg: C.Config, model: CNN, ds: Dataset, test_x: torch.Tensor, test_y: torch.Tensor
) -> tuple[EvalResult, dict]:
    """Everything a trained run logs about its model: the test set's metrics and figures, the
    embedding plots, a look at the data, and the model itself. `test_x`, `test_y` on the model's device.

    The figures go in one request at the end; the seconds of each stage (test, embeddings,
    figures, model) are logged as `eval_<stage>_seconds`.
    """
    device = test_x.device
    clock = Stopwatch()
    test, metrics, figures = log_test(run, cfg, model, test_x, test_y, ds, use_bf16(device, cfg.precision), clock=clock)
    with clock("figures"):
        if cfg.eval.figures:
            figures["data/train_samples.png"] = class_samples_figure(
                ds.train_images, ds.train_labels, ds.classes, seed=cfg.seed
            )
        run.log_figures(figures)
    if cfg.eval.log_model:
        with clock("model"):
            log_model(run, cfg, model)
    run.log_metrics(clock.metrics("eval_"))
    return test, metrics


def log_test(
    run: RunLogger,
    cfg: C.Config,
    model: CNN,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    ds: Dataset,
    bf16: bool = False,
    prefix: str = "test_",
    clock: Stopwatch | None = None,
) -> tuple[EvalResult, dict, dict[str, Figure]]:
    """Test metrics, confusion matrices and per-class table (logged), and the figures of the
    test set and its embeddings (returned by artifact path, for the caller to log at once).
    One pass over the test set gives both the logits and the embeddings."""
    clock = clock or Stopwatch()
    with clock("test"):
        normalize = make_normalize(test_x.device, cfg.channels_last)
        pred = predict(model, test_x, normalize, embed=True, bf16=bf16, tta=cfg.eval.tta).cpu()
        labels = test_y.cpu().numpy()
        result = classification_metrics(pred.logits, test_y.cpu(), ds.classes)
        metrics = metrics_dict(result, prefix=prefix)
        metrics.update(interval_metrics(f"{prefix}accuracy", metrics[f"{prefix}accuracy"], len(labels)))
        if ds.fine_to_coarse is not None and cfg.data.label == "fine":  # CIFAR-100: superclass accuracy too
            to_coarse = ds.fine_to_coarse
            metrics[f"{prefix}coarse_accuracy"] = float(np.mean(to_coarse[result.predictions] == to_coarse[labels]))
        run.log_metrics(metrics)
        run.log_table(result.per_class, "eval/per_class.csv")
        run.log_table(
            pd.DataFrame(result.confusion, index=ds.classes, columns=ds.classes).rename_axis("true"),
            "eval/confusion.csv",
        )
    figures = {}
    if cfg.eval.figures:
        with clock("figures"):
            figures.update(test_figures(result, test_x, labels, ds.classes, cfg.eval.misclassified))
    figures.update(embedding_figures(run, cfg, pred.embeddings.numpy(), labels, ds.classes, clock))
    return result, metrics, figures


def test_figures(
    result: EvalResult, test_x: torch.Tensor, labels: np.ndarray, classes: list[str], misclassified: int
) -> dict[str, Figure]:
    """Confusion matrices (counts, row-normalised), per-class chart and the most confident mistakes."""
    return {
        "eval/confusion_counts.png": confusion_figure(result.confusion, classes, normalize=False),
        "eval/confusion_normalized.png": confusion_figure(result.confusion, classes, normalize=True),
        "eval/per_class.png": per_class_figure(result.per_class),
        "eval/misclassified.png": misclassified_figure(
            test_x.cpu().numpy(), labels, result.predictions, result.confidence, classes, k=misclassified
        ),
    }


def embedding_figures(
    run: RunLogger, cfg: C.Config, embeddings: np.ndarray, labels: np.ndarray, classes: list[str], clock: Stopwatch
) -> dict[str, Figure]:
    """t-SNE and UMAP plots of `cfg.eval.embedding_samples` test embeddings; a projection the
    embeddings cannot have (a dead network) is skipped with a tag saying why."""
    idx = sample_indices(len(labels), cfg.eval.embedding_samples, cfg.seed)
    emb = embeddings[idx]
    figures = {}
    for name, enabled, project in (("tsne", cfg.eval.tsne, project_tsne), ("umap", cfg.eval.umap, project_umap)):
        if enabled and len(idx) >= 10:
            try:
                with clock("embeddings"):
                    xy = project(emb, seed=cfg.seed)
            except DegenerateEmbeddings as e:
                run.set_tags({f"{name}_skipped": str(e)})
                continue
            title = f"{name.upper()} of penultimate-layer embeddings ({len(idx)} test images)"
            with clock("figures"):
                figures[f"embeddings/{name}.png"] = plot_embedding_2d(xy, labels[idx], classes, title)
    return figures


def log_model(run: RunLogger, cfg: C.Config, model: CNN) -> None:
    """The MLflow model and a weights-only checkpoint, from a CPU copy: the caller's model stays
    where it is (a transfer or a latency measurement may still use it). The signature is the
    one MLflow would infer, given rather than inferred by running the model."""
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, model.num_classes), dtype=np.float32))
    meta = {
        "input": "float32 (n, 3, 32, 32), pixels/255 normalized by mean and std",
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": model.num_classes,
        "stages": model.stage_names,
    }
    run.log_torch_model(model, example, meta, signature=signature)
    run.log_state_dict(model.state_dict())


def train_run(
    cfg: C.Config,
    run: RunLogger,
    ds: Dataset | None = None,
    callbacks: list[Callback] = (),
    progress: bool = True,
    ok_exceptions: tuple[type[BaseException], ...] = (),
    model: CNN | None = None,
    param_groups=None,
    finisher=None,
    resume_from: str | None = None,
) -> RunResult:
    """Train and evaluate `cfg` inside the already-created MLflow `run`, then end the run.

    `model` and `param_groups` let transfer start from trained weights with some of them
    frozen or at a smaller learning rate; by default a fresh model is built from `cfg.model`.
    With a `finisher` (harness.finisher.Finisher) the evaluation is handed to it and the run
    ends as soon as training did (`RunResult.test` is then None). `resume_from`: a run whose
    resumable checkpoint (harness/resume.py) this run continues, its epochs logged here too
    unless it is this run. Every `cfg.checkpoint_every` epochs this run writes its own.
    Exceptions in `ok_exceptions` (a study's pruning signal) end the run FINISHED before they
    propagate; Ctrl-C and SIGTERM end it KILLED, its checkpoint kept; anything else FAILED
    with the reason (see RunLogger).
    """
    own = resume.path_for(run.client.tracking_uri, run.run_id)

    def checkpoint(state: dict) -> None:
        resume.save(own, state)
        run.killed_note = f"; resumable from the end of epoch {state['epoch']}"

    run.finished_by = tuple(ok_exceptions)
    try:
        with run:
            begun = time.perf_counter()
            if cfg.eval.system_metrics:
                run.monitor_system()  # until the run ends
            state = resume.adopt(run.client.tracking_uri, resume_from, run.run_id) if resume_from else None
            ds = ds or load_dataset(cfg.data)
            seed_everything(cfg.seed, cfg.deterministic)
            device = select_device(cfg.device)
            splits = make_splits(ds, cfg.data, device)
            if model is None:
                model = build_model(cfg.model, len(ds.classes)).to(device)
                whiten_stem(model, make_normalize(device)(splits.train_x[:STEM_IMAGES]))
            model = model.to(device)
            logged = 0  # epochs this run logged before (resumed into itself)
            if state is not None:
                run.killed_note = f"; resumable from the end of epoch {state['epoch']}"
                run.set_tags({"resumed_from": resume_from, "resumed_at_epoch": state["epoch"]})
                if resume_from == run.run_id:  # a stop after an epoch's log, before its checkpoint: logged once
                    history = run.client.get_metric_history(run.run_id, "val_accuracy")
                    logged = max([state["epoch"], *(m.step for m in history)])
            if not logged:
                log_setup(run, cfg, ds, model, device)

            def log_epoch(m):
                if m.epoch > logged:
                    run.log_metrics(m.as_dict(), step=m.epoch)

            start = time.perf_counter()
            result = fit(
                model,
                splits,
                cfg,
                device,
                callbacks=[log_epoch, *callbacks],
                param_groups=param_groups,
                progress=progress,
                checkpoint=checkpoint,
                resume=state,
            )
            run.log_metrics(
                {
                    "best_val_accuracy": result.best_val_accuracy,
                    "best_epoch": result.best_epoch,
                    "epochs_trained": len(result.history),
                    "train_seconds": time.perf_counter() - start,
                    "setup_seconds": start - begun,  # data on the device, model, what the run is
                    "val_images": len(splits.val_y),
                    **interval_metrics("best_val_accuracy", result.best_val_accuracy, len(splits.val_y)),
                }
            )
            run.set_tags({"stopped_early": result.stopped_early})
            if finisher is not None:
                finisher.submit(run, cfg, model)
                test, metrics = None, {}
            else:
                test, metrics = log_evaluation(run, cfg, model, ds, splits.test_x, splits.test_y)
            run.log_metrics({"tracking_seconds": run.seconds})
            run.killed_note = ""
            resume.discard(own)  # done: before the run ends, so a checkpoint on disk is an unfinished run's
    except KeyboardInterrupt:
        raise  # Ctrl-C or SIGTERM: the checkpoint stays, to resume from
    except BaseException:
        resume.discard(own)  # pruned or failed: nothing to resume
        raise
    return RunResult(run.run_id, result, test, metrics, model, len(splits.val_y))


def run_experiment(
    cfg: C.Config, tracking_uri: str | None = None, experiment: str | None = None, progress: bool = True
) -> RunResult:
    """`harness train`: one top-level run in the experiment named after the dataset (or given)."""
    ds = load_dataset(cfg.data)  # missing data fails here, before a run exists
    select_device(cfg.device)  # and so does a device this machine lacks
    client = client_for(tracking_uri)
    experiment = experiment or f"{cfg.data.dataset}-train"
    experiment_id(client, experiment, description=train_description(experiment))
    run = RunLogger.start(client, experiment, cfg.name)
    return train_run(cfg, run, ds, progress=progress)


def train_description(experiment: str) -> str:
    """The description of an experiment of `harness train` runs in the MLflow UI."""
    return (
        "\n".join(
            [  # one line a paragraph: the UI renders every newline as a break
                "**Training runs** (`harness train`): one top-level run per command, named after the config's `name`.",
                "",
                "- **Each run**: the resolved config (parameters, `config.yaml`), per-epoch train/val loss and "
                "accuracy "
                "(Model metrics), test metrics `test_*`, confusion matrices, per-class table and misclassified images "
                "(`eval/`), embedding plots (`embeddings/`), the model (Logged models) and `checkpoint/model.pt`.",
                "- **Reproductions** (`harness reproduce <run id>`) land here too, tagged `reproduces` with the "
                "original's id.",
                f"- **Command line**: `harness ui --experiment {experiment}` (this page), `harness reproduce <run "
                "id>`, "
                "`harness analyze <run id>` (what each stage of the network learned).",
            ]
        )
        + "\n"
    )


def reproduce(
    run_id: str,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> tuple[RunResult, dict[str, tuple[float, float]]]:
    """Retrain a run from its logged config and seed (or `seed`) into a new run tagged `reproduces`.

    Returns the new run and, per test metric, (original, reproduced). With `deterministic`
    on the CPU and the run's own seed the two match exactly.
    """
    from harness.checkpoints import get_run, load_run_config

    client = client_for(tracking_uri)
    original = get_run(client, run_id)
    refuse_transfer_child(original, "reproduced")
    cfg = load_run_config(client, run_id)
    if data_dir:
        cfg = C.replace(cfg, {"data": {"root": data_dir}})
    if seed is not None:
        cfg = C.replace(cfg, {"seed": seed})
    ds = load_dataset(cfg.data)
    tags = {"reproduces": run_id}
    if original.data.tags.get("dataset_digest") not in (None, ds.digest):
        tags["dataset_digest_differs"] = "true"  # another copy of the data: expect different figures
    exp_name = client.get_experiment(original.info.experiment_id).name
    if "run_kind" not in original.data.tags and "mlflow.parentRunId" not in original.data.tags:  # a train run
        experiment_id(client, exp_name, description=train_description(exp_name))
    name = f"reproduce-{original.info.run_name}" + (f"-seed{seed}" if seed is not None else "")
    run = RunLogger.start(client, exp_name, name, tags=tags)
    result = train_run(cfg, run, ds, progress=progress)
    diffs = {
        k: (original.data.metrics[k], v)
        for k, v in result.metrics.items()
        if k in original.data.metrics and not k.startswith(("test_precision_", "test_recall_", "test_f1_"))
    }
    diffs["best_val_accuracy"] = (
        original.data.metrics.get("best_val_accuracy", float("nan")),
        result.fit.best_val_accuracy,
    )
    return result, diffs


def refuse_transfer_child(run, what: str) -> None:
    """A transfer or split-study child starts from another run's weights, which its config does not
    hold: retrained from the config alone it would silently be a different experiment."""
    from harness.checkpoints import RunNotFound

    mode = run.data.tags.get("transfer_mode")
    if mode is None:
        return
    source = run.data.tags.get("source_run_id")
    again = (
        f"run `harness transfer --from {source} --modes {run.info.run_name}` again"
        if source
        else "run its split study again (`harness split-study`)"
    )
    raise RunNotFound(
        f"run {run.info.run_id} is a transfer child (mode {mode}): it starts from another run's "
        f"weights, so it cannot be {what} from its config alone; {again}"
    )


def resume_run(
    run_id: str, tracking_uri: str | None = None, data_dir: str | None = None, progress: bool = True
) -> RunResult:
    """`harness train --resume RUN_ID`: a stopped run continues from its last checkpoint, in the
    same run, its metrics going on from the epoch it reached."""
    from harness.checkpoints import RunNotFound, get_run, load_run_config

    client = client_for(tracking_uri)
    original = get_run(client, run_id)
    refuse_transfer_child(original, "resumed")
    if original.data.tags.get("run_kind") == "trial":
        raise RunNotFound(
            f"run {run_id} is a trial of study {original.data.tags.get('study')}: run the study's "
            "`harness tune` command again, which resumes its stopped trials"
        )
    if original.info.status == "FINISHED":
        raise RunNotFound(f"run {run_id} finished: there is nothing to resume (`harness reproduce` retrains it)")
    path = resume.path_for(client.tracking_uri, run_id)
    if not path.is_file():
        raise RunNotFound(
            f"run {run_id} left no checkpoint in {path.parent} (it stopped before its first, failed, "
            f"or ran with checkpoint_every=0; set ${resume.CHECKPOINT_DIR_ENV} if they live elsewhere)"
        )
    cfg = load_run_config(client, run_id)
    if data_dir:
        cfg = C.replace(cfg, {"data": {"root": data_dir}})
    ds = load_dataset(cfg.data)
    client.update_run(run_id, status="RUNNING")
    return train_run(
        cfg,
        RunLogger(client, run_id, experiment_id=original.info.experiment_id),
        ds,
        progress=progress,
        resume_from=run_id,
    )
