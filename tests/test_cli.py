"""`harness train` from the command line: a tiny run, the data-root option and variable, and each
bad input failing with exit code 2 and one `harness: error:` line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import as_sets, tiny_trial
from mlflow import MlflowClient

from harness import config as C
from harness.cli import main

# on top of harness/configs/default.yaml: a run of a few seconds, figures and all
TINY_SETS = tiny_trial(
    "epochs=1", "model.head_width=16", "eval.figures=true", "eval.embedding_samples=50", "eval.misclassified=4"
)


def error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("harness: error: "), err
    return lines[0]


def run_id_from(out: str) -> str:
    m = re.search(r"^run ([0-9a-f]{32}): test accuracy", out, re.M)
    assert m, out
    return m.group(1)


def test_train_succeeds_and_prints_the_run_id(cifar10_root, tracking_uri, capsys):
    code = main(
        [
            "train",
            "--data-dir",
            str(cifar10_root),
            "--tracking-uri",
            tracking_uri,
            "--quiet",
            "--experiment",
            "cli",
            *as_sets([*TINY_SETS, "name=cli-run"]),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    run_id = run_id_from(out)
    assert tracking_uri in out and "harness ui" in out
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cli-run"
    assert run.data.params["data.root"] == str(cifar10_root)
    assert run.data.params["epochs"] == "1" and run.data.params["model.widths"] == "[8, 16]"
    assert run.data.params["optimizer"] == "sgd"  # the rest comes from harness/configs/default.yaml
    assert "test_accuracy" in run.data.metrics


@pytest.mark.slow
def test_data_root_and_store_from_the_environment(cifar10_root, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv(C.DATA_DIR_ENV, str(cifar10_root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    code = main(["train", "--quiet", *as_sets([*TINY_SETS, "epochs=1"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    run = MlflowClient(tracking_uri).get_run(run_id_from(out))
    assert run.data.params["data.root"] == str(cifar10_root)
    assert MlflowClient(tracking_uri).get_experiment(run.info.experiment_id).name == "cifar10-train"


@pytest.mark.slow
def test_data_dir_option_beats_the_environment(cifar10_root, tracking_uri, tmp_path, monkeypatch, capsys):
    """The variable names a folder without data: alone it fails naming that folder; with
    --data-dir naming the data, the option wins and the run trains."""
    monkeypatch.setenv(C.DATA_DIR_ENV, str(tmp_path / "nothing-here"))
    assert main(["train", "--quiet", "--tracking-uri", tracking_uri, *as_sets(TINY_SETS)]) == 2
    assert str(tmp_path / "nothing-here") in error_line(capsys)
    code = main(
        ["train", "--quiet", "--tracking-uri", tracking_uri, "--data-dir", str(cifar10_root), *as_sets(TINY_SETS)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    run = MlflowClient(tracking_uri).get_run(run_id_from(out))
    assert run.data.params["data.root"] == str(cifar10_root)


def test_unknown_set_key(capsys):
    assert main(["train", "--set", "epochz=1"]) == 2
    line = error_line(capsys)
    assert line.startswith("harness: error: unknown key epochz; valid keys: ")
    for key in C.valid_keys():
        assert key in line
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "item, expected",
    [
        ("epochs=many", "bad value 'many' for epochs: expected int"),
        ("optimizer=rmsprop", "bad value 'rmsprop' for optimizer: choose one of sgd, adam, adamw"),
        ("model.widths=[0,8]", "for model.widths: widths must be positive"),
        ("epochs", "write key=value"),
    ],
)
def test_bad_values(item, expected, capsys):
    assert main(["train", "--set", item]) == 2
    assert expected in error_line(capsys)


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "no-data"
    assert main(["train", "--data-dir", str(missing), "--set", "data.download=false"]) == 2
    line = error_line(capsys)
    assert str(missing) in line and "--data-dir" in line and C.DATA_DIR_ENV in line
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in line


def test_missing_and_broken_config_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in error_line(capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert "is not valid YAML" in error_line(capsys)


def test_unavailable_device(cifar10_root, tracking_uri, capsys):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    code = main(
        [
            "train",
            "--data-dir",
            str(cifar10_root),
            "--tracking-uri",
            tracking_uri,
            *as_sets([*TINY_SETS, f"device={device}"]),
        ]
    )
    assert code == 2
    assert f"device {device} asked for" in error_line(capsys)
    assert (
        MlflowClient(tracking_uri).search_runs(
            [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()]
        )
        == []
    )


def test_non_finite_loss_is_one_line(cifar10_root, tracking_uri, capsys):
    code = main(
        [
            "train",
            "--data-dir",
            str(cifar10_root),
            "--tracking-uri",
            tracking_uri,
            "--quiet",
            *as_sets([*TINY_SETS, "lr=1e30", "schedule=none", "eval.log_model=false"]),
        ]
    )
    assert code == 2
    line = error_line(capsys)
    assert "non-finite training loss" in line and "lr=1e+30" in line


@pytest.mark.slow
def test_installed_console_script_reports_bad_input(tmp_path):
    script = Path(sys.executable).parent / "harness"
    assert script.exists(), f"console script missing: {script} (pip install -e .)"
    env = {"PATH": str(script.parent), "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/db"}
    proc = subprocess.run(
        [str(script), "train", "--set", "model.pool=min"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "harness: error: bad value 'min' for model.pool: choose one of max, avg"
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["trian"], "invalid choice: 'trian'"),
        (["tune", "--trials", "many"], "argument --trials: invalid int value: 'many'"),
        (["tune", "--study", "s", "--sampler", "grid"], "argument --sampler: invalid choice: 'grid'"),
    ],
)
def test_bad_command_line_is_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "--help" in lines[0], err
    assert out == ""


@pytest.mark.parametrize("command", ["best", "compare", "report", "dashboard"])
def test_a_read_only_command_leaves_an_empty_folder_as_it_found_it(command, tmp_path, monkeypatch, capsys):
    for var in ("HARNESS_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main([command, "--study", "typo"]) == 2
    assert "no study storage at mlruns/optuna.db" in error_line(capsys)
    assert sorted(tmp_path.rglob("*")) == before == []
