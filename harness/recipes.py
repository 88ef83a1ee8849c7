"""The run configs shipped with the project (harness/configs/<name>.yaml), found by name or by path:
`harness train --config fast`. Search spaces are the studies' (studies/spaces/, studies/space.py)."""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "default.yaml"


def find(name_or_path: str | Path, folder: Path) -> Path | None:
    """A YAML file's path, or the file `<name>.yaml` in `folder`; None when neither exists."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    named = folder / f"{name_or_path}.yaml"
    return named if named.is_file() else None


def known(folder: Path) -> str:
    return ", ".join(sorted(q.stem for q in folder.glob("*.yaml")))


def config_path(name_or_path: str | Path | None) -> Path:
    """--config: a YAML file or the name of one in harness/configs/ (None: the default config)."""
    from harness.config import ConfigError

    if name_or_path is None:
        return DEFAULT_CONFIG
    path = find(name_or_path, CONFIGS_DIR)
    if path is None:
        raise ConfigError(
            f"config file {name_or_path} not found: pass an existing YAML file to --config "
            f"or one of: {known(CONFIGS_DIR)}"
        )
    return path
