"""Finding and reading config files: config.json / config.toml, config.env, and JSON helpers.

Lookup order for the training config (first match wins):
``--config PATH`` > ``config/<ENV>/config.json|toml`` (``--env NAME`` or ``ENV=NAME``) >
``config/config.json|toml``. Keys may carry a leading ``--``. String values may contain
``{env:VAR}`` placeholders, substituted from the environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from simpletuner.options import ConfigError

_ENV_PLACEHOLDER = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def load_json_file(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read file ({error.strerror or error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None


def load_toml_file(path: Path) -> dict:
    """Parse a TOML file; a syntax error names the file and position."""
    import tomllib

    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: malformed TOML: {error}") from None


def find_config_file(explicit: str | None, env_name: str | None, root: Path) -> Path | None:
    """The config file to use, or None when there is none (flags only)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist")
        return path
    folders = [root / "config" / env_name] if env_name else []
    folders.append(root / "config")
    for folder in folders:
        for name in ("config.json", "config.toml"):
            if (folder / name).is_file():
                return folder / name
        if env_name and folder == root / "config" / env_name:
            raise ConfigError(f"ENV={env_name}: no config.json or config.toml in {folder}")
    return None


def read_config_file(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Key -> raw value from a config file, leading dashes stripped, ``{env:VAR}`` filled from ``environ``."""
    data = load_toml_file(path) if path.suffix == ".toml" else load_json_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object of option names to values, not {type(data).__name__}")
    return {key.lstrip("-"): substitute_env(value, key.lstrip("-"), path, environ) for key, value in data.items()}


def substitute_env(value: Any, key: str, source: Path | str, environ: Mapping[str, str] | None = None) -> Any:
    """Replace ``{env:VAR}`` in strings (recursively in lists and dicts)."""
    environ = os.environ if environ is None else environ
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"{source}: `{key}` uses {{env:{name}}} but the environment variable {name} is not set")
            return environ[name]

        return _ENV_PLACEHOLDER.sub(replace, value)
    if isinstance(value, list):
        return [substitute_env(v, key, source, environ) for v in value]
    if isinstance(value, dict):
        return {k: substitute_env(v, key, source, environ) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class LauncherSettings:
    """What ``config.env`` says about how to launch, with the variables we act on."""

    num_processes: int = 1
    dynamo_backend: str | None = None
    accelerate_extra_args: tuple[str, ...] = ()
    log_level: str = "INFO"
    source: str | None = None


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; ``export`` prefixes, quotes and ``#`` comments are allowed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        key, value = line.split("=", 1)
        parts = shlex.split(value, comments=True)
        values[key.strip()] = " ".join(parts)
    return values


def load_launcher_settings(root: Path, env_name: str | None, environ: Mapping[str, str]) -> LauncherSettings:
    """Merge ``config/config.env`` then ``config/<ENV>/config.env``; real environment variables win."""
    merged: dict[str, str] = {}
    sources = []
    for path in [root / "config" / "config.env"] + ([root / "config" / env_name / "config.env"] if env_name else []):
        if path.is_file():
            merged.update(parse_env_file(path))
            sources.append(str(path))
    for key in ("TRAINING_NUM_PROCESSES", "TRAINING_DYNAMO_BACKEND", "ACCELERATE_EXTRA_ARGS", "SIMPLETUNER_LOG_LEVEL"):
        if key in environ:
            merged[key] = environ[key]
    try:
        processes = int(merged.get("TRAINING_NUM_PROCESSES", "1") or "1")
    except ValueError:
        raise ConfigError(f"TRAINING_NUM_PROCESSES={merged['TRAINING_NUM_PROCESSES']!r} is not an integer") from None
    if processes < 1:
        raise ConfigError(f"TRAINING_NUM_PROCESSES={processes} must be at least 1")
    level = (merged.get("SIMPLETUNER_LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"SIMPLETUNER_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    backend = merged.get("TRAINING_DYNAMO_BACKEND") or None
    return LauncherSettings(
        num_processes=processes,
        dynamo_backend=None if backend in (None, "no", "NO") else backend,
        accelerate_extra_args=tuple(shlex.split(merged.get("ACCELERATE_EXTRA_ARGS", ""))),
        log_level=level,
        source=", ".join(sources) or None,
    )
