"""From command line + config file + defaults to one validated :class:`TrainConfig`.

Precedence: CLI flags > config file > table defaults. Deprecated aliases are accepted everywhere
with a warning and mapped to their canonical option.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from simpletuner.options import ConfigError, alias_targets, all_options, options_by_name, unknown_option_message
from simpletuner.options.files import LauncherSettings, find_config_file, load_launcher_settings, read_config_file
from simpletuner.options.spec import Option
from simpletuner.options.values import coerce_value, parse_bool, read_json_option
from simpletuner.options.files import names_a_file

logger = logging.getLogger(__name__)


class TrainConfig:
    """The resolved options of one run: attribute access to every option's typed value.

    Immutable on purpose: the trainer reads it, nothing rewrites it behind the user's back.
    ``explicit`` records which options the user set (CLI or file), for summaries and validation.
    """

    __slots__ = ("_values", "explicit")

    def __init__(self, values: Mapping[str, Any], explicit: frozenset[str] = frozenset()):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "explicit", frozenset(explicit))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(unknown_option_message(name, "TrainConfig")) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TrainConfig is immutable; use .replace(**changes)")

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some values changed (used by tests and derived settings)."""
        unknown = [k for k in changes if k not in self._values]
        if unknown:
            raise AttributeError(unknown_option_message(unknown[0], "TrainConfig.replace"))
        return TrainConfig({**self._values, **changes}, self.explicit | set(changes))

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def non_default(self) -> dict[str, Any]:
        """The options whose value differs from the table default."""
        table = options_by_name()
        return {k: v for k, v in self._values.items() if v != table[k].default}


@dataclass
class ResolvedRun:
    """Everything ``simpletuner train`` needs before it loads anything heavy."""

    config: TrainConfig
    config_file: Path | None
    launcher: LauncherSettings
    #: the checked dataset list (simpletuner.data.config.DatasetPlan), read once here and passed down
    dataset_plan: Any = None
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    #: the options given as command-line flags (canonical names): they win over the config file, and
    #: ``--resume_from_checkpoint latest`` typed there continues another run's checkpoints
    command_line: frozenset[str] = frozenset()
    #: decisions taken on the user's behalf (a command-line switch that overrides the file), shown
    #: by ``--dry-run`` and in the trainer's start-up summary
    notes: list[str] = field(default_factory=list)


def _metavar(option: Option) -> str:
    return option.metavar or option.name.upper()


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of the table to ``parser`` (grouped as in the table).

    Defaults are suppressed so we can tell which flags were actually given on the command line.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in all_options():
        group = groups.get(option.group) or groups.setdefault(option.group, parser.add_argument_group(option.group))
        names = [f"--{option.name}"] + [f"--{alias}" for alias in option.aliases]
        help_text = option.help + ("" if option.implemented else " [not supported yet]")
        if option.range_text():
            help_text += f" (range: {option.range_text()})"
        if option.default is not None and option.default != "":
            help_text += f" (default: {option.default})"
        kwargs: dict[str, Any] = dict(dest=option.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if option.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="true|false")
        else:
            kwargs.update(metavar=_metavar(option))
        group.add_argument(*names, **kwargs)


def build_train_parser(prog: str = "simpletuner train") -> argparse.ArgumentParser:
    """The parser of ``simpletuner train``: run-level flags plus every option of the table."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a diffusion model. Options come from flags, then the config file, then defaults.",
        allow_abbrev=False,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--config", default=None, help="Path to a config.json or config.toml (default: config/config.json).")
    run.add_argument("--env", default=None, help="Use config/<ENV>/config.json and config/<ENV>/config.env.")
    run.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="Print the resolved config and the dataset plan, then exit without training.")
    add_option_arguments(parser)
    return parser


def _used_alias_in_argv(argv: Sequence[str]) -> list[str]:
    aliases = alias_targets()
    used = []
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name in aliases:
                used.append(name)
    return used


def _reject_unknown_arguments(unknown: Sequence[str]) -> None:
    """argparse only says "unrecognized arguments"; name the closest known option instead."""
    for token in unknown:
        if token.startswith("--"):
            raise ConfigError(unknown_option_message(token[2:].split("=", 1)[0], "command line"))
    raise ConfigError(f"command line: unexpected argument {unknown[0]!r}; options are written `--name value`")


def merge_sources(file_values: Mapping[str, Any], cli_values: Mapping[str, Any], file_label: str,
                  warnings: list[str]) -> TrainConfig:
    """Apply defaults, then file values, then CLI values; every value is coerced and checked."""
    table = options_by_name()
    aliases = alias_targets()
    values = {name: option.default for name, option in table.items()}
    explicit: set[str] = set()
    for source, raw_values in ((file_label, file_values), ("command line", cli_values)):
        for key, raw in raw_values.items():
            name = key
            if key in aliases:
                name = aliases[key]
                warnings.append(f"{source}: `{key}` is another tool's name for `{name}`; read as `{name}`")
            if name not in table:
                raise ConfigError(unknown_option_message(key, source))
            values[name] = coerce_value(table[name], raw, source)
            explicit.add(name)
    return TrainConfig(values, frozenset(explicit))


#: Options that schedule validation images; ``--validation_disable`` on the command line turns them off.
VALIDATION_SCHEDULE_OPTIONS = ("validation_step_interval", "validation_epoch_interval", "validation_on_startup")


def command_line_switch_offs(file_values: Mapping[str, Any], cli_values: Mapping[str, Any], file_label: str,
                             notes: list[str]) -> dict[str, Any]:
    """``file_values`` without the validation schedule when ``--validation_disable`` is given on the
    command line: the flag typed for this run wins over the schedule the config file keeps (both in
    the same place stay a conflict, reported by validation). Appends a note naming what was dropped."""
    raw = cli_values.get("validation_disable")
    try:
        disabled = raw is not None and parse_bool(raw)
    except ValueError:
        return dict(file_values)  # merge_sources reports the bad value
    if not disabled:
        return dict(file_values)
    aliases = alias_targets()
    kept, dropped = {}, []
    for key, value in file_values.items():
        name = aliases.get(key, key)
        if name in VALIDATION_SCHEDULE_OPTIONS and name not in cli_values:
            if value not in (None, False) and str(value).strip().lower() not in ("", "false", "null", "none", "0"):
                dropped.append(f"{key} {str(value).lower() if isinstance(value, bool) else value}")
            continue
        kept[key] = value
    if dropped:
        notes.append(f"{'validation:':<14}off, because `--validation_disable` on the command line overrides "
                     f"{', '.join(dropped)} from {file_label}")
    return kept


def read_json_option_files(config: TrainConfig) -> TrainConfig:
    """Read every JSON option given as a file path, once, at start-up: validation, the trainer and its
    components then all see the same parsed content, and a file edited mid-run changes nothing."""
    table = options_by_name()
    contents = {name: read_json_option(name, value) for name, value in config.as_dict().items()
                if table[name].kind == "json" and isinstance(value, str) and names_a_file(value)}
    return config.replace(**contents) if contents else config


def reconcile_launcher(config: TrainConfig, launcher: LauncherSettings, warnings: list[str]) -> TrainConfig:
    """Make config.env and the config agree: MIXED_PRECISION fills ``--mixed_precision`` unless the
    config sets it differently (an error: the launcher and the trainer would disagree)."""
    if launcher.mixed_precision is not None:
        if "mixed_precision" in config.explicit and config.mixed_precision != launcher.mixed_precision:
            raise ConfigError(
                f"config.env MIXED_PRECISION={launcher.mixed_precision} disagrees with `--mixed_precision "
                f"{config.mixed_precision}`; remove one of them or make them equal"
            )
        config = config.replace(mixed_precision=coerce_value(options_by_name()["mixed_precision"],
                                                             launcher.mixed_precision, "config.env MIXED_PRECISION"))
    if not launcher.dynamo_backend:
        unused = [name for name in ("dynamo_mode", "dynamo_fullgraph", "dynamo_dynamic", "dynamo_use_regional_compilation")
                  if name in config.explicit and getattr(config, name) not in (None, False)]
        if unused:
            warnings.append(", ".join(f"`--{name}`" for name in unused) + " has no effect without a compiler backend; "
                            "set TRAINING_DYNAMO_BACKEND=inductor in config/config.env")
    return config


def resolve_run(argv: Sequence[str], environ: Mapping[str, str] | None = None, root: Path | None = None) -> ResolvedRun:
    """Parse ``simpletuner train`` arguments and produce the validated run description."""
    from simpletuner.options.validation import validate_config

    environ = os.environ if environ is None else environ
    root = Path.cwd() if root is None else root
    parser = build_train_parser()
    namespace, unknown = parser.parse_known_args(list(argv))
    if unknown:
        _reject_unknown_arguments(unknown)
    cli_values = {k: v for k, v in vars(namespace).items() if k not in ("config", "env", "dry_run")}
    # argparse maps aliases to the canonical dest; remember which were used so we can warn.
    warnings = [f"command line: `--{a}` is another tool's name for `--{alias_targets()[a]}`; read as `--{alias_targets()[a]}`"
                for a in _used_alias_in_argv(argv)]
    env_name = namespace.env or environ.get("ENV") or None
    config_file = find_config_file(namespace.config, env_name, root)
    file_values = read_config_file(config_file, environ) if config_file else {}
    file_label = str(config_file) if config_file else "config"
    notes: list[str] = []
    file_values = command_line_switch_offs(file_values, cli_values, file_label, notes)
    config = merge_sources(file_values, cli_values, file_label, warnings)
    launcher = load_launcher_settings(root, env_name, environ, config_num_processes=config.num_processes,
                                      cli_num_processes=cli_values.get("num_processes"))
    warnings.extend(launcher.warnings)
    config = read_json_option_files(reconcile_launcher(config, launcher, warnings))
    rule_warnings, dataset_plan = validate_config(config)
    warnings.extend(rule_warnings)
    return ResolvedRun(config=config, config_file=config_file, launcher=launcher, dataset_plan=dataset_plan,
                       dry_run=namespace.dry_run, warnings=warnings, command_line=frozenset(cli_values), notes=notes)
