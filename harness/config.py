"""Typed experiment configuration: dataclasses, YAML files, `--set key=value` overrides.

One `Config` describes a whole run. Training settings sit at the top level (`epochs`, `lr`, ...)
and the rest in sections (`data.*`, `model.*`, `eval.*`), so `--set epochs=1 --set
data.train_subset=10000` reads the way people think about a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.errors import HarnessError

DATA_DIR_ENV = "HARNESS_DATA_DIR"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"  # without --tracking-uri or $MLFLOW_TRACKING_URI


class ConfigError(HarnessError, ValueError):
    """A bad config file, key or value; the message is one line that names the fix."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100
    root: str = "data"  # data root; --data-dir or HARNESS_DATA_DIR override it
    val_fraction: float = 0.2
    split_seed: int = 0  # the train/validation split has its own seed, so trials share one split
    train_subset: int | None = None  # quick runs: first N images of the shuffled training part
    val_subset: int | None = None
    # per-epoch validation (early stopping, pruning) on the first N validation images, and the weights
    # kept scored on the whole part: a trial is selected on all of it at the cost of one pass
    prune_subset: int | None = None
    test_subset: int | None = None
    download: bool = True  # fetch with torchvision when the files are missing
    label: str = "fine"  # cifar100 only: fine (100 classes) | coarse (20 superclasses)


@dataclass
class ModelConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # one entry per stage
    convs_per_stage: int = 1
    kernel_size: int = 3
    batch_norm: bool = True
    dropout: float = 0.25  # after each stage's pooling, and before the head's output layer
    pool: str = "max"  # max | avg
    activation: str = "relu"  # relu | gelu | silu
    residual: bool = False
    head_width: int = 256  # hidden units of the classifier head; 0 = a single linear layer
    stem: str = "none"  # none | whiten: a fixed 2x2 patch-whitening conv first, set from training images
    pool_first: bool = False  # pool right after a stage's first conv, so its other convs run at half size
    global_pool: str = "none"  # none | max | avg: the last stage pooled to 1x1 before the head
    logit_scale: float = 1.0  # logits multiplied by this (a temperature; the fast recipe uses 1/9)


@dataclass
class EvalConfig:
    embedding_samples: int | None = 2000  # test images embedded for t-SNE/UMAP (None = all)
    tsne: bool = True
    umap: bool = True
    misclassified: int = 25  # most confidently misclassified images shown
    figures: bool = True  # confusion matrices, per-class chart, mistakes and samples (metrics, tables either way)
    log_model: bool = True
    tta: bool = False  # validation and test logits averaged over each image and its mirror image
    system_metrics: bool = True  # CPU/GPU utilization and memory as system/... metrics (MLflow's monitor)


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    deterministic: bool = False
    compile: bool = False
    channels_last: bool = True  # NHWC activations: faster convolutions on CUDA and on CPUs
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with native bf16) | bf16 | fp32
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"  # onecycle | linear | cosine | step | plateau | none
    warmup: float = 0.25  # onecycle / linear: fraction of the steps spent raising the learning rate
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step / plateau decay factor
    lr_patience: int = 2  # plateau schedule: epochs without a better validation accuracy before a decay
    patience: int = 5  # early stopping: epochs without a better validation accuracy; 0 = off
    lookahead: bool = False  # every 5 steps pull the weights toward a slow average of them (airbench)
    checkpoint_every: int = 1  # epochs between resumable checkpoints (harness/resume.py); 0 = none
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.dataset": ("cifar10", "cifar100"),
    "data.label": ("fine", "coarse"),
    "model.pool": ("max", "avg"),
    "model.activation": ("relu", "gelu", "silu"),
    "model.stem": ("none", "whiten"),
    "model.global_pool": ("none", "max", "avg"),
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("onecycle", "linear", "cosine", "step", "plateau", "none"),
    "precision": ("auto", "bf16", "fp32"),
}


def pick(table: dict, kind: str, name: str):
    """`table[name]`, a registry's entry; an unknown name is one line listing the known ones."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}: choose one of {', '.join(table)}") from None


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. `epochs`, `data.train_subset`."""
    keys = []
    hints = _types(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys += valid_keys(hints[name], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(key: str, value, hint):
    """Turn a YAML/CLI value into the field's type, or raise a one-line ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # --set model.widths=64: YAML already made it a number
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError
            return [_coerce(key, v, args[0]) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"unsupported type for {key}")
    name = getattr(hint, "__name__", str(hint))
    if origin is list:
        name = "a list like [32, 64, 128]"
    raise ConfigError(f"bad value {value!r} for {key}: expected {name}")


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check(cfg: Config) -> Config:
    if not isinstance(cfg.device, str) or not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ConfigError(f"bad value {cfg.device!r} for device: choose one of auto, cpu, cuda, cuda:N, mps")
    for key, choices in CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            raise ConfigError(f"bad value {value!r} for {key}: choose one of {', '.join(choices)}")
    positive = ["epochs", "batch_size", "lr", "model.convs_per_stage", "model.kernel_size", "model.logit_scale"]
    for key in positive:
        if get(cfg, key) <= 0:
            raise ConfigError(f"bad value {get(cfg, key)!r} for {key}: must be positive")
    if any(w <= 0 for w in cfg.model.widths):
        raise ConfigError(f"bad value {cfg.model.widths!r} for model.widths: widths must be positive")
    if len(cfg.model.widths) > 5:
        raise ConfigError("bad value for model.widths: at most 5 stages (each halves 32x32 images)")
    if cfg.model.kernel_size % 2 == 0:
        raise ConfigError(f"bad value {cfg.model.kernel_size} for model.kernel_size: must be odd")
    for key in ("model.dropout", "label_smoothing", "warmup"):
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"bad value {get(cfg, key)!r} for {key}: must be in [0, 1)")
    for key in ("lr_patience", "checkpoint_every"):
        if get(cfg, key) < 0:
            raise ConfigError(f"bad value {get(cfg, key)!r} for {key}: must be 0 or more")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"bad value {cfg.data.val_fraction!r} for data.val_fraction: must be in (0, 1)")
    for key in (
        "data.train_subset",
        "data.val_subset",
        "data.prune_subset",
        "data.test_subset",
        "eval.embedding_samples",
    ):
        value = get(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"bad value {value!r} for {key}: must be positive (or none for all)")
    return cfg


def from_dict(d: dict, cls=Config, prefix: str = ""):
    """Build a dataclass from a nested dict, rejecting unknown keys with the valid ones listed."""
    if not isinstance(d, dict):
        raise ConfigError(f"bad value {d!r} for {prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = _types(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}{key}; valid keys: {', '.join(valid_keys(Config))}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = from_dict(value or {}, hints[key], f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, hints[key])
    obj = cls(**kwargs)
    return _check(obj) if cls is Config else obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def nest(flat: dict) -> dict:
    """`{"data.train_subset": 100}` -> `{"data": {"train_subset": 100}}`, the shape `replace` takes."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """`["epochs=1", "data.train_subset=10000"]` -> nested dict of YAML-parsed values."""
    flat: dict = {}
    keys = valid_keys()
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad --set {item!r}: write key=value, e.g. --set epochs=1")
        if key not in keys:
            raise ConfigError(f"unknown key {key}; valid keys: {', '.join(keys)}")
        flat[key] = yaml.safe_load(raw) if raw.strip() else None
    return nest(flat)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


PROFILES = ("auto", "quick", "full")


def pick_profile(profile: str, device: str = "auto") -> str:
    """`auto` is `full` where training runs on CUDA and `quick` elsewhere: the budgets that config
    files and search spaces keep for GPUs and for CPUs."""
    if profile != "auto":
        return profile
    if device == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "quick"
    return "full" if device.startswith("cuda") else "quick"


def load(
    path: str | os.PathLike | None = None,
    overrides: list[str] | dict | None = None,
    data_dir: str | None = None,
    profile: str = "auto",
) -> Config:
    """Resolve a run's config: defaults < YAML file < its profile < HARNESS_DATA_DIR < --data-dir < --set.

    A file may keep settings for CPUs and GPUs apart in `profiles: {quick: {...}, full: {...}}`
    (dotted keys); `profile` picks one, `auto` by the device the run will use.
    """
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing YAML file to --config")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: fix its syntax") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings")
    profiles = d.pop("profiles", None) or {}
    if profiles:
        flat_overrides = (
            flatten(parse_overrides(overrides)) if isinstance(overrides, list) else flatten(overrides or {})
        )
        name = pick_profile(profile, str(flat_overrides.get("device") or d.get("device") or "auto"))
        if name not in profiles:
            raise ConfigError(f"config file {path} has no profile {name!r}: choose one of {', '.join(profiles)}")
        d = merge(d, nest(profiles[name] or {}))
    data_root = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_root:
        d = merge(d, {"data": {"root": data_root}})
    if overrides:
        d = merge(d, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(d)


def replace(cfg: Config, updates: dict) -> Config:
    """A copy of `cfg` with a nested dict of updates applied (validated like a file)."""
    return from_dict(merge(to_dict(cfg), updates))


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {"data.train_subset": ..., "model.widths": ...} for MLflow params."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_hash(cfg: Config) -> str:
    """Short stable hash of what determines the result (the name and data root excluded)."""
    d = to_dict(cfg)
    d.pop("name")
    d["data"].pop("root")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
