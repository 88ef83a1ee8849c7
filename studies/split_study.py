"""The controlled transfer study of Yosinski et al. (2014), on the two halves of CIFAR-10.

    run_split_study(data_dir="data")                      # a seeded split of the 10 classes
    run_split_study(classes_a=["airplane", "automobile", "bird", "cat", "deer"])

Base networks baseA and baseB, then AnB, BnB, AnB+ and BnB+ at every depth, all tested on B, each a
child of one parent run that holds the curves by depth. What each network is, what the paper finds
and how the runs are laid out: docs/transfer.md, "Split study".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness import config as C
from harness.data import Dataset, digest, load_dataset
from harness.models import CNN, build_model
from harness.recipes import config_path
from harness.studies.transfer import (
    CHILD_EVAL,
    ChildResult,
    TransferError,
    child_runner,
    children_table,
    log_config,
    log_summary_table,
    parent_run,
    start_parent,
)
from harness.tags import RUN_KIND
from harness.tracking import RunLogger, client_for
from harness.training import select_device

VARIANTS = ("AnB", "BnB", "AnB+", "BnB+")
# By profile: on a CPU a small budget, 14 runs of the default 3-stage net in about 15 minutes on
# 2 cores (4,000 training images of each half, 4 epochs); on a GPU 15 epochs. --set overrides it.
SPLIT_BUDGETS = {
    "quick": {"epochs": 4, "patience": 0, "data": {"train_subset": 4000, "val_subset": 1000, "test_subset": None}},
    "full": {"epochs": 15, "patience": 0},
}


@dataclass
class SplitResult:
    parent_run_id: str
    experiment: str
    classes_a: list[str]
    classes_b: list[str]
    children: list[ChildResult]
    table: pd.DataFrame  # one row per child
    curves: pd.DataFrame  # depth x variant: test accuracy on B

    @property
    def failed(self) -> list[ChildResult]:
        return [c for c in self.children if c.status != "FINISHED"]

    def child(self, name: str) -> ChildResult:
        return next(c for c in self.children if c.name == name)


def split_classes(
    num_classes: int, seed: int = 0, classes_a: list | None = None, names: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """Halves A and B of the class indices: `classes_a` (indices or names) and the rest, or a
    seeded random half."""
    if classes_a is None:
        order = np.random.default_rng(seed).permutation(num_classes)
        a = sorted(int(i) for i in order[: num_classes // 2])
    else:
        a = []
        for c in classes_a:
            if isinstance(c, str) and not c.strip().isdigit():
                if not names or c not in names:
                    raise TransferError(
                        f"unknown class {c!r} in classes_a: use class indices or names ({', '.join(names or [])})"
                    )
                a.append(names.index(c))
            else:
                a.append(int(c))
        if len(set(a)) != len(a) or not all(0 <= i < num_classes for i in a) or not 0 < len(a) < num_classes:
            raise TransferError(
                f"bad classes_a {classes_a}: distinct classes of 0..{num_classes - 1}, leaving at least one for B"
            )
        a = sorted(a)
    return a, [i for i in range(num_classes) if i not in a]


def select_classes(ds: Dataset, classes: list[int], name: str | None = None) -> Dataset:
    """The images of `classes` only, relabelled 0..len(classes)-1 in the order given."""
    lut = np.full(len(ds.classes), -1, dtype=np.int64)
    lut[list(classes)] = np.arange(len(classes))
    train = lut[ds.train_labels] >= 0
    test = lut[ds.test_labels] >= 0
    out = Dataset(
        name or f"{ds.name}[{','.join(map(str, classes))}]",
        ds.train_images[train],
        lut[ds.train_labels[train]],
        ds.test_images[test],
        lut[ds.test_labels[test]],
        [ds.classes[i] for i in classes],
        "",
    )
    out.digest = digest(out.train_images, out.train_labels, out.test_images, out.test_labels)
    return out


def split_config(
    config: str | None = None,
    data_dir: str | None = None,
    overrides: list[str] | dict | None = None,
    profile: str = "auto",
) -> C.Config:
    """The config every split-study run shares: defaults < YAML (the default config, and its
    profile) < the split study's budget for the profile < overrides."""
    cfg = C.load(config_path(config), None, data_dir, profile)
    extra = (C.parse_overrides(list(overrides)) if not isinstance(overrides, dict) else overrides) if overrides else {}
    device = extra.get("device", cfg.device)
    select_device(device)  # a device this machine lacks: one line, here
    budget = SPLIT_BUDGETS[C.pick_profile(profile, device)]
    return C.replace(cfg, C.merge(C.merge(C.merge(budget, CHILD_EVAL), {"name": "split"}), extra))


def copied_model(cfg: C.Config, base: CNN, depth: int, num_classes: int, frozen: bool) -> tuple[CNN, list[dict]]:
    """A fresh network (seeded) whose first `depth` stages are copied from `base` (and frozen)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes)
    for i in range(depth):
        model.stages[i].load_state_dict(base.stages[i].state_dict())
    model.freeze(depth if frozen else 0)
    return model, [{"params": model.trainable_parameters()}]


def split_description(experiment: str, dataset: str) -> str:
    """The split study experiment's description in the MLflow UI: what it holds and how to browse it."""
    return (
        "\n".join(
            [  # one line a paragraph: the UI renders every newline as a break
                f"**Split studies on {dataset}** (`harness split-study`; Yosinski et al., 2014): the classes split "
                "into "
                "halves A and B; one parent run per split (`split-seed<k>`, `split-given`) with its networks nested "
                "under "
                "it: `baseA`, `baseB`, and at each depth n `AnB`, `BnB` (first n stages copied and frozen) and `AnB+`, "
                "`BnB+` (copied, fine-tuned), all tested on B.",
                "",
                "- **Children**: expand a parent run (+) in the Runs table; tags `depth`, `copied_from` and the "
                "halves' "
                "classes.",
                "- **Summary**: on the parent run, `summary/split_study.png` (the four curves by depth, baseB as a "
                "line), "
                "the curves as CSV and Markdown, and metrics `AnB_test_accuracy`, ... with the depth as step.",
                f"- **Command line**: `harness ui --experiment {experiment}` (this page).",
            ]
        )
        + "\n"
    )


def run_split_study(
    data_dir: str | None = None,
    tracking_uri: str | None = None,
    overrides: list[str] | dict | None = None,
    config: str | None = None,
    classes_a: list | str | None = None,
    class_seed: int = 0,
    depths: list[int] | str | None = None,
    variants=VARIANTS,
    experiment: str | None = None,
    progress: bool = True,
    profile: str = "auto",
) -> SplitResult:
    """Train baseA, baseB and AnB/BnB/AnB+/BnB+ at each depth under one parent run.

    `classes_a`: A's classes (indices or names, a list or "a,b,c"), B the rest; by default a
    seeded half (`class_seed`). `depths`: default 1..S. Data, config and argument problems
    raise one line before any run exists.
    """
    classes_a, depths, variants = _listed(classes_a), _listed(depths, int), _listed(variants)
    cfg = split_config(config, data_dir, overrides, profile)
    ds = load_dataset(cfg.data)  # missing data: one line, before any run exists
    a, b = split_classes(len(ds.classes), class_seed, classes_a, ds.classes)
    ds_a, ds_b = select_classes(ds, a, f"{ds.name}-A"), select_classes(ds, b, f"{ds.name}-B")
    depths = _checked_depths(depths, len(cfg.model.widths))
    _check_variants(variants)

    client = client_for(tracking_uri)
    experiment = experiment or f"transfer-split-{ds.name}"
    names_a, names_b = ds_a.classes, ds_b.classes
    halves = _halves_tags(names_a, names_b, class_seed, classes_a)
    parent = start_parent(
        client,
        experiment,
        split_description(experiment, ds.name),
        f"split-{'given' if classes_a else f'seed{class_seed}'}",
        {
            **halves,
            RUN_KIND: "split_study",
            "dataset": ds.name,
            "dataset_digest": ds.digest,
            "depths": ",".join(map(str, depths)),
            "variants": ",".join(variants),
        },
    )
    children: list[ChildResult] = []
    total = 2 + len(depths) * len(variants)
    with parent_run(parent, children):
        log_config(parent, cfg)
        child = child_runner(client, experiment, parent, cfg, children, total, halves, progress, run_when_failed=True)
        bases = _train_bases(child, ds_a, ds_b)
        _train_copies(child, cfg, bases, ds_b, depths, variants)
        table = children_table(children, ("depth",))
        table["depth"] = table["depth"].astype(int)
        curves = _curves(table, variants)
        _log_summary(parent, table, curves, children, names_a, names_b)
    return SplitResult(parent.run_id, experiment, names_a, names_b, children, table, curves)


def _listed(value, kind=str.strip):
    """The command line's "a,b,c" as a list, each item `kind(item)` (a list or None as it is)."""
    if not isinstance(value, str):
        return value
    return [kind(v) for v in value.split(",") if v.strip()]


def _checked_depths(depths: list[int] | None, num_stages: int) -> list[int]:
    """The depths to copy at (default: every stage), each one a stage the network has."""
    depths = list(depths or range(1, num_stages + 1))
    if any(not 1 <= n <= num_stages for n in depths):
        raise TransferError(f"bad depths {depths}: each in 1..{num_stages} (the network's stages)")
    return depths


def _check_variants(variants) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise TransferError(f"unknown split-study variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")


def _halves_tags(names_a: list[str], names_b: list[str], class_seed: int, classes_a) -> dict:
    """The split on every run of the study: A's and B's classes, and the seed that drew them."""
    return {
        "split_classes_a": ",".join(names_a),
        "split_classes_b": ",".join(names_b),
        "class_seed": class_seed if classes_a is None else "given",
    }


def _train_bases(child, ds_a: Dataset, ds_b: Dataset) -> dict[str, CNN]:
    """baseA and baseB, each trained on its half; a failed base ends the study (its copies need it)."""
    bases = {}
    for half, data in (("A", ds_a), ("B", ds_b)):
        c = child(f"base{half}", "base", 0, data, lambda: (None, None), {"half": half, "depth": 0})
        if c.status != "FINISHED":
            raise TransferError(f"base network base{half} failed ({c.error}): see run {c.run_id}")
        bases[half] = c.model
    return bases


def _train_copies(child, cfg: C.Config, bases: dict[str, CNN], ds_b: Dataset, depths, variants) -> None:
    """At each depth n, each variant: the first n stages of baseA or baseB copied (frozen, or
    fine-tuned for the + variants) into a fresh network trained on B."""
    for n in depths:
        for v in variants:
            origin, frozen = v[0], not v.endswith("+")
            child(
                f"{origin}{n}B{'' if frozen else '+'}",
                v,
                n if frozen else 0,
                ds_b,
                lambda: copied_model(cfg, bases[origin], n, len(ds_b.classes), frozen),
                {"half": "B", "depth": n, "copied_from": f"base{origin}", "copied_stages": n},
            )


def metric_key(variant: str) -> str:
    """MLflow metric names allow no '+': AnB+ -> AnB_plus."""
    return variant.replace("+", "_plus")


def _curves(table: pd.DataFrame, variants) -> pd.DataFrame:
    ok = table[(table["status"] == "FINISHED") & (table["mode"].isin(variants))]
    curves = ok.pivot(index="depth", columns="mode", values="test_accuracy").reindex(columns=list(variants))
    base_b = table[(table["name"] == "baseB") & (table["status"] == "FINISHED")]["test_accuracy"]
    curves["baseB"] = float(base_b.iloc[0]) if len(base_b) else np.nan
    return curves


def curves_markdown(curves: pd.DataFrame) -> str:
    shown = curves.rename_axis("depth n").reset_index()
    return shown.to_markdown(index=False, floatfmt=[".0f"] + [".4f"] * (shown.shape[1] - 1))


def split_figure(curves: pd.DataFrame, title: str) -> Figure:
    fig = Figure(figsize=(6.5, 4.5), constrained_layout=True)
    ax = fig.subplots()
    styles = {
        "AnB": ("tab:red", "-", "o"),
        "BnB": ("tab:blue", "-", "o"),
        "AnB+": ("tab:red", "--", "^"),
        "BnB+": ("tab:blue", "--", "^"),
    }
    base_b = curves["baseB"].iloc[0] if len(curves) else np.nan
    if np.isfinite(base_b):
        ax.axhline(base_b, color="black", linestyle=":", label=f"baseB ({base_b:.3f})")
        ax.plot([0], [base_b], "ks")
    for v, (color, style, marker) in styles.items():
        if v in curves and curves[v].notna().any():
            ax.plot(curves.index, curves[v], color=color, linestyle=style, marker=marker, label=v)
    ax.set_xlabel("layers (stages) copied from the base network, n")
    ax.set_ylabel("test accuracy on B")
    ax.set_xticks(range(0, int(max(curves.index, default=0)) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def _log_summary(
    parent: RunLogger,
    table: pd.DataFrame,
    curves: pd.DataFrame,
    children: list[ChildResult],
    names_a: list[str],
    names_b: list[str],
) -> None:
    flat = {}
    for c in children:
        if c.status == "FINISHED":
            flat[f"{metric_key(c.name)}_test_accuracy"] = c.metrics["test_accuracy"]
    parent.log_metrics(flat)
    for depth, row in curves.iterrows():  # the curves as metric histories, depth as the step
        parent.log_metrics(
            {f"{metric_key(v)}_test_accuracy": row[v] for v in curves.columns if v != "baseB" and np.isfinite(row[v])},
            step=int(depth),
        )
    log_summary_table(parent, table, "summary/split_study_runs")
    shown = curves.rename_axis("depth n").reset_index()
    parent.log_text(shown.to_csv(index=False), "summary/split_study.csv")
    parent.log_text(
        f"A = {', '.join(names_a)}; B = {', '.join(names_b)}; test accuracy on B\n\n" + curves_markdown(curves) + "\n",
        "summary/split_study.md",
    )
    if len(curves):
        parent.log_figure(
            split_figure(curves, f"A = {', '.join(names_a)}\nB = {', '.join(names_b)}"), "summary/split_study.png"
        )
