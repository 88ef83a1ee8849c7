"""Search spaces: the shipped ones load and sample valid configs; every kind of bad definition
fails before any trial with one line naming the parameter and the problem."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from harness import config as C
from harness.recipes import config_path
from harness.studies.space import (
    SCALE_KEYS,
    SPACES_DIR,
    WIDTH_KEYS,
    SpaceError,
    builds_widths,
    check_stages,
    load_space,
    profile_settings,
    sample,
    scale_stage,
    starting_point,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def _trials(space, n: int, base: C.Config | None = None, seed: int = 0):
    """`n` sampled (trial params, config) pairs from an in-memory study with a random sampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        cfg = sample(space, trial, base or C.Config())
        study.tell(trial, 0.0)
        out.append((trial.params, cfg))
    return out


def test_shipped_spaces_exist_and_load():
    assert {"cnn", "training"} <= set(SHIPPED)
    for name in SHIPPED:
        space = load_space(name)
        assert space.params, name
        for profile in ("quick", "full"):  # the CLI's --profile choices (auto picks one of them)
            C.from_dict(C.merge(C.to_dict(C.Config()), profile_settings(space, profile)))
    # a path works as well as a name
    assert load_space(str(SPACES_DIR / "cnn.yaml")).name == "cnn"


@pytest.mark.parametrize("name", SHIPPED)
def test_sampling_gives_valid_configs_and_respects_conditions(name):
    space = load_space(name)
    names = {p.name for p in space.params}
    pairs = _trials(space, 40)
    seen_optimizers, seen_schedules = set(), set()
    for params, cfg in pairs:
        # the sampled config passes the config's own checks (same as a file would)
        assert C.from_dict(C.to_dict(cfg)) == cfg
        for key, value in params.items():
            if key in SCALE_KEYS:  # the base config's width of that stage, scaled
                k = scale_stage(key)
                assert cfg.model.widths[k - 1] == round(C.Config().model.widths[k - 1] * value), key
            if builds_widths(key):
                continue
            assert C.get(cfg, key) == value, key
        if "optimizer" in names:
            seen_optimizers.add(params["optimizer"])
            assert ("momentum" in params) == (params["optimizer"] == "sgd"), params
            if "nesterov" in names:
                assert ("nesterov" in params) == (params["optimizer"] == "sgd"), params
        if "schedule" in names:
            seen_schedules.add(params["schedule"])
            assert ("step_size" in params) == (params["schedule"] == "step"), params
            assert ("gamma" in params) == (params["schedule"] in ("step", "plateau")), params
        if "model.stages" in params:
            widths = cfg.model.widths
            assert len(widths) == params["model.stages"]
            assert widths[0] == params["model.base_width"]
            assert all(b > a for a, b in zip(widths, widths[1:]))
    # 40 random trials visit both sides of every condition
    if "optimizer" in names:
        assert "sgd" in seen_optimizers and len(seen_optimizers) > 1
    if "schedule" in names:
        assert "step" in seen_schedules and len(seen_schedules) > 1


def test_set_keys_leave_the_search():
    space = load_space("cnn")
    fixed = space.without({"lr", "optimizer", "epochs"})
    assert {"lr", "optimizer"}.isdisjoint(p.name for p in fixed.params)
    base = C.load(None, ["lr=0.0123", "optimizer=sgd", "epochs=3"])
    for params, cfg in _trials(fixed, 15, base):
        assert "lr" not in params and "optimizer" not in params
        assert cfg.lr == 0.0123 and cfg.optimizer == "sgd" and cfg.epochs == 3
        assert "momentum" in params  # its condition reads the fixed optimizer
    adam = C.load(None, ["optimizer=adam"])
    assert all("momentum" not in params for params, _ in _trials(fixed, 10, adam))
    # fixing model.widths takes the three keys that build it out of the search too
    no_widths = space.without({"model.widths"})
    assert not {p.name for p in no_widths.params} & set(WIDTH_KEYS)
    base = C.load(None, ["model.widths=[8,16]"])
    assert all(cfg.model.widths == [8, 16] for _, cfg in _trials(no_widths, 5, base))
    # and the per-stage scales of the fast space
    assert not {p.name for p in load_space("fast").without({"model.widths"}).params} & SCALE_KEYS


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_the_fast_spaces_first_trial_is_the_recipe_on_either_profile(profile):
    """Every parameter of the fast space, architecture included, can take the recipe's value for the
    device (the quick profile's network and the full one's), so a study's first trial is the recipe."""
    space = load_space("fast")
    base = C.from_dict(
        C.merge(C.to_dict(C.load(config_path("fast"), profile=profile)), profile_settings(space, profile))
    )
    point = starting_point(space, base)
    assert set(point) == {p.name for p in space.params}
    assert sample(space, optuna.trial.FixedTrial(point), base) == base
    # the architecture is searched: per-stage widths, convolutions, activation, pooling, stem, batch size
    names = {p.name for p in space.params}
    assert {
        "model.width_scale.1",
        "model.width_scale.2",
        "model.width_scale.3",
        "model.convs_per_stage",
        "model.activation",
        "model.global_pool",
        "model.stem",
        "batch_size",
    } <= names
    widths = {tuple(cfg.model.widths) for _, cfg in _trials(space, 20, base)}
    assert len(widths) > 5 and all(len(w) == len(base.model.widths) for w in widths)


def test_a_scale_for_a_stage_the_network_lacks_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("params:\n  model.width_scale.4: {type: float, low: 0.5, high: 1.5}\n")
    space = load_space(str(path))
    check_stages(space, [8, 16, 32, 64])  # four stages: fine
    with pytest.raises(SpaceError) as err:
        check_stages(space, [32, 64, 128])
    msg = str(err.value)
    assert "\n" not in msg and "parameter model.width_scale.4:" in msg and "3 stages" in msg, msg
    with pytest.raises(SpaceError, match="model.width_scale.4"):  # sampling refuses it too
        _trials(space, 1)


GOOD_LR = "lr: {type: float, low: 1.0e-3, high: 0.1, log: true}"
BAD_SPACES = {
    # name: (YAML text, the parameter named, words of the problem)
    "unknown_key": ("params:\n  model.widthz: {type: int, low: 1, high: 3}\n", "model.widthz", "not a config key"),
    "bad_type": ("params:\n  lr: {type: floaty, low: 0.001, high: 0.1}\n", "lr", "type must be one of"),
    "type_missing": ("params:\n  lr: {low: 0.001, high: 0.1}\n", "lr", "type must be one of"),
    "low_not_below_high": ("params:\n  lr: {type: float, low: 0.1, high: 0.01}\n", "lr", "must be below high"),
    "low_equals_high": ("params:\n  epochs: {type: int, low: 3, high: 3}\n", "epochs", "must be below high"),
    "log_low_zero": (
        "params:\n  weight_decay: {type: float, low: 0.0, high: 0.1, log: true}\n",
        "weight_decay",
        "log scale needs low > 0",
    ),
    "log_low_negative": ("params:\n  lr: {type: float, low: -1.0, high: 0.1, log: true}\n", "lr", "log scale"),
    "missing_high": ("params:\n  lr: {type: float, low: 0.001}\n", "lr", "needs low and high"),
    "low_not_number": ("params:\n  lr: {type: float, low: small, high: 0.1}\n", "lr", "must be a number"),
    "int_with_float_bound": ("params:\n  epochs: {type: int, low: 1.5, high: 4}\n", "epochs", "must be an integer"),
    "bad_step": ("params:\n  epochs: {type: int, low: 1, high: 3, step: 5}\n", "epochs", "step"),
    "step_with_log": (
        "params:\n  lr: {type: float, low: 0.001, high: 0.1, log: true, step: 0.01}\n",
        "lr",
        "step and log",
    ),
    "empty_choices": ("params:\n  optimizer: {type: categorical, choices: []}\n", "optimizer", "non-empty list"),
    "choices_not_list": ("params:\n  optimizer: {type: categorical, choices: sgd}\n", "optimizer", "non-empty list"),
    "choice_config_refuses": (
        "params:\n  optimizer: {type: categorical, choices: [sgd, rmsprop]}\n",
        "optimizer",
        "'rmsprop'",
    ),
    "bound_config_refuses": (
        "params:\n  model.dropout: {type: float, low: 0.0, high: 1.0}\n",
        "model.dropout",
        "must be in [0, 1)",
    ),
    "even_kernel": (
        "params:\n  model.kernel_size: {type: categorical, choices: [3, 4]}\n",
        "model.kernel_size",
        "must be odd",
    ),
    "too_many_stages": ("params:\n  model.stages: {type: int, low: 2, high: 7}\n", "model.stages", "at most 5"),
    "scale_not_positive": (
        "params:\n  model.width_scale.1: {type: float, low: 0.0, high: 1.5}\n",
        "model.width_scale.1",
        "must be a positive number",
    ),
    "scale_of_stage_six": (
        "params:\n  model.width_scale.6: {type: float, low: 0.5, high: 1.5}\n",
        "model.width_scale.6",
        "not a config key",
    ),
    "scales_and_stages": (
        "params:\n  model.base_width: {type: categorical, choices: [16, 32]}\n"
        "  model.width_scale.1: {type: float, low: 0.5, high: 1.5}\n",
        "model.width_scale.1",
        "cannot be combined with model.base_width",
    ),
    "list_choice": (
        "params:\n  model.widths: {type: categorical, choices: [[8, 16], [16, 32]]}\n",
        "model.widths",
        "not a number, string",
    ),
    "condition_undefined": (
        f"params:\n  {GOOD_LR}\n  momentum: {{type: float, low: 0.8, high: 0.99, if: {{optimiser: sgd}}}}\n",
        "momentum",
        "condition on 'optimiser'",
    ),
    "condition_on_later": (
        "params:\n  momentum: {type: float, low: 0.8, high: 0.99, if: {optimizer: sgd}}\n"
        "  optimizer: {type: categorical, choices: [sgd, adam]}\n",
        "momentum",
        "not a parameter defined above it",
    ),
    "condition_never_holds": (
        "params:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n"
        "  momentum: {type: float, low: 0.8, high: 0.99, if: {optimizer: adamw}}\n",
        "momentum",
        "can never hold",
    ),
    "condition_not_mapping": (
        "params:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n"
        "  momentum: {type: float, low: 0.8, high: 0.99, if: optimizer}\n",
        "momentum",
        "'if' must map",
    ),
    "unknown_field": (
        "params:\n  lr: {type: float, low: 0.001, high: 0.1, logscale: true}\n",
        "lr",
        "unknown field(s) logscale",
    ),
    "field_of_other_type": (
        "params:\n  optimizer: {type: categorical, choices: [sgd], low: 1}\n",
        "optimizer",
        "unknown field(s) low",
    ),
    "log_not_bool": ("params:\n  lr: {type: float, low: 0.001, high: 0.1, log: maybe}\n", "lr", "log must be"),
    "spec_not_mapping": ("params:\n  lr: 0.01\n", "lr", "expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_definition_fails_with_one_line_naming_the_parameter(tmp_path, case):
    text, param, problem = BAD_SPACES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(str(path))
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert f"parameter {param}:" in msg, msg
    assert problem in msg, msg
    assert str(path) in msg, msg


WHOLE_FILE = {
    "bad_yaml": ("params:\n  lr: {type: float, low: 0.001, high: [\n", "not valid YAML at line"),
    "no_params": ("profiles:\n  quick: {epochs: 1}\n", "non-empty 'params' mapping"),
    "empty_file": ("", "non-empty 'params' mapping"),
    "not_a_mapping": ("- lr\n- momentum\n", "expected a mapping"),
    "unknown_section": (f"params:\n  {GOOD_LR}\nparameters: {{}}\n", "unknown section(s) parameters"),
    "bad_profile_key": (
        f"params:\n  {GOOD_LR}\nprofiles:\n  quick: {{epochz: 2}}\n",
        "profile quick: unknown key epochz",
    ),
    "bad_profile_value": (
        f"params:\n  {GOOD_LR}\nprofiles:\n  quick: {{epochs: -1}}\n",
        "profile quick: bad value -1 for epochs",
    ),
    "profiles_not_mapping": (f"params:\n  {GOOD_LR}\nprofiles: [quick]\n", "'profiles' must map"),
}


@pytest.mark.parametrize("case", sorted(WHOLE_FILE))
def test_bad_file_fails_with_one_line(tmp_path, case):
    text, problem = WHOLE_FILE[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(str(path))
    msg = str(err.value)
    assert "\n" not in msg and problem in msg and str(path) in msg, msg


def test_missing_space_names_the_known_ones(tmp_path):
    for missing in ("no-such-space", str(tmp_path / "absent.yaml")):
        with pytest.raises(SpaceError) as err:
            load_space(missing)
        msg = str(err.value)
        assert "\n" not in msg and "not found" in msg and missing in msg
        assert all(name in msg for name in SHIPPED)


def test_unknown_profile_is_a_space_error():
    with pytest.raises(SpaceError, match=r"no profile 'huge'; profiles: quick, full"):
        profile_settings(load_space("training"), "huge")


@pytest.mark.slow
def test_tune_with_a_bad_space_exits_2_with_one_line_and_creates_nothing(tmp_path):
    """Through the real command line: the check runs before any storage, run or trial exists."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"params:\n  {GOOD_LR}\n  momentum: {{type: float, low: 0.8, high: 0.99, if: {{optimizer: sgd}}}}\n")
    storage = tmp_path / "optuna.db"
    store = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "HARNESS_STORAGE": f"sqlite:///{storage}"}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "tune",
            "--study",
            "bad",
            "--space",
            str(bad),
            "--trials",
            "2",
            "--data-dir",
            str(tmp_path / "no-data"),
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("harness: error: search space") and "parameter momentum" in lines[0]
    assert "condition on 'optimizer'" in lines[0]
    assert proc.stdout == ""
    # no study, no trial and no MLflow run anywhere: neither store was even created
    assert not storage.exists() and not store.exists()
    assert not (tmp_path / "mlruns").exists() and not list(tmp_path.glob("*.db"))


def test_tune_with_a_bad_space_in_process_leaves_an_existing_study_untouched(tmp_path, capsys):
    """A bad space on resume: the existing study keeps its trials, no new one is asked."""
    from harness.cli import main

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="kept", storage=storage)
    study.enqueue_trial({"x": 1.0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: {type: float, low: 0.1, high: 0.01}\n")
    code = main(
        [
            "tune",
            "--study",
            "kept",
            "--space",
            str(bad),
            "--storage",
            storage,
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "parameter lr: low (0.1) must be below high (0.01)" in err[0]
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 1  # only the enqueued one
    assert not (tmp_path / "mlflow.db").exists()
