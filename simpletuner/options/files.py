"""Finding and reading config files: config.json / config.toml, config.env, and JSON helpers.

Lookup order for the training config (first match wins):
``--config PATH`` > ``config/<ENV>/config.json|toml`` (``--env NAME`` or ``ENV=NAME``) >
``config/config.json|toml``. Keys may carry a leading ``--``. String values may contain
``{env:VAR}`` placeholders, substituted from the environment.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from simpletuner.options import ConfigError
from simpletuner.options.messages import shorten, show_value
from simpletuner.options.spec import MAX_PROCESSES

_ENV_PLACEHOLDER = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")

#: The deepest nesting of lists/objects a config value may have. Real settings (a LyCORIS preset, a
#: quantization config) nest three or four levels; the limit keeps every later recursive walk of the
#: value (env substitution, printing, comparing) far from Python's recursion limit.
MAX_NESTING = 64


def nesting_error(where: str) -> ConfigError:
    return ConfigError(f"{where}: lists/objects are nested more than {MAX_NESTING} levels deep; no setting needs "
                       "that, so the file is probably generated wrongly")


def check_nesting(value: Any, where: str) -> None:
    """Raise :func:`nesting_error` when ``value`` nests lists/dicts deeper than :data:`MAX_NESTING`.

    Walks with an explicit stack, so the check itself cannot hit the recursion limit.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (list, dict)):
            continue
        if depth > MAX_NESTING:
            raise nesting_error(where)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))


class _DuplicateKey(Exception):
    """Raised while decoding when one JSON object spells the same key twice."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is a mistake (json alone keeps the last silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; unreadable or undecodable bytes become a ConfigError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read file ({error.strerror or error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start} is 0x{data[error.start]:02x}); save the "
                          f"{what} as UTF-8") from None


def load_json_file(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column.

    Bytes that are not UTF-8, a key repeated in one object, numbers Python refuses to read (more than
    4300 digits) and runaway nesting are all reported as :class:`ConfigError` naming the file.
    """
    path = Path(path)
    text = _read_text(path, "JSON file")
    try:
        data = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except _DuplicateKey as duplicate:
        raise ConfigError(f"{path}: the key {show_value(duplicate.args[0])} appears twice in one object; JSON keeps "
                          "only the last, so remove the one you do not mean") from None
    except RecursionError:
        raise nesting_error(str(path)) from None
    except ValueError as error:  # an integer with more digits than Python converts (4300)
        raise ConfigError(f"{path}: cannot read the JSON: a number has more digits than any setting can use "
                          f"({str(error).split(';')[0]})") from None
    check_nesting(data, str(path))
    return data


def load_toml_file(path: Path) -> dict:
    """Parse a TOML file; a syntax error names the file and position."""
    import tomllib

    text = _read_text(path, "TOML file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: malformed TOML: {error}") from None
    except RecursionError:
        raise nesting_error(str(path)) from None
    except ValueError as error:
        raise ConfigError(f"{path}: cannot read the TOML: {error}") from None
    check_nesting(data, str(path))
    return data


def find_config_file(explicit: str | None, env_name: str | None, root: Path) -> Path | None:
    """The config file to use, or None when there is none (flags only)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not names_a_file(path):
                raise ConfigError(f"--config: file {show_value(str(path))} does not exist")
        return path
    folders = [root / "config" / env_name] if env_name else []
    folders.append(root / "config")
    for folder in folders:
        for name in ("config.json", "config.toml"):
            if names_a_file(folder / name):
                return folder / name
        if env_name and folder == root / "config" / env_name:
            raise ConfigError(f"ENV={env_name}: no config.json or config.toml in {folder}")
    return None


def names_a_file(path: str | Path) -> bool:
    """Whether ``path`` (``~`` expanded) is an existing file. A name the OS cannot even look up (too
    long, a NUL byte) is simply not one, instead of an OSError/ValueError escaping to the user."""
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: ~user that does not exist
        return False


def read_config_file(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Key -> raw value from a config file, leading dashes stripped, ``{env:VAR}`` filled from ``environ``."""
    data = load_toml_file(path) if path.suffix == ".toml" else load_json_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object of option names to values, not {type(data).__name__}")
    reject_duplicate_spellings(data, path)
    return {key.lstrip("-"): substitute_env(value, key.lstrip("-"), path, environ) for key, value in data.items()}


def reject_duplicate_spellings(data: Mapping[str, Any], source: Path | str) -> None:
    """Two keys of one file that set the same option (``--model_family`` and ``model_family``, or a
    deprecated alias and its option) are an error naming both: silently keeping one hides a mistake."""
    from simpletuner.options import alias_targets
    aliases = alias_targets()
    first_spelling: dict[str, str] = {}
    for key in data:
        bare = key.lstrip("-")
        name = aliases.get(bare, bare)
        if name in first_spelling:
            raise ConfigError(f"{source}: {show_value(first_spelling[name])} and {show_value(key)} both set the "
                              f"option `{name}`; keep one of them")
        first_spelling[name] = key


def substitute_env(value: Any, key: str, source: Path | str, environ: Mapping[str, str] | None = None) -> Any:
    """Replace ``{env:VAR}`` in strings (recursively in lists and dicts)."""
    environ = os.environ if environ is None else environ
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in environ:
                shown = shorten(name)
                raise ConfigError(f"{source}: `{shorten(key)}` uses {{env:{shown}}} but the environment variable "
                                  f"{shown} is not set")
            return environ[name]

        return _ENV_PLACEHOLDER.sub(replace, value)
    if isinstance(value, list):
        return [substitute_env(v, key, source, environ) for v in value]
    if isinstance(value, dict):
        return {k: substitute_env(v, key, source, environ) for k, v in value.items()}
    return value


#: Values TRAINING_DYNAMO_BACKEND accepts (accelerate's list; "no" turns compilation off).
DYNAMO_BACKENDS = ("no", "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs",
                   "ofi", "fx2trt", "onnxrt", "tensorrt", "aot_torchxla_trace_once", "torhchxla_trace_once", "tvm")
#: Values MIXED_PRECISION accepts (accelerate's; the trainer supports a subset, see --mixed_precision).
MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")

#: Every config.env variable simpletuner reads, with what it means (DISTRIBUTED.md documents them).
LAUNCHER_VARIABLES = {
    "TRAINING_NUM_PROCESSES": "processes in total, across all machines (one per GPU)",
    "TRAINING_NUM_MACHINES": "machines taking part (default 1)",
    "TRAINING_MACHINE_RANK": "this machine's rank, 0 on the main machine (required with several machines)",
    "TRAINING_MAIN_PROCESS_IP": "address of the machine with rank 0 (required with several machines)",
    "TRAINING_MAIN_PROCESS_PORT": "port of the rendezvous on the main machine (default: a free local port)",
    "TRAINING_DYNAMO_BACKEND": "torch.compile backend for the denoiser (inductor, ...; no = off)",
    "MIXED_PRECISION": "no, bf16 or fp16; must agree with --mixed_precision when both are set",
    "ACCELERATE_EXTRA_ARGS": "more `accelerate launch` arguments (an accelerate config file, FSDP, DeepSpeed, ...)",
    "SIMPLETUNER_LOG_LEVEL": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "SIMPLETUNER_CHECK_RANK_SYNC": "1: after every optimizer step each process prints a digest of its trained "
                                   "weights and the run stops if they differ",
}

#: ``accelerate launch`` flags that simpletuner sets from config.env / config.json itself; giving them in
#: ACCELERATE_EXTRA_ARGS as well would let the launcher and the trainer disagree.
MANAGED_ACCELERATE_FLAGS = {
    "num_processes": "TRAINING_NUM_PROCESSES", "num_machines": "TRAINING_NUM_MACHINES",
    "machine_rank": "TRAINING_MACHINE_RANK", "main_process_ip": "TRAINING_MAIN_PROCESS_IP",
    "main_process_port": "TRAINING_MAIN_PROCESS_PORT", "mixed_precision": "MIXED_PRECISION",
    "dynamo_backend": "TRAINING_DYNAMO_BACKEND", "dynamo_mode": "--dynamo_mode in config.json",
    "dynamo_use_fullgraph": "--dynamo_fullgraph in config.json", "dynamo_use_dynamic": "--dynamo_dynamic in config.json",
    "dynamo_use_regional_compilation": "--dynamo_use_regional_compilation in config.json",
}


@dataclass(frozen=True)
class LauncherSettings:
    """What ``config.env`` (and the environment) say about how to launch, with the variables we act on.

    ``num_processes`` counts processes on all machines together, as ``accelerate launch`` does.
    ``mixed_precision`` is MIXED_PRECISION as written (None when unset); resolution reconciles it
    with ``--mixed_precision``.
    """

    num_processes: int = 1
    dynamo_backend: str | None = None
    accelerate_extra_args: tuple[str, ...] = ()
    log_level: str = "INFO"
    source: str | None = None
    num_machines: int = 1
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    mixed_precision: str | None = None
    check_rank_sync: bool = False
    #: config.env lines that look meant for simpletuner but are not read (e.g. NUM_PROCESSES=2)
    warnings: tuple[str, ...] = field(default=(), compare=False)


#: Prefixes of the config.env variables simpletuner reads; users often leave them off.
LAUNCHER_PREFIXES = ("TRAINING_", "SIMPLETUNER_")


def unprefixed_variable_warnings(path: Path, values: Mapping[str, str]) -> list[str]:
    """One warning per config.env variable that is a known launcher variable without its prefix
    (``NUM_PROCESSES=2`` for ``TRAINING_NUM_PROCESSES``): such a line is silently ignored otherwise."""
    by_bare_name = {key[len(prefix):]: key for key in LAUNCHER_VARIABLES for prefix in LAUNCHER_PREFIXES
                    if key.startswith(prefix)}
    warnings = []
    for key, value in values.items():
        meant = by_bare_name.get(key.upper())
        if meant is not None:
            warnings.append(f"{path}: {key}={value} is not read by simpletuner; write {meant}={value} instead")
    return warnings


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; ``export`` prefixes, quotes and ``#`` comments are allowed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(_read_text(path, "config.env").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {show_value(raw)}")
        key, value = line.split("=", 1)
        try:
            parts = shlex.split(value, comments=True)
        except ValueError as error:  # an unclosed quote
            raise ConfigError(f"{path}:{number}: cannot read the value of {key.strip()}: {error}") from None
        values[key.strip()] = " ".join(parts)
    return values


#: The highest TCP port number.
MAX_PORT = 65535


def _int_variable(merged: Mapping[str, str], key: str, default: int | None, minimum: int,
                  maximum: int = MAX_PROCESSES) -> int | None:
    raw = merged.get(key, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={show_value(raw)} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{key}={value} must be at least {minimum}")
    if value > maximum:
        raise ConfigError(f"{key}={show_value(value)} must be at most {maximum}")
    return value


def _check_extra_args(args: tuple[str, ...]) -> None:
    """Reject ACCELERATE_EXTRA_ARGS flags that a config.env variable or option already controls."""
    for token in args:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name == "cpu":
            raise ConfigError("ACCELERATE_EXTRA_ARGS: remove `--cpu` (with it accelerate starts a single process); "
                              "without GPUs simpletuner starts CPU processes by itself")
        if name in MANAGED_ACCELERATE_FLAGS:
            raise ConfigError(
                f"ACCELERATE_EXTRA_ARGS: `{token.split('=', 1)[0]}` is set by simpletuner; "
                f"use {MANAGED_ACCELERATE_FLAGS[name]} instead"
            )


def load_launcher_settings(root: Path, env_name: str | None, environ: Mapping[str, str],
                           config_num_processes: int | None = None,
                           cli_num_processes: int | None = None) -> LauncherSettings:
    """Merge ``config/config.env`` then ``config/<ENV>/config.env``; real environment variables win.

    The process count comes from, first match wins: ``--num_processes`` on the command line
    (``cli_num_processes``), TRAINING_NUM_PROCESSES in the environment, in config.env, then
    ``num_processes`` in config.json (``config_num_processes``), then 1.
    """
    merged: dict[str, str] = {}
    sources = []
    unread: list[str] = []
    for path in [root / "config" / "config.env"] + ([root / "config" / env_name / "config.env"] if env_name else []):
        if names_a_file(path):
            values = parse_env_file(path)
            for key in values:
                if key.startswith(("TRAINING_", "SIMPLETUNER_")) and key not in LAUNCHER_VARIABLES:
                    close = difflib.get_close_matches(key, LAUNCHER_VARIABLES, n=1)
                    raise ConfigError(f"{path}: unknown variable {shorten(key)}"
                                      + (f"; did you mean {close[0]}?" if close else
                                         f"; known: {', '.join(LAUNCHER_VARIABLES)}"))
            unread.extend(unprefixed_variable_warnings(path, values))
            merged.update(values)
            sources.append(str(path))
    for key in LAUNCHER_VARIABLES:
        if key in environ:
            merged[key] = environ[key]
    if cli_num_processes is not None:
        merged["TRAINING_NUM_PROCESSES"] = str(cli_num_processes)
    elif config_num_processes is not None and merged.get("TRAINING_NUM_PROCESSES", "") == "":
        merged["TRAINING_NUM_PROCESSES"] = str(config_num_processes)
    processes = _int_variable(merged, "TRAINING_NUM_PROCESSES", 1, 1)
    machines = _int_variable(merged, "TRAINING_NUM_MACHINES", 1, 1)
    machine_rank = _int_variable(merged, "TRAINING_MACHINE_RANK", None, 0)
    port = _int_variable(merged, "TRAINING_MAIN_PROCESS_PORT", None, 1, MAX_PORT)
    address = merged.get("TRAINING_MAIN_PROCESS_IP") or None
    if machines > 1:
        missing = [key for key, value in (("TRAINING_MACHINE_RANK", machine_rank), ("TRAINING_MAIN_PROCESS_IP", address),
                                          ("TRAINING_MAIN_PROCESS_PORT", port)) if value is None]
        if missing:
            raise ConfigError(f"TRAINING_NUM_MACHINES={machines} needs {', '.join(missing)} on every machine "
                              "(the same address and port everywhere, a different rank on each machine)")
        if machine_rank >= machines:
            raise ConfigError(f"TRAINING_MACHINE_RANK={machine_rank} must be below TRAINING_NUM_MACHINES={machines}")
        if processes < machines:
            raise ConfigError(f"TRAINING_NUM_PROCESSES={processes} counts the processes of all machines together; "
                              f"with TRAINING_NUM_MACHINES={machines} it must be at least {machines}")
    level = (merged.get("SIMPLETUNER_LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"SIMPLETUNER_LOG_LEVEL={show_value(level)}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    backend = (merged.get("TRAINING_DYNAMO_BACKEND") or "no").lower()
    if backend not in DYNAMO_BACKENDS:
        raise ConfigError(f"TRAINING_DYNAMO_BACKEND={show_value(backend)}: use one of {', '.join(DYNAMO_BACKENDS)}")
    precision = (merged.get("MIXED_PRECISION") or "").lower() or None
    if precision is not None and precision not in MIXED_PRECISIONS:
        raise ConfigError(f"MIXED_PRECISION={show_value(precision)}: use one of {', '.join(MIXED_PRECISIONS)}")
    extra = tuple(shlex.split(merged.get("ACCELERATE_EXTRA_ARGS", "")))
    _check_extra_args(extra)
    sync_check = (merged.get("SIMPLETUNER_CHECK_RANK_SYNC") or "0").strip().lower()
    if sync_check not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"SIMPLETUNER_CHECK_RANK_SYNC={show_value(sync_check)}: use 1 or 0")
    return LauncherSettings(
        num_processes=processes,
        dynamo_backend=None if backend == "no" else backend,
        accelerate_extra_args=extra,
        log_level=level,
        source=", ".join(sources) or None,
        num_machines=machines,
        machine_rank=machine_rank,
        main_process_ip=address,
        main_process_port=port,
        mixed_precision=precision,
        check_rank_sync=sync_check in ("1", "true", "yes"),
        warnings=tuple(unread),
    )
