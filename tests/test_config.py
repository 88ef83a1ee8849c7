"""Config: defaults, YAML files, dotted --set overrides, one-line errors, hash, data-root env var."""

from __future__ import annotations

import pytest

from harness import config as C
from harness.recipes import DEFAULT_CONFIG


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_and_default_file_load():
    cfg = C.load()
    assert cfg == C.Config()
    assert cfg.epochs == 15 and cfg.model.widths == [32, 64, 128] and cfg.data.dataset == "cifar10"
    default = C.load(DEFAULT_CONFIG)
    # the seed's kind of network: 3 conv stages with BatchNorm, ReLU, max pooling, dropout, an FC head
    assert default.model.widths == [32, 64, 128] and default.model.batch_norm
    assert default.model.activation == "relu" and default.model.pool == "max"
    assert default.model.dropout > 0 and default.model.head_width > 0


def test_yaml_file_then_dotted_set_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: exp\nepochs: 7\nlr: 0.1\nmodel:\n  widths: [16, 32]\n  activation: gelu\ndata:\n  train_subset: 500\n"
    )
    cfg = C.load(
        path,
        [
            "epochs=1",
            "data.train_subset=10000",
            "model.widths=[8,16]",
            "eval.umap=false",
            "data.test_subset=none",
            "lr=1e-3",
        ],
    )
    assert cfg.name == "exp"
    assert cfg.epochs == 1 and cfg.lr == pytest.approx(1e-3)
    assert cfg.data.train_subset == 10000 and cfg.data.test_subset is None
    assert cfg.model.widths == [8, 16] and cfg.model.activation == "gelu"  # the file's value kept
    assert cfg.eval.umap is False and cfg.eval.tsne is True
    assert C.load(None, ["model.widths=8,16"]).model.widths == [8, 16]
    assert C.load(None, ["model.widths=64"]).model.widths == [64]


@pytest.mark.parametrize("override", ["bogus=1", "model.depth=3", "training.epochs=2", "model=3"])
def test_unknown_key_is_one_line_listing_the_valid_keys(override):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override])
    msg = one_line_error(e)
    assert msg.startswith(f"unknown key {override.split('=')[0]}")
    assert "valid keys:" in msg
    for key in C.valid_keys():
        assert key in msg
    assert "data.train_subset" in msg and "model.widths" in msg and "eval.umap" in msg


def test_unknown_key_in_a_file_is_one_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  widths: [8]\n  depth: 3\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    msg = one_line_error(e)
    assert msg.startswith("unknown key model.depth; valid keys:") and "model.kernel_size" in msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("epochs=abc", "bad value 'abc' for epochs: expected int"),
        ("epochs=1.5", "for epochs: expected int"),
        ("epochs=0", "for epochs: must be positive"),
        ("lr=fast", "for lr: expected float"),
        ("deterministic=maybe", "for deterministic: expected bool"),
        ("model.widths=[]", "for model.widths: expected a list"),
        ("model.widths=[8,x]", "bad value [8, 'x'] for model.widths: expected a list"),
        ("model.widths=[8,16,32,64,128,256]", "at most 5 stages"),
        ("model.kernel_size=4", "must be odd"),
        ("model.dropout=1.0", "for model.dropout: must be in [0, 1)"),
        ("data.val_fraction=0", "for data.val_fraction: must be in (0, 1)"),
        ("data.train_subset=-5", "for data.train_subset: must be positive"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override, expected):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override])
    assert expected in one_line_error(e)


@pytest.mark.parametrize(
    "override, choices",
    [
        ("optimizer=rmsprop", "sgd, adam, adamw"),
        ("schedule=triangle", "onecycle, linear, cosine, step, plateau, none"),
        ("model.pool=min", "max, avg"),
        ("model.activation=tanh", "relu, gelu, silu"),
        ("data.dataset=mnist", "cifar10, cifar100"),
        ("data.label=medium", "fine, coarse"),
        ("precision=fp8", "auto, bf16, fp32"),
        ("device=gpu", "auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_bad_choice_lists_the_valid_choices(override, choices):
    key, value = override.split("=")
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override])
    assert one_line_error(e) == f"bad value {value!r} for {key}: choose one of {choices}"


def test_set_without_equals_sign():
    with pytest.raises(C.ConfigError) as e:
        C.load(None, ["epochs"])
    assert "write key=value" in one_line_error(e)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: 1\nmodel: [widths: 8\nlr: 0.1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    msg = one_line_error(e)
    assert str(path) in msg and "not valid YAML" in msg and "line" in msg


def test_a_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    assert "expected a mapping" in one_line_error(e)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    msg = one_line_error(e)
    assert str(path) in msg and "not found" in msg and "--config" in msg


def test_config_hash_is_stable_and_ignores_name_and_data_root():
    a = C.load(None, ["epochs=3"])
    h = C.config_hash(a)
    assert len(h) == 12 and h == C.config_hash(C.load(None, ["epochs=3"]))
    # through the logged YAML and back: what `reproduce` does
    import yaml

    assert C.config_hash(C.from_dict(yaml.safe_load(C.to_yaml(a)))) == h
    assert C.config_hash(C.replace(a, {"name": "other", "data": {"root": "/elsewhere"}})) == h
    assert C.config_hash(C.replace(a, {"lr": 0.01})) != h
    assert C.config_hash(C.replace(a, {"model": {"widths": [32, 64]}})) != h


def test_flatten_gives_dotted_params():
    flat = C.flatten(C.to_dict(C.Config()))
    assert set(flat) == set(C.valid_keys())
    assert flat["model.widths"] == [32, 64, 128] and flat["data.train_subset"] is None


def test_data_root_from_env_option_and_set(monkeypatch, tmp_path):
    assert C.load().data.root == "data"
    monkeypatch.setenv(C.DATA_DIR_ENV, str(tmp_path / "env"))
    assert C.load().data.root == str(tmp_path / "env")
    assert C.load(data_dir=str(tmp_path / "opt")).data.root == str(tmp_path / "opt")  # --data-dir wins
    assert C.load(None, [f"data.root={tmp_path / 'set'}"], str(tmp_path / "opt")).data.root == str(tmp_path / "set")
