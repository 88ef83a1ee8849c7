"""Search spaces: readable YAML definitions, checked before any trial starts, sampled by Optuna.

A space file (studies/spaces/) maps config keys to what Optuna samples (`params`, with `if:` for
conditional ones and three keys that build `model.widths`, or per-stage width scales), fixes
budgets per `profiles`, and may name the run config its trials start from (`config`). The format:
docs/configuration.md, "Search spaces".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from harness import config as C
from harness.errors import HarnessError
from harness.recipes import CONFIGS_DIR, find, known

SPACES_DIR = Path(__file__).resolve().parent / "spaces"  # the shipped spaces: `harness tune --space cnn`

WIDTH_KEYS = {"model.stages": 3, "model.base_width": 32, "model.width_multiplier": 2.0}
SCALE_PREFIX = "model.width_scale."
MAX_STAGES = 5  # (as harness/config.py's check allows)
SCALE_KEYS = {f"{SCALE_PREFIX}{k}" for k in range(1, MAX_STAGES + 1)}


def builds_widths(name: str) -> bool:
    """Whether a parameter is one of those that make `model.widths` rather than a config key."""
    return name in WIDTH_KEYS or name in SCALE_KEYS


def scale_stage(name: str) -> int:
    """The 1-based stage a `model.width_scale.<k>` key scales."""
    return int(name.removeprefix(SCALE_PREFIX))


TYPES = {"float", "int", "categorical"}


class SpaceError(HarnessError, ValueError):
    """A bad search-space definition; one line naming the parameter and the problem."""


@dataclass
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    when: dict | None = None  # {other_key: value or [values]}: sampled only when all hold


@dataclass
class Space:
    name: str
    path: str
    params: list[Param]
    profiles: dict[str, dict]
    config: str | None = None  # the run config its trials start from (default: the default config)

    def without(self, fixed: set[str]) -> "Space":
        """The space with `--set` keys taken out of the search (they are fixed for every trial)."""
        width_fixed = "model.widths" in fixed
        keep = [p for p in self.params if p.name not in fixed and not (width_fixed and builds_widths(p.name))]
        return Space(self.name, self.path, keep, self.profiles, self.config)


def resolve_path(space: str) -> Path:
    """A path to a YAML file, or the name of one in studies/spaces/."""
    path = find(space, SPACES_DIR)
    if path is None:
        raise SpaceError(f"search space {space!r} not found: pass a YAML file or one of: {known(SPACES_DIR)}")
    return path


def load_space(space: str) -> Space:
    """A space file, checked whole: every mistake in it is one line now, not a failed trial later."""
    path = resolve_path(space)
    raw = _read_space(path)
    config = _space_config(path, raw.get("config"))
    params = [_param(path, name, spec) for name, spec in raw["params"].items()]
    _check_widths(path, params)
    _check_conditions(path, params)
    profiles = _profiles(path, raw.get("profiles") or {})
    return Space(path.stem, str(path), params, profiles, config)


def _read_space(path: Path) -> dict:
    """The file's YAML: a mapping with a non-empty `params` and no section the format lacks."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise SpaceError(f"search space {path} is not valid YAML{where}: fix its syntax") from None
    except OSError as e:
        raise SpaceError(f"search space {path} cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {path}: expected a mapping with 'params' (and optional 'profiles')")
    if not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise SpaceError(f"search space {path}: needs a non-empty 'params' mapping")
    unknown = set(raw) - {"params", "profiles", "description", "config"}
    if unknown:
        raise SpaceError(
            f"search space {path}: unknown section(s) {', '.join(sorted(unknown))}; "
            "valid: params, profiles, description, config"
        )
    return raw


def _space_config(path: Path, config) -> str | None:
    """The run config the space names, as a path: one of harness/configs/ or a YAML file beside the space."""
    if config is None:
        return None
    found = find(config, CONFIGS_DIR) or find(path.parent / str(config), path.parent)
    if found is None:
        raise SpaceError(
            f"search space {path}: config {config!r} not found: name one of "
            f"{known(CONFIGS_DIR)} or a YAML file beside the space"
        )
    return str(found)


def _check_widths(path: Path, params: list[Param]) -> None:
    """Width scales and the keys that build `model.widths` make two different widths: one or the other."""
    scales = [p.name for p in params if p.name in SCALE_KEYS]
    builders = [p.name for p in params if p.name in WIDTH_KEYS]
    if scales and builders:
        raise SpaceError(
            f"search space {path}: parameter {scales[0]}: per-stage width scales cannot be combined "
            f"with {builders[0]} (scales multiply the config's widths): search one or the other"
        )


def _check_conditions(path: Path, params: list[Param]) -> None:
    """Each `if:` names a parameter above it, with values it can take: else the parameter is never sampled."""
    for i, p in enumerate(params):
        above = {q.name: q for q in params[:i]}
        for key, want in (p.when or {}).items():
            if key not in above:
                raise SpaceError(
                    f"search space {path}: parameter {p.name}: condition on {key!r}, "
                    "which is not a parameter defined above it"
                )
            for value in want if isinstance(want, list) else [want]:
                if not _can_take(above[key], value):
                    raise SpaceError(
                        f"search space {path}: parameter {p.name}: condition {key}={value!r} "
                        f"can never hold ({key} never takes that value)"
                    )


def _profiles(path: Path, profiles) -> dict[str, dict]:
    """The space's profiles, each settings the config accepts (an empty profile: no settings)."""
    if not isinstance(profiles, dict):
        raise SpaceError(f"search space {path}: 'profiles' must map profile names to settings")
    for prof, settings in profiles.items():
        if settings is not None and not isinstance(settings, dict):
            raise SpaceError(f"search space {path}: profile {prof}: expected a mapping of config keys to values")
        try:
            C.from_dict(C.nest(settings or {}))
        except C.ConfigError as e:
            raise SpaceError(f"search space {path}: profile {prof}: {e}") from None
    return {k: v or {} for k, v in profiles.items()}


def _param(path: Path, name: str, spec) -> Param:
    where = f"search space {path}: parameter {name}"
    valid = set(C.valid_keys()) | set(WIDTH_KEYS) | SCALE_KEYS
    if name not in valid:
        raise SpaceError(f"{where}: not a config key; valid keys: {', '.join(sorted(valid))}")
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a mapping like {{type: float, low: 0.001, high: 0.1}}")
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in TYPES:
        raise SpaceError(f"{where}: type must be one of {', '.join(sorted(TYPES))} (got {kind!r})")
    when = spec.pop("if", None)
    if when is not None and not isinstance(when, dict):
        raise SpaceError(f"{where}: 'if' must map parameter names to values")
    allowed = {
        "float": {"low", "high", "log", "step"},
        "int": {"low", "high", "log", "step"},
        "categorical": {"choices"},
    }[kind]
    extra = set(spec) - allowed
    if extra:
        raise SpaceError(f"{where}: unknown field(s) {', '.join(sorted(extra))} for type {kind}")
    p = Param(name, kind, when=when, **spec)
    if kind == "categorical":
        if not isinstance(p.choices, list) or not p.choices:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        for choice in p.choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise SpaceError(
                    f"{where}: choice {choice!r} is not a number, string, boolean or null "
                    "(Optuna stores only these; for widths search model.width_scale.<stage> "
                    "or model.stages/base_width)"
                )
            _check_value(where, name, choice)
    else:
        number = int if kind == "int" else (int, float)
        if p.low is None or p.high is None:
            raise SpaceError(f"{where}: needs low and high")
        for field_name in ("low", "high") + (("step",) if p.step is not None else ()):
            value = getattr(p, field_name)
            if isinstance(value, bool) or not isinstance(value, number):
                raise SpaceError(
                    f"{where}: {field_name} must be {'an integer' if kind == 'int' else 'a number'} (got {value!r})"
                )
        if not isinstance(p.log, bool):
            raise SpaceError(f"{where}: log must be true or false (got {p.log!r})")
        if p.low >= p.high:
            raise SpaceError(f"{where}: low ({p.low}) must be below high ({p.high})")
        if p.log and p.low <= 0:
            raise SpaceError(f"{where}: a log scale needs low > 0 (got {p.low})")
        if p.log and p.step is not None:
            raise SpaceError(f"{where}: step and log cannot be combined")
        if p.step is not None and not 0 < p.step <= p.high - p.low:
            raise SpaceError(f"{where}: step ({p.step}) must be positive and at most high - low ({p.high - p.low})")
        _check_value(where, name, p.low)
        _check_value(where, name, p.high)
    return p


def _can_take(p: Param, value) -> bool:
    """Whether parameter `p` can ever be sampled as `value` (a condition on it can hold)."""
    if p.type == "categorical":
        return value in p.choices  # the same test as sampling's (see _active)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high


def _check_value(where: str, name: str, value) -> None:
    """A value the config itself would refuse is a bad definition, found before any trial."""
    if builds_widths(name):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpaceError(f"{where}: value {value!r} must be a positive number")
        if name == "model.stages":
            try:  # as many stages as the model accepts
                C.replace(C.Config(), {"model": {"widths": [8] * int(value)}})
            except C.ConfigError as e:
                raise SpaceError(f"{where}: {value!r} stages: {e}") from None
        return
    try:
        C.replace(C.Config(), C.nest({name: value}))
    except C.ConfigError as e:
        raise SpaceError(f"{where}: {e}") from None


def _active(p: Param, values: dict) -> bool:
    for key, want in (p.when or {}).items():
        options = want if isinstance(want, list) else [want]
        if values.get(key) not in options:
            return False
    return True


def sample(space: Space, trial: optuna.Trial, base: C.Config) -> C.Config:
    """A trial's config: `base` (defaults, profile, --set) with the sampled parameters applied."""
    flat = C.flatten(C.to_dict(base))
    values: dict = dict(flat)
    sampled: dict = {}
    for p in space.params:
        if not _active(p, values):
            continue
        if p.type == "categorical":
            v = trial.suggest_categorical(p.name, p.choices)
        elif p.type == "int":
            v = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            v = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        values[p.name] = sampled[p.name] = v
    if any(k in sampled for k in WIDTH_KEYS):
        stages = int(sampled.get("model.stages", len(base.model.widths)))
        width = sampled.get("model.base_width", base.model.widths[0])
        mult = sampled.get("model.width_multiplier", WIDTH_KEYS["model.width_multiplier"])
        sampled["model.widths"] = [int(round(width * mult**i)) for i in range(stages)]
    if any(k in sampled for k in SCALE_KEYS):
        sampled["model.widths"] = scaled_widths(space, base.model.widths, sampled)
    updates = {k: v for k, v in sampled.items() if not builds_widths(k)}
    return C.replace(base, C.nest(updates))


def scaled_widths(space: Space, widths: list[int], sampled: dict) -> list[int]:
    """The config's widths, each stage times its sampled scale (1 where none was sampled)."""
    check_stages(space, widths)
    scale = {scale_stage(k): v for k, v in sampled.items() if k in SCALE_KEYS}
    return [max(1, int(round(w * scale.get(i + 1, 1.0)))) for i, w in enumerate(widths)]


def check_stages(space: Space, widths: list[int]) -> None:
    """A scale for a stage the network lacks is a bad definition for this config: found before any
    trial (the study calls this on its base config), in one line."""
    for p in space.params:
        if p.name in SCALE_KEYS and scale_stage(p.name) > len(widths):
            raise SpaceError(
                f"search space {space.path}: parameter {p.name}: the network has "
                f"{len(widths)} stages (model.widths={widths}); scale stages 1 to {len(widths)}"
            )


def starting_point(space: Space, base: C.Config) -> dict:
    """The searched parameters' values in `base`, where the space allows them: a study's first
    trial, so that its best is never worse than the config it starts from."""
    values = C.flatten(C.to_dict(base))
    widths = base.model.widths
    values.update(
        {
            "model.stages": len(widths),
            "model.base_width": widths[0],
            "model.width_multiplier": widths[1] / widths[0] if len(widths) > 1 else None,
            **{k: 1.0 for k in SCALE_KEYS},
        }
    )  # scales of the config's own widths
    point = {}
    for p in space.params:
        if not _active(p, values):
            continue
        v = values.get(p.name)
        if (p.type == "categorical" and v in p.choices) or (
            p.type != "categorical"
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and p.low <= v <= p.high
            and (p.type == "float" or float(v).is_integer())
        ):
            point[p.name] = v
    return point


def profile_settings(space: Space, profile: str) -> dict:
    if profile not in space.profiles:
        known = ", ".join(space.profiles) or "none defined"
        raise SpaceError(f"search space {space.path}: no profile {profile!r}; profiles: {known}")
    return C.nest(space.profiles[profile])
