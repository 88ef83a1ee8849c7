"""Transfer and split studies end to end on generated data, a real MLflow SQLite store, tiny budgets.

One source run (the generated CIFAR-10 of conftest, two stages of widths [8, 16], label smoothing
and dropout 0.1) is trained once for the module, and one transfer study from it to a generated
CIFAR-100 is run once and read by most tests.

The CIFAR-100 here has the real `cifar-100-python/` layout and fine + coarse labels but 15 fine
classes in 5 superclasses rather than 100 in 20 (this module trains ten CIFAR-100 runs); the
100-class loader itself is tested in test_data.py.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_tiny_config, new_tracking_uri, tiny_trial, write_cifar100
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from harness import config as C
from harness.checkpoints import RunNotFound, load_run_model
from harness.data import DatasetError, load_dataset
from harness.experiment import run_experiment
from harness.studies.split_study import run_split_study, select_classes, split_classes
from harness.studies.transfer import TransferError, expand_modes, run_transfer

# nearly every test reads the module's transfer study (a source run and six children, ~50 s on 2 busy
# cores): the whole module is out of the fast subset
pytestmark = pytest.mark.slow

# every transfer child trains one epoch (the CPU transfer budget would take 3 on 10,000 images)
# and draws no per-run figures (tests/test_train_run.py checks those); the MLflow model is logged
# only where a test loads it
CHILD = ["epochs=1", "eval.figures=false"]
NO_MODEL = CHILD + ["eval.log_model=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, cifar10_root, empty_mlflow_db):
    tmp = tmp_path_factory.mktemp("transfer")
    c100 = write_cifar100(tmp / "data", n_train=600, n_test=200, seed=3, num_fine=15, num_coarse=5).root
    uri = new_tracking_uri(tmp, empty_mlflow_db)
    cfg = make_tiny_config(cifar10_root, label_smoothing=0.1, model={"dropout": 0.1}, eval={"log_model": True})
    source = run_experiment(cfg, uri, experiment="source", progress=False)
    result = run_transfer(
        source.run_id, "cifar100", data_dir=str(c100), tracking_uri=uri, overrides=NO_MODEL, progress=False
    )
    return {
        "tmp": tmp,
        "c10": cifar10_root,
        "data": c100,
        "uri": uri,
        "source": source,
        "result": result,
        "client": MlflowClient(uri),
    }


# ----------------------------------------------------------------------------
# The transfer study


def test_parent_and_children_tags_nesting_and_metrics(env):
    client, result, source = env["client"], env["result"], env["source"]
    assert not result.failed
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "transfer-cifar100"
    tags = parent.data.tags
    assert tags["source_run_id"] == source.run_id
    assert tags["source_label_smoothing"] == "0.1" and tags["source_dropout"] == "0.1"
    assert tags["target_dataset"] == "cifar100"

    names = ["probe", "finetune", "freeze_0", "freeze_1", "freeze_2", "scratch"]
    assert [c.name for c in result.children] == names
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{result.parent_run_id}'")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == sorted(names)
    frozen = {"probe": "2", "finetune": "0", "freeze_0": "0", "freeze_1": "1", "freeze_2": "2", "scratch": "0"}
    for name, run in by_name.items():
        assert run.info.status == "FINISHED"
        t = run.data.tags
        assert t["transfer_mode"] == name.split("_")[0]
        assert t["source_run_id"] == source.run_id
        assert t["frozen_stages"] == frozen[name]
        assert t["source_label_smoothing"] == "0.1" and t["source_dropout"] == "0.1"
        m = run.data.metrics
        assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["test_coarse_accuracy"] <= 1.0
        assert m["test_coarse_accuracy"] >= m["test_accuracy"] - 1e-6  # a right fine label is a right coarse one
    assert by_name["finetune"].data.tags["backbone_lr_scale"] == "0.1"

    pm = parent.data.metrics
    for name in names:
        assert pm[f"{name}_test_accuracy"] == pytest.approx(by_name[name].data.metrics["test_accuracy"])
        assert f"{name}_test_coarse_accuracy" in pm
    curve = client.get_metric_history(result.parent_run_id, "freeze_test_accuracy")
    assert sorted(m.step for m in curve) == [0, 1, 2]
    arts = {a.path for a in client.list_artifacts(result.parent_run_id, "summary")}
    assert {"summary/transfer.csv", "summary/transfer.md", "summary/accuracy_by_frozen_depth.png"} <= arts
    table = pd.read_csv(client.download_artifacts(result.parent_run_id, "summary/transfer.csv", str(env["tmp"])))
    assert list(table["name"]) == names
    assert {"test_accuracy", "test_coarse_accuracy", "run_id", "source_dropout"} <= set(table.columns)


def test_depth_figure_plots_each_childs_accuracy(env):
    """The summary figure shows the children's numbers: the freeze curve through freeze_k's accuracy at k,
    probe, fine-tune and scratch as horizontal lines at theirs; fine and coarse accuracy side by side."""
    from harness.studies.transfer import depth_figure

    table = env["result"].table
    fig = depth_figure(table, "the title", num_classes=15, num_coarse=5)
    try:
        assert fig.get_suptitle() == "the title"
        assert len(fig.axes) == 2
        by_name = table.set_index("name")
        for ax, key, label in zip(
            fig.axes, ["test_accuracy", "test_coarse_accuracy"], ["fine, 15 classes", "coarse, 5 superclasses"]
        ):
            assert ax.get_ylabel() == f"target test accuracy, {label}"
            curve, *flat = ax.lines
            assert list(curve.get_xdata()) == [0, 1, 2]
            expected = [by_name.loc[f"freeze_{k}", key] for k in range(3)]
            assert list(curve.get_ydata()) == pytest.approx(expected)
            assert [t.get_text() for t in ax.texts] == [f"{v:.3f}" for v in expected]
            lines = {line.get_label(): line.get_ydata() for line in flat}
            for mode, name in [("probe", "linear probe"), ("finetune", "full fine-tune"), ("scratch", "from scratch")]:
                v = by_name.loc[mode, key]
                assert list(lines[f"{name} ({v:.3f})"]) == pytest.approx([v, v]), mode
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [curve.get_label(), *lines]
    finally:
        plt.close(fig)


def test_split_figure_draws_the_four_curves_and_base_b():
    from harness.studies.split_study import split_figure

    curves = pd.DataFrame(
        {"AnB": [0.5, 0.25], "BnB": [0.75, 0.5], "AnB+": [0.625, 0.5], "BnB+": [0.75, 0.875], "baseB": [0.8, 0.8]},
        index=pd.Index([1, 2], name="depth"),
    )
    fig = split_figure(curves, "A = a\nB = b")
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "A = a\nB = b"
        lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
        assert list(lines) == ["baseB (0.800)", "AnB", "BnB", "AnB+", "BnB+"]
        assert list(lines["baseB (0.800)"].get_ydata()) == [0.8, 0.8]
        for v in ("AnB", "BnB", "AnB+", "BnB+"):
            assert list(lines[v].get_xdata()) == [1, 2] and list(lines[v].get_ydata()) == curves[v].tolist(), v
        assert lines["AnB"].get_linestyle() == "-" and lines["AnB+"].get_linestyle() == "--"  # + : fine-tuned
        assert list(ax.get_xticks()) == [0, 1, 2]
    finally:
        plt.close(fig)


def _child_state(env, name):
    model = env["result"].child(name).model  # the trained child, as train_run returned it
    return model, model.state_dict()


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
    assert keys
    return any(not torch.equal(before[k], after[k]) for k in keys)


def _unchanged(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]  # weights and BatchNorm statistics alike
    assert keys
    return all(torch.equal(before[k], after[k]) for k in keys)


def test_frozen_stages_unchanged_others_changed(env):
    src = env["source"].model.cpu().state_dict()
    for k in range(3):
        _, after = _child_state(env, f"freeze_{k}")
        for i, stage in enumerate(["stages.stage1.", "stages.stage2."], 1):
            if i <= k:
                assert _unchanged(src, after, stage), f"freeze_{k}: {stage} changed"
            else:
                assert _changed(src, after, stage), f"freeze_{k}: {stage} did not train"
        assert _changed(src, after, "embedding.")
    _, probe = _child_state(env, "probe")
    assert _unchanged(src, probe, "stages.") and _unchanged(src, probe, "embedding.")
    _, fine = _child_state(env, "finetune")
    assert _changed(src, fine, "stages.stage1.") and _changed(src, fine, "embedding.")


def test_new_head_has_target_classes(env):
    assert env["source"].model.num_classes == 10
    for c in env["result"].children:
        model, state = _child_state(env, c.name)
        assert model.num_classes == 15 and state["classifier.1.weight"].shape == (15, 16)


def test_a_childs_new_head_comes_from_the_seed_not_from_the_children_before_it(env):
    from harness.studies.transfer import build_child

    source = env["source"].model
    first, _ = build_child(source, "probe", 0, 15, seed=0)
    torch.rand(1000)  # what other children would have drawn from the global generator meanwhile
    again, _ = build_child(source, "probe", 0, 15, seed=0)
    finetune, _ = build_child(source, "finetune", 0, 15, seed=0)
    other, _ = build_child(source, "probe", 0, 15, seed=1)
    head = first.classifier[-1].weight
    assert torch.equal(head, again.classifier[-1].weight) and torch.equal(head, finetune.classifier[-1].weight)
    assert not torch.equal(head, other.classifier[-1].weight)


def test_a_transfer_child_is_not_reproduced_from_its_config_alone(env, capsys):
    from harness.cli import main

    child = next(c for c in env["result"].children if c.mode == "probe")
    assert main(["reproduce", child.run_id, "--tracking-uri", env["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a transfer child (mode probe)" in err
    assert f"harness transfer --from {env['source'].run_id} --modes probe" in err


def test_freeze_keeps_frozen_modules_in_eval_mode():
    from harness.models import build_model

    model = build_model(C.ModelConfig(widths=[8, 16], head_width=16), 10)
    model.freeze(1)
    model.train()
    assert not model.stages.stage1.training and model.stages.stage2.training and model.classifier.training
    assert not any(p.requires_grad for p in model.stages.stage1.parameters())
    model.freeze(2, embedding=True)  # replaces the last freeze
    model.train()
    assert not model.embedding.training and model.classifier.training
    model.freeze(0)
    model.train()
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_expand_modes():
    assert [n for n, _, _ in expand_modes("probe,freeze,scratch", 2)] == [
        "probe",
        "freeze_0",
        "freeze_1",
        "freeze_2",
        "scratch",
    ]
    with pytest.raises(TransferError, match="unknown transfer mode 'freeze_5'"):
        expand_modes(["freeze_5"], 2)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_source_run_fails_with_one_line(env):
    with pytest.raises(RunNotFound) as e:
        run_transfer(
            "0123456789abcdef0123456789abcdef",
            "cifar100",
            data_dir=str(env["data"]),
            tracking_uri=env["uri"],
            progress=False,
        )
    assert "not found" in _one_line(e)


def test_source_without_model_fails_with_one_line(env):
    from harness.tracking import RunLogger

    cfg = make_tiny_config(env["c10"])
    run = RunLogger.start(env["client"], "source", "no-model")  # what a run with log_model=false keeps
    run.log_text(C.to_yaml(cfg), "config.yaml")
    run.end("FINISHED")
    with pytest.raises(RunNotFound) as e:
        run_transfer(run.run_id, "cifar100", data_dir=str(env["data"]), tracking_uri=env["uri"], progress=False)
    assert "no model checkpoint" in _one_line(e)


def test_missing_target_data_fails_with_one_line_before_any_run(env, tmp_path):
    client = env["client"]
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    with pytest.raises(DatasetError) as e:
        run_transfer(
            env["source"].run_id,
            "cifar100",
            data_dir=str(tmp_path),
            tracking_uri=env["uri"],
            overrides=["data.download=false"],
            progress=False,
        )
    assert "cifar100 not found" in _one_line(e) and "--data-dir" in str(e.value)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


def test_best_of_unknown_study_fails_with_one_line(env, tmp_path):
    import optuna

    from harness.studies.options import StudyError

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(StudyError) as e:  # no storage there at all
        run_transfer(
            "best:nosuchstudy",
            "cifar100",
            data_dir=str(env["data"]),
            tracking_uri=env["uri"],
            storage=storage,
            progress=False,
        )
    assert "no study storage at" in _one_line(e) and "--storage" in _one_line(e)
    optuna.storages.RDBStorage(storage)  # a storage without that study
    with pytest.raises(StudyError) as e:
        run_transfer(
            "best:nosuchstudy",
            "cifar100",
            data_dir=str(env["data"]),
            tracking_uri=env["uri"],
            storage=storage,
            progress=False,
        )
    msg = _one_line(e)
    # it names the study, where it looked, what is there, and the option that looks elsewhere
    assert "study 'nosuchstudy' not found in" in msg and storage in msg
    assert "studies there: none" in msg and "--storage" in msg


def test_failing_child_is_recorded_and_the_study_goes_on(env, monkeypatch):
    import harness.studies.transfer as T

    build = T.build_child

    def broken(source, mode, *args, **kwargs):
        if mode == "probe":
            raise RuntimeError("boom")
        return build(source, mode, *args, **kwargs)

    monkeypatch.setattr(T, "build_child", broken)
    result = run_transfer(
        env["source"].run_id,
        "cifar100",
        data_dir=str(env["data"]),
        tracking_uri=env["uri"],
        overrides=CHILD,
        modes=["probe", "freeze_2"],
        progress=False,
    )
    client = env["client"]
    assert [c.status for c in result.children] == ["FAILED", "FINISHED"]
    probe = client.get_run(result.child("probe").run_id)
    assert probe.info.status == "FAILED" and probe.data.tags["error"] == "RuntimeError: boom"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_modes"] == "probe"
    assert parent.data.metrics["children_failed"] == 1
    table = pd.read_csv(client.download_artifacts(result.parent_run_id, "summary/transfer.csv", str(env["tmp"])))
    assert list(table["status"]) == ["FAILED", "FINISHED"] and "boom" in table["error"][0]
    # the finished child's checkpoint: the target's head, the source's frozen stages
    cfg, model = load_run_model(client, result.child("freeze_2").run_id)
    assert cfg.data.dataset == "cifar100" and model.num_classes == 15
    assert _unchanged(env["source"].model.cpu().state_dict(), model.state_dict(), "stages.")


def test_parent_fails_when_every_child_fails(env, monkeypatch):
    from harness.training import NonFiniteLoss

    def diverging(*args, **kwargs):
        raise NonFiniteLoss("non-finite training loss (nan) at epoch 1, batch 1: lower the learning rate")

    monkeypatch.setattr("harness.experiment.fit", diverging)  # what train_run calls
    result = run_transfer(
        env["source"].run_id,
        "cifar10",
        data_dir=str(env["c10"]),
        tracking_uri=env["uri"],
        overrides=NO_MODEL,
        modes=["freeze_2", "scratch"],
        progress=False,
    )
    client = env["client"]
    for c in result.children:
        run = client.get_run(c.run_id)
        assert run.info.status == "FAILED" and run.data.tags["error"].startswith("NonFiniteLoss: non-finite")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and "all 2 children failed" in parent.data.tags["error"]


# ----------------------------------------------------------------------------
# The split study


def test_split_classes():
    a, b = split_classes(10, seed=0)
    assert sorted(a + b) == list(range(10)) and len(a) == len(b) == 5
    assert split_classes(10, seed=0) == (a, b) and split_classes(10, seed=1) != (a, b)
    assert split_classes(10, classes_a=[0, 1, 2, 3, 4]) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert split_classes(4, classes_a=["c", "a"], names=["a", "b", "c", "d"]) == ([0, 2], [1, 3])
    with pytest.raises(TransferError, match="unknown class 'x'"):
        split_classes(4, classes_a=["x"], names=["a", "b", "c", "d"])


def test_split_study_metrics_by_depth(env):
    result = run_split_study(
        data_dir=str(env["c10"]),
        tracking_uri=env["uri"],
        overrides=C.to_dict(make_tiny_config(env["c10"])),
        progress=False,
    )
    client = env["client"]
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and not result.failed
    for key in ("AnB", "BnB", "AnB_plus", "BnB_plus"):
        history = client.get_metric_history(result.parent_run_id, f"{key}_test_accuracy")
        assert sorted(m.step for m in history) == [1, 2], key
    assert 0 <= parent.data.metrics["baseB_test_accuracy"] <= 1
    names = {c.name for c in result.children}
    assert {"baseA", "baseB", "A1B", "B1B", "A1B+", "B1B+", "A2B", "B2B", "A2B+", "B2B+"} == names
    for c in result.children:
        run = client.get_run(c.run_id)
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] == result.parent_run_id
    # A2B: both stages from baseA, frozen; A1B+: stage 1 from baseA, fine-tuned; B1B: stage 1 from baseB
    base_a, base_b = result.child("baseA").model.state_dict(), result.child("baseB").model.state_dict()
    assert _unchanged(base_a, result.child("A2B").model.state_dict(), "stages.")
    assert _unchanged(base_b, result.child("B1B").model.state_dict(), "stages.stage1.")
    assert _changed(base_a, result.child("A1B+").model.state_dict(), "stages.stage1.")
    assert result.child("A2B").model.num_classes == 5
    arts = {a.path for a in client.list_artifacts(result.parent_run_id, "summary")}
    assert {"summary/split_study.csv", "summary/split_study.md", "summary/split_study.png"} <= arts


def test_select_classes_dataset(env):
    ds = load_dataset(C.DataConfig(root=str(env["c10"]), download=False))
    sub = select_classes(ds, [7, 2])
    assert sub.classes == ["horse", "bird"]
    assert set(np.unique(sub.train_labels)) <= {0, 1}
    assert (sub.train_labels == 0).sum() == (ds.train_labels == 7).sum()
    assert len(sub.test_labels) == np.isin(ds.test_labels, [7, 2]).sum()
    assert sub.digest != ds.digest


# ----------------------------------------------------------------------------
# From the command line


def _cli(capsys, *args) -> tuple[int, str, list[str]]:
    from harness.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_transfer_from_the_command_line(env, capsys):
    sets = [a for s in NO_MODEL for a in ("--set", s)]
    common = ["--target", "cifar100", "--data-dir", str(env["data"]), "--tracking-uri", env["uri"], "--quiet"]
    code, out, err = _cli(capsys, "transfer", "--from", env["source"].run_id, "--modes", "probe", *common, *sets)
    assert code == 0, err
    assert "probe" in out and "transfer parent run" in out
    code, out, err = _cli(capsys, "transfer", "--from", env["source"].run_id, "--modes", "freeze_9", *common)
    assert code == 2 and len(err) == 1 and "unknown transfer mode 'freeze_9'" in err[0]


def test_split_study_from_the_command_line(env, capsys):
    tiny = tiny_trial("epochs=1", "model.head_width=16")
    code, out, err = _cli(
        capsys,
        "split-study",
        "--data-dir",
        str(env["c10"]),
        "--tracking-uri",
        env["uri"],
        "--classes-a",
        "airplane,automobile,bird,cat,deer",
        "--depths",
        "1",
        "--quiet",
        *[a for s in tiny for a in ("--set", s)],
    )
    assert code == 0, err
    assert "A = airplane, automobile, bird, cat, deer" in out and "split study parent run" in out
    code, out, err = _cli(
        capsys, "split-study", "--data-dir", str(env["c10"]), "--tracking-uri", env["uri"], "--depths", "7", "--quiet"
    )
    assert code == 2 and len(err) == 1 and "bad depths [7]" in err[0]
