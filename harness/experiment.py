"""One experiment end to end: data, model, training, evaluation, and all of it in MLflow.

`train_run` is what `harness train`, every study trial and `harness reproduce` call. It ends
the MLflow run FINISHED, FAILED (with the reason) or KILLED (Ctrl-C), keeping what was logged.
What follows training (harness/eval_logging.py: test set, figures, embeddings, the model) happens
before the run ends, or, for study trials, in a background `Finisher` while the next trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness import config as C
from harness import resume
from harness.data import Dataset, Splits, load_dataset, make_normalize, make_splits
from harness.eval_logging import log_evaluation
from harness.evaluation import EvalResult
from harness.models import CNN, build_model, count_macs, count_parameters, whiten_stem
from harness.tags import RUN_KIND
from harness.tracking import RunLogger, client_for, experiment_id, git_commit
from harness.training import Callback, FitResult, fit, seed_everything, select_device
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
            ds, device, splits, model = prepare(cfg, ds, model)
            logged = resumed(run, state, resume_from)  # epochs this run logged before (resumed into itself)
            if not logged:
                log_setup(run, cfg, ds, model, device)
            callbacks = [epoch_logger(run, logged), *callbacks]
            start = time.perf_counter()
            result = fit(model, splits, cfg, device, callbacks, param_groups, progress, checkpoint, resume=state)
            log_fit(
                run, result, len(splits.val_y), train_seconds=time.perf_counter() - start, setup_seconds=start - begun
            )
            test, metrics = evaluate(run, cfg, model, ds, splits, finisher)
            run.log_metrics({"tracking_seconds": run.seconds})
            run.killed_note = ""
            resume.discard(own)  # done: before the run ends, so a checkpoint on disk is an unfinished run's
    except KeyboardInterrupt:
        raise  # Ctrl-C or SIGTERM: the checkpoint stays, to resume from
    except BaseException:
        resume.discard(own)  # pruned or failed: nothing to resume
        raise
    return RunResult(run.run_id, result, test, metrics, model, len(splits.val_y))


def prepare(cfg: C.Config, ds: Dataset | None, model: CNN | None) -> tuple[Dataset, torch.device, Splits, CNN]:
    """The data on the device and the model to train: `model` (transfer's), or a fresh one whose
    whitening stem is set from the training images."""
    ds = ds or load_dataset(cfg.data)
    seed_everything(cfg.seed, cfg.deterministic)
    device = select_device(cfg.device)
    splits = make_splits(ds, cfg.data, device)
    if model is None:
        model = build_model(cfg.model, len(ds.classes)).to(device)
        whiten_stem(model, make_normalize(device)(splits.train_x[:STEM_IMAGES]))
    return ds, device, splits, model.to(device)


def resumed(run: RunLogger, state: dict | None, resume_from: str | None) -> int:
    """Tags a resumed run and returns how many epochs it logged already: 0 unless it resumes into
    itself, then its checkpoint's epoch, or one more where a stop came after an epoch's log and
    before its checkpoint (so each epoch is logged once)."""
    if state is None:
        return 0
    run.killed_note = f"; resumable from the end of epoch {state['epoch']}"
    run.set_tags({"resumed_from": resume_from, "resumed_at_epoch": state["epoch"]})
    if resume_from != run.run_id:
        return 0
    history = run.client.get_metric_history(run.run_id, "val_accuracy")
    return max([state["epoch"], *(m.step for m in history)])


def epoch_logger(run: RunLogger, logged: int) -> Callback:
    """A callback that logs each epoch's metrics at its step, but only those past `logged`."""

    def log_epoch(m):
        if m.epoch > logged:
            run.log_metrics(m.as_dict(), step=m.epoch)

    return log_epoch


def log_fit(run: RunLogger, result: FitResult, val_images: int, train_seconds: float, setup_seconds: float) -> None:
    """What training reached (the best validation accuracy, with its interval), and in how long."""
    run.log_metrics(
        {
            "best_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_trained": len(result.history),
            "train_seconds": train_seconds,
            "setup_seconds": setup_seconds,  # data on the device, model, what the run is
            "val_images": val_images,
            **interval_metrics("best_val_accuracy", result.best_val_accuracy, val_images),
        }
    )
    run.set_tags({"stopped_early": result.stopped_early})


def evaluate(
    run: RunLogger, cfg: C.Config, model: CNN, ds: Dataset, splits: Splits, finisher
) -> tuple[EvalResult | None, dict]:
    """The test set's evaluation, logged now, or handed to a study's finisher (then (None, {}))."""
    if finisher is None:
        return log_evaluation(run, cfg, model, ds, splits.test_x, splits.test_y)
    finisher.submit(run, cfg, model)
    return None, {}


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
    if RUN_KIND not in original.data.tags and "mlflow.parentRunId" not in original.data.tags:  # a train run
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
    if original.data.tags.get(RUN_KIND) == "trial":
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
