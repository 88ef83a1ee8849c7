"""Transfer study: a trained source run carried to a target dataset, one MLflow child run per mode.

    run_transfer("best:STUDY" | RUN_ID, target="cifar100")

The source model comes back from its weights-only checkpoint (`load_run_model`), gets a new head
for the target's classes, and trains with `train_run` once per mode (probe, finetune, freeze_k,
scratch), each a child of one parent run that holds the summary. Frozen layers are a fixed
function (`CNN.freeze`). The modes, runs and failures: docs/transfer.md. Callers (the CLI) should
exit non-zero when `TransferResult.failed` is not empty.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness import config as C
from harness.checkpoints import get_run, load_run_model
from harness.data import Dataset, load_dataset
from harness.errors import HarnessError
from harness.models import CNN
from harness.tags import TRIAL_NUMBER
from harness.tracking import RunLogger, client_for, error_line, experiment_id
from harness.training import select_device

MODES = ("probe", "finetune", "freeze", "scratch")  # `freeze` expands to freeze_0 .. freeze_S
BACKBONE_LR_SCALE = 0.1
# The transfer budget, applied over the source's config and under --set overrides. On a CPU it
# is small: 5,000 training images (50 a class on CIFAR-100), 3 epochs, so the 7 children of a
# 3-stage network take minutes, not hours; on a GPU the full data. The full test set always.
TRANSFER_BUDGETS = {  # by profile: quick on a CPU, full on a GPU (harness.config.pick_profile)
    "quick": {"epochs": 3, "patience": 0, "data": {"train_subset": 5000, "val_subset": 1000, "test_subset": None}},
    "full": {"epochs": 15, "patience": 0, "data": {"train_subset": None, "val_subset": None, "test_subset": None}},
}
# children skip the slow embedding projections (`harness analyze` draws them on demand)
CHILD_EVAL = {"eval": {"tsne": False, "umap": False}}


class TransferError(HarnessError, RuntimeError):
    """A transfer that cannot start; the message is one line naming the problem and the fix."""


@dataclass
class ChildResult:
    name: str  # probe | finetune | freeze_k | scratch (split study: A2B, B1B+, ...)
    mode: str
    frozen_stages: int
    run_id: str
    status: str  # FINISHED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    tags: dict = field(default_factory=dict)
    model: CNN | None = field(default=None, repr=False)  # the trained network (on the CPU when logged)


@dataclass
class TransferResult:
    parent_run_id: str
    experiment: str
    source_run_id: str
    source_study: str | None
    target: str
    children: list[ChildResult]
    table: pd.DataFrame

    @property
    def failed(self) -> list[ChildResult]:
        return [c for c in self.children if c.status != "FINISHED"]

    def child(self, name: str) -> ChildResult:
        return next(c for c in self.children if c.name == name)


# ----------------------------------------------------------------------------
# Source and target


def resolve_source(source: str, tracking_uri: str | None = None, storage: str | None = None) -> tuple[str, str | None]:
    """`best:STUDY` -> (the best trial's run id, STUDY); `models:/NAME@ALIAS` (a study's
    `models:/STUDY@champion`), `models:/NAME/VERSION` or `models:/<model_id>` -> (the run that
    logged that model, None); a run id -> (it, None)."""
    source = source.strip()
    if source.startswith("models:/"):
        return _model_source_run(source, tracking_uri), None
    if not source.startswith("best:"):
        if not source:
            raise TransferError("no source given: pass --from best:STUDY, models:/STUDY@champion or RUN_ID")
        return source, None
    study = source.removeprefix("best:").strip()
    if not study:
        raise TransferError("bad source 'best:': name the study, e.g. --from best:cifar10-cnn")
    try:
        from harness.studies.results import best_run_id
    except ImportError:
        raise TransferError(
            f"cannot resolve best:{study}: harness.studies.results.best_run_id is not available "
            "in this install; pass the run id instead (--from RUN_ID)"
        ) from None
    return best_run_id(study, storage=storage, tracking_uri=tracking_uri), study


def _model_source_run(uri: str, tracking_uri: str | None = None) -> str:
    """The run that logged the model a `models:/` URI names, or one line naming what is unknown."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    ref = uri.removeprefix("models:/").strip("/")
    name, alias = ref.rsplit("@", 1) if "@" in ref else (ref, "")
    name, _, version = name.partition("/")
    if not alias and not version:  # a LoggedModel id, models:/m-...
        try:
            return client.get_logged_model(name).source_run_id
        except MlflowException:
            raise TransferError(
                f"no logged model {name!r} in {client.tracking_uri}: check the URI "
                "(models:/STUDY@champion, models:/NAME/VERSION) or pass --tracking-uri"
            ) from None
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise TransferError(
            f"no registered model {name!r} in {client.tracking_uri} (registered: "
            f"{', '.join(known) or 'none'}): a study registers its champion once a trial that "
            "logged its model completes; check the name or pass --tracking-uri"
        ) from None
    aliases = ", ".join(sorted(model.aliases)) or "none"
    if alias and alias not in model.aliases:
        raise TransferError(
            f"registered model {name!r} has no alias {alias!r} (its aliases: {aliases}): "
            f"use e.g. models:/{name}@champion"
        )
    try:
        run_id = client.get_model_version(name, model.aliases[alias] if alias else version).run_id
    except MlflowException:
        raise TransferError(
            f"registered model {name!r} has no version {version!r}: check the version "
            f"or name an alias (its aliases: {aliases})"
        ) from None
    if not run_id:
        raise TransferError(f"{uri} was registered without its run: pass the run id instead (--from RUN_ID)")
    return run_id


def load_source(client, run_id: str) -> tuple[C.Config, CNN, object]:
    """The source run, its config and its trained model (weights-only checkpoint, on the CPU)."""
    run = get_run(client, run_id)  # RunNotFound: one line
    cfg, model = load_run_model(client, run_id, device="cpu")
    return cfg, model, run


def _overrides(overrides: list[str] | dict | None) -> dict:
    if not overrides:
        return {}
    return C.parse_overrides(list(overrides)) if not isinstance(overrides, dict) else overrides


def target_config(
    source_cfg: C.Config,
    target: str,
    data_dir: str | None = None,
    overrides: list[str] | dict | None = None,
    label: str = "fine",
) -> C.Config:
    """The source's config (architecture, optimizer, seed) on the target dataset, with the
    transfer budget for the device it will run on, then `--set` overrides (for every child)."""
    if target not in C.CHOICES["data.dataset"]:
        raise TransferError(f"unknown target {target!r}: choose one of {', '.join(C.CHOICES['data.dataset'])}")
    root = data_dir or os.environ.get(C.DATA_DIR_ENV) or source_cfg.data.root
    cfg = C.replace(
        source_cfg,
        C.merge({"name": f"transfer-{target}", "data": {"dataset": target, "label": label, "root": root}}, CHILD_EVAL),
    )
    extra = _overrides(overrides)
    select_device(extra.get("device", cfg.device))  # a device this machine lacks: one line, here
    budget = TRANSFER_BUDGETS[C.pick_profile("auto", extra.get("device", cfg.device))]
    return C.replace(cfg, C.merge(budget, extra))


def load_target(cfg: C.Config) -> Dataset:
    """The target data, or one line (DatasetError) saying where it was looked for and how to fix it."""
    return load_dataset(cfg.data)


# ----------------------------------------------------------------------------
# Models for each mode


def transfer_model(source: CNN, num_classes: int, seed: int = 0) -> CNN:
    """A copy of the source with a fresh head for `num_classes` (the source stays untouched).

    The head is drawn from `seed`, not from wherever the global generator stands, so a child's
    result does not depend on which children ran before it."""
    model = copy.deepcopy(source).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.replace_head(num_classes)
    model.freeze(0)
    return model.train()


def backbone_parameters(model: CNN) -> list:
    return [p for p in [*model.stages.parameters(), *model.embedding.parameters()] if p.requires_grad]


def head_parameters(model: CNN) -> list:
    return [p for p in model.classifier.parameters() if p.requires_grad]


def expand_modes(modes, num_stages: int) -> list[tuple[str, str, int]]:
    """["probe", "freeze", "freeze_2", ...] -> [(name, mode, frozen_stages)] in a stable order."""
    if isinstance(modes, str):
        modes = [m for m in modes.split(",") if m.strip()]
    out = []
    for m in (m.strip() for m in modes):
        if m == "freeze":
            out += [(f"freeze_{k}", "freeze", k) for k in range(num_stages + 1)]
        elif m.startswith("freeze_") and m[7:].isdigit() and int(m[7:]) <= num_stages:
            out.append((m, "freeze", int(m[7:])))
        elif m == "probe":
            out.append((m, m, num_stages))
        elif m in ("finetune", "scratch"):
            out.append((m, m, 0))
        else:
            raise TransferError(
                f"unknown transfer mode {m!r}: choose from probe, finetune, freeze "
                f"(all depths) or freeze_0..freeze_{num_stages}, scratch"
            )
    seen = set()
    return [x for x in out if not (x[0] in seen or seen.add(x[0]))]


def build_child(
    source: CNN, mode: str, frozen: int, num_classes: int, backbone_lr_scale: float = BACKBONE_LR_SCALE, seed: int = 0
) -> tuple[CNN | None, list[dict] | None]:
    """The model and optimizer parameter groups of one mode (scratch: (None, None): a fresh model)."""
    if mode == "scratch":
        return None, None
    model = transfer_model(source, num_classes, seed)
    if mode == "probe":
        model.freeze(len(model.stages), embedding=True)
        return model, [{"params": head_parameters(model)}]
    if mode == "finetune":
        return model, [
            {"params": backbone_parameters(model), "lr_scale": backbone_lr_scale},
            {"params": head_parameters(model)},
        ]  # the head last: fit logs its lr
    model.freeze(frozen)
    return model, [{"params": model.trainable_parameters()}]


# ----------------------------------------------------------------------------
# Running children under a parent (shared with the split study)


def run_child(
    client,
    experiment: str,
    parent_run_id: str,
    name: str,
    mode: str,
    frozen: int,
    cfg: C.Config,
    ds: Dataset,
    build: Callable[[], tuple],
    tags: dict,
    progress: bool = True,
) -> ChildResult:
    """One nested child: create it, build its model, `train_run` it; a failure ends it FAILED and
    comes back as a FAILED ChildResult (KeyboardInterrupt propagates, the child ended KILLED)."""
    from harness.experiment import train_run

    tags = {**tags, "transfer_mode": mode, "frozen_stages": frozen}
    run = RunLogger.start(client, experiment, name, tags=tags, parent_run_id=parent_run_id)
    try:
        with run:  # a failure ends the child FAILED (a stop: KILLED), whether in building or training
            model, groups = build()
            if model is not None:
                run.set_tags(
                    {
                        "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
                        "frozen_modules": ",".join(model.frozen) or "none",
                    }
                )
            else:
                run.set_tags({"trainable_params": "all"})
            result = train_run(
                C.replace(cfg, {"name": name}), run, ds, progress=progress, model=model, param_groups=groups
            )
    except Exception as e:
        return ChildResult(name, mode, frozen, run.run_id, "FAILED", error=error_line(e), tags=tags)
    metrics = {
        **result.metrics,
        "best_val_accuracy": result.fit.best_val_accuracy,
        "epochs_trained": len(result.fit.history),
    }
    return ChildResult(name, mode, frozen, run.run_id, "FINISHED", metrics, tags=tags, model=result.model)


def children_table(children: list[ChildResult], extra_tags: tuple[str, ...] = ()) -> pd.DataFrame:
    rows = []
    for c in children:
        row = {
            "name": c.name,
            "mode": c.mode,
            "frozen_stages": c.frozen_stages,
            "test_accuracy": c.metrics.get("test_accuracy", np.nan),
        }
        if any("test_coarse_accuracy" in k.metrics for k in children):
            row["test_coarse_accuracy"] = c.metrics.get("test_coarse_accuracy", np.nan)
        row["best_val_accuracy"] = c.metrics.get("best_val_accuracy", np.nan)
        row.update({t: c.tags.get(t) for t in extra_tags})
        row.update({"status": c.status, "run_id": c.run_id, "error": c.error or ""})
        rows.append(row)
    return pd.DataFrame(rows)


def log_summary_table(run: RunLogger, table: pd.DataFrame, stem: str) -> None:
    """A study's table as CSV (to load) and Markdown (to read) on its parent run."""
    run.log_text(table.to_csv(index=False), f"{stem}.csv")
    run.log_text(table.to_markdown(index=False, floatfmt=".4f") + "\n", f"{stem}.md")


@contextmanager
def parent_run(run: RunLogger, children: list[ChildResult]):
    """The body of a study's parent run: `finish_parent` ends it from its children (filled in by
    the body); Ctrl-C or SIGTERM end it KILLED, an error FAILED with the reason (RunLogger)."""
    with run:
        yield
        finish_parent(run, children)
    for c in children:  # small networks: keep them, off the accelerator
        c.model = c.model.cpu() if c.model is not None else None


def finish_parent(run: RunLogger, children: list[ChildResult]) -> None:
    failed = [c for c in children if c.status != "FINISHED"]
    run.log_metrics({"children_finished": len(children) - len(failed), "children_failed": len(failed)})
    if failed:
        run.set_tags({"failed_modes": ",".join(c.name for c in failed)})
    if children and len(failed) == len(children):
        run.end("FAILED", f"all {len(children)} children failed; first: {failed[0].name}: {failed[0].error}")
    else:
        run.end("FINISHED")


def start_parent(client, experiment: str, description: str, name: str, tags: dict) -> RunLogger:
    """A study's parent run, in its experiment (created with its description in the UI if new)."""
    experiment_id(client, experiment, description=description)
    return RunLogger.start(client, experiment, name, tags=tags)


def log_config(run: RunLogger, cfg: C.Config, params: dict | None = None) -> None:
    """The config every child starts from, on the parent: as params (with `params`) and as YAML."""
    run.log_params({**C.flatten(C.to_dict(cfg)), **(params or {})})
    run.log_text(C.to_yaml(cfg), "config.yaml")


def child_runner(
    client,
    experiment: str,
    parent: RunLogger,
    cfg: C.Config,
    children: list[ChildResult],
    total: int,
    tags: dict,
    progress: bool = True,
    run_when_failed: bool = False,
) -> Callable[..., ChildResult]:
    """`run_child` for the children of `parent`: `tags` on each, each result appended to `children`
    and, with progress, reported in a line (`child_line`) as it ends."""

    def run(name: str, mode: str, frozen: int, ds: Dataset, build: Callable[[], tuple], more: dict) -> ChildResult:
        c = run_child(
            client, experiment, parent.run_id, name, mode, frozen, cfg, ds, build, {**tags, **more}, progress=progress
        )
        children.append(c)
        if progress:
            print(child_line(len(children), total, c, run_when_failed), flush=True)
        return c

    return run


def child_line(i: int, n: int, c: ChildResult, run_when_failed: bool = False) -> str:
    """`[i/n] name: ...`: the child's test accuracy (and coarse accuracy) and run, or why it failed."""
    if c.status != "FINISHED":
        return f"[{i}/{n}] {c.name}: FAILED ({c.error})" + (f"  (run {c.run_id})" if run_when_failed else "")
    coarse = c.metrics.get("test_coarse_accuracy")
    extra = f", coarse {coarse:.4f}" if coarse is not None else ""
    return f"[{i}/{n}] {c.name}: test accuracy {c.metrics['test_accuracy']:.4f}{extra}  (run {c.run_id})"


# ----------------------------------------------------------------------------
# Summary


def depth_figure(
    table: pd.DataFrame, title: str, num_classes: int | None = None, num_coarse: int | None = None
) -> Figure:
    """Target test accuracy against frozen depth (fine, and coarse when present); probe,
    full fine-tune and scratch as horizontal lines."""
    ok = table[table["status"] == "FINISHED"]
    coarse = "test_coarse_accuracy" in table
    metrics = [("test_accuracy", f"{'fine, ' if coarse else ''}{num_classes or '?'} classes")]
    if coarse:
        metrics.append(("test_coarse_accuracy", f"coarse, {num_coarse or '?'} superclasses"))
    fig = Figure(figsize=(5.5 * len(metrics), 4.2), constrained_layout=True)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    lines = {
        "probe": ("tab:green", "--", "linear probe"),
        "finetune": ("tab:purple", "-.", "full fine-tune"),
        "scratch": ("tab:gray", ":", "from scratch"),
    }
    for ax, (key, label) in zip(axes, metrics):
        freeze = ok[ok["mode"] == "freeze"].sort_values("frozen_stages")
        if len(freeze):
            ax.plot(freeze["frozen_stages"], freeze[key], "o-", color="tab:blue", label="first k stages frozen")
            for k, v in zip(freeze["frozen_stages"], freeze[key]):
                ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        for mode, (color, style, name) in lines.items():
            row = ok[ok["mode"] == mode]
            if len(row):
                v = float(row[key].iloc[0])
                ax.axhline(v, color=color, linestyle=style, label=f"{name} ({v:.3f})")
        ax.set_xlabel("stages frozen (k)")
        ax.set_ylabel(f"target test accuracy, {label}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------
# The study


def transfer_description(experiment: str, target: str) -> str:
    """The transfer experiment's description in the MLflow UI: what it holds and how to browse it."""
    return (
        "\n".join(
            [  # one line a paragraph: the UI renders every newline as a break
                f"**Transfer to {target}** (`harness transfer`, `harness tune --transfer`): one parent run per "
                "transfer, "
                "`<source>-><target>`, with one run per mode nested under it: `probe` (new head only), `finetune` "
                "(all, "
                "the backbone at a smaller learning rate), `freeze_<k>` (first k stages frozen), `scratch` (random "
                "weights).",
                "",
                "- **Children**: expand a parent run (+) in the Runs table. Every run is tagged with its source "
                "(`source_run_id`, `source_study`, `source_trial_number`) and the source's label smoothing and "
                "dropout.",
                "- **Summary**: on the parent run, `summary/`: test accuracy against frozen depth (PNG) and the "
                "table of "
                "children (CSV, Markdown).",
                f"- **Command line**: `harness ui --experiment {experiment}` (this page), `harness analyze <child "
                "run id>` "
                "(features stage by stage, with CKA against the source model).",
            ]
        )
        + "\n"
    )


def run_transfer(
    source: str,
    target: str = "cifar100",
    data_dir: str | None = None,
    tracking_uri: str | None = None,
    overrides: list[str] | dict | None = None,
    modes=MODES,
    backbone_lr_scale: float = BACKBONE_LR_SCALE,
    storage: str | None = None,
    experiment: str | None = None,
    progress: bool = True,
) -> TransferResult:
    """Transfer `source` (a run id or `best:STUDY`) to `target`: one parent run, one child per mode.

    Everything that can fail for all children (source run, checkpoint, config, target data)
    is checked before a run is created, and raises one line.
    """
    client = client_for(tracking_uri)
    source_run_id, study = resolve_source(source, tracking_uri, storage)
    source_cfg, source_model, src = load_source(client, source_run_id)
    cfg = target_config(source_cfg, target, data_dir, overrides)
    children_spec = expand_modes(modes, len(source_model.stages))
    if not children_spec:
        raise TransferError("no transfer mode chosen: pass e.g. --modes probe,finetune,freeze,scratch")
    ds = load_target(cfg)
    study = study or src.data.tags.get("study")  # a study's trial run knows its study
    tags = _source_tags(src, source_run_id, source_cfg, study)
    experiment = experiment or f"transfer-{target}"
    parent = start_parent(
        client,
        experiment,
        transfer_description(experiment, target),
        f"{study or src.info.run_name or source_run_id[:8]}->{target}",
        {
            **tags,
            "target_dataset": target,
            "dataset_digest": ds.digest,
            "transfer_modes": ",".join(n for n, _, _ in children_spec),
            "backbone_lr_scale": backbone_lr_scale,
        },
    )
    children: list[ChildResult] = []
    with parent_run(parent, children):
        log_config(parent, cfg, {"backbone_lr_scale": backbone_lr_scale, "source_run_id": source_run_id})
        child = child_runner(client, experiment, parent, cfg, children, len(children_spec), tags, progress)
        _train_modes(child, children_spec, source_model, ds, backbone_lr_scale, cfg.seed)
        table = children_table(children, ("source_label_smoothing", "source_dropout"))
        _log_summary(parent, table, children, _summary_figure(table, source_cfg, source_run_id, target, ds))
    return TransferResult(parent.run_id, experiment, source_run_id, study, target, children, table)


def _source_tags(src, source_run_id: str, source_cfg: C.Config, study: str | None) -> dict:
    """What every run of a transfer records of its source, so that runs of different sources compare
    (empty ones left out)."""
    tags = {
        "source_run_id": source_run_id,
        "source_study": study or "",
        "source_run_name": src.info.run_name,
        "source_dataset": source_cfg.data.dataset,
        "source_label_smoothing": source_cfg.label_smoothing,
        "source_dropout": source_cfg.model.dropout,
        "source_test_accuracy": src.data.metrics.get("test_accuracy"),
    }
    tags = {k: v for k, v in tags.items() if v not in (None, "")}
    if TRIAL_NUMBER in src.data.tags:
        tags["source_trial_number"] = src.data.tags[TRIAL_NUMBER]
    return tags


def _train_modes(child, children_spec, source_model: CNN, ds: Dataset, backbone_lr_scale: float, seed: int) -> None:
    """One child per mode, in order; only fine-tuning scales the backbone's learning rate."""
    for name, mode, frozen in children_spec:
        child(
            name,
            mode,
            frozen,
            ds,
            lambda: build_child(source_model, mode, frozen, len(ds.classes), backbone_lr_scale, seed),
            {"backbone_lr_scale": backbone_lr_scale if mode == "finetune" else 1.0},
        )


def _summary_figure(
    table: pd.DataFrame, source_cfg: C.Config, source_run_id: str, target: str, ds: Dataset
) -> Figure | None:
    """Accuracy by frozen depth, titled with what the source was trained with (None: no child finished)."""
    if not (table["status"] == "FINISHED").any():
        return None
    title = (
        f"{source_cfg.data.dataset} run {source_run_id[:8]} -> {target} "
        f"(source label smoothing {source_cfg.label_smoothing:g}, dropout {source_cfg.model.dropout:g})"
    )
    return depth_figure(table, title, len(ds.classes), len(ds.coarse_classes or []) or None)


def _log_summary(parent: RunLogger, table: pd.DataFrame, children: list[ChildResult], figure: Figure | None) -> None:
    metrics = {}
    for c in children:
        for key in ("test_accuracy", "test_coarse_accuracy"):
            if key in c.metrics:
                metrics[f"{c.name}_{key}"] = c.metrics[key]
    parent.log_metrics(metrics)
    for c in sorted(
        (c for c in children if c.mode == "freeze" and c.status == "FINISHED"), key=lambda c: c.frozen_stages
    ):  # a curve by depth in the UI's charts
        parent.log_metrics(
            {f"freeze_{k}": v for k, v in c.metrics.items() if k in ("test_accuracy", "test_coarse_accuracy")},
            step=c.frozen_stages,
        )
    log_summary_table(parent, table, "summary/transfer")
    if figure is not None:
        parent.log_figure(figure, "summary/accuracy_by_frozen_depth.png")
