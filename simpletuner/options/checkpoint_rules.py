"""Validation rules for the checkpoint options: epoch and rolling intervals, the free-space check and
the post-checkpoint script.

Torch-free like every rule: a bad size, a missing cleanup script or an unknown placeholder stops the
run before any model loads, instead of at the first checkpoint hours later.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Callable

from simpletuner.memory.units import parse_size
from simpletuner.options import ConfigError, all_options
from simpletuner.training.checkpoint_hooks import (
    PostCheckpointScripts,
    allowed_placeholders,
    executable_on_path,
    needs_shell,
    template_fields,
)

#: Options that only act when checkpoints are written.
SAVE_TIME_OPTIONS = ("checkpointing_use_tempdir", "disk_low_threshold", "post_checkpoint_script")
INTERVALS = ("checkpoint_step_interval", "checkpoint_epoch_interval", "checkpointing_rolling_steps")


def check_checkpoint_intervals(config) -> None:
    for name in ("checkpoint_epoch_interval", "checkpointing_rolling_steps", "checkpoints_rolling_total_limit"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"`--{name}` = {value} must be at least 1 (leave it unset to disable)")
    if config.checkpoints_rolling_total_limit and not config.checkpointing_rolling_steps:
        raise ConfigError(f"`--checkpoints_rolling_total_limit` = {config.checkpoints_rolling_total_limit} limits "
                          "rolling checkpoints, but `--checkpointing_rolling_steps` is unset so none are written; "
                          "set the rolling interval or remove the limit")


def check_disk_low(config) -> None:
    """The threshold parses; the action and script only appear with what they need."""
    threshold = config.disk_low_threshold
    if threshold in (None, ""):
        if "disk_low_action" in config.explicit:
            raise ConfigError(f"`--disk_low_action {config.disk_low_action}` needs `--disk_low_threshold` (e.g. "
                              "100G) to know when the disk counts as low; add it or remove `--disk_low_action`")
    else:
        try:
            parse_size(threshold)
        except ValueError as error:
            raise ConfigError(f"`--disk_low_threshold` = {threshold!r} is not a size: {error}; use bytes or a "
                              "size such as 500M, 100G or 1T") from None
    script = config.disk_low_script
    if config.disk_low_action != "script":
        if script:
            raise ConfigError(f"`--disk_low_script` {script!r} only runs with `--disk_low_action script` (got "
                              f"{config.disk_low_action!r}); set the action to script or remove the script")
        return
    if not script:
        raise ConfigError("`--disk_low_action script` needs `--disk_low_script` naming the cleanup script to run")
    path = Path(script)
    if not path.is_file():
        raise ConfigError(f"`--disk_low_script` {script!r} does not exist (or is not a file); give the path of "
                          "an executable cleanup script")
    if not os.access(path, os.X_OK):
        raise ConfigError(f"`--disk_low_script` {script!r} is not executable; run `chmod +x {script}`")


def check_post_checkpoint_script(config) -> None:
    template = config.post_checkpoint_script
    if template is None:
        return
    if not template.strip():
        raise ConfigError("`--post_checkpoint_script` is empty; give a command such as "
                          "'/path/hook.sh {local_checkpoint_path} {global_step}' or remove it")
    try:
        shlex.split(template)
    except ValueError as error:
        raise ConfigError(f"`--post_checkpoint_script` {template!r} cannot be split into arguments ({error}); "
                          "close the quote") from None
    try:
        fields = template_fields(template)
    except ValueError as error:
        raise ConfigError(f"`--post_checkpoint_script` {template!r} is not a valid template ({error}); write "
                          "literal braces as {{ and }}") from None
    allowed = allowed_placeholders(option.name for option in all_options())
    unknown = sorted({name for name in fields if name not in allowed})
    if unknown:
        shown = ", ".join("{" + name + "}" for name in unknown)
        raise ConfigError(f"`--post_checkpoint_script` uses unknown placeholder(s) {shown}; available: "
                          + ", ".join("{" + name + "}" for name in sorted(allowed)) + " (write literal braces as {{ and }})")
    try:  # a format spec that does not suit its value fails here rather than at the first checkpoint
        PostCheckpointScripts.from_config(config).command_for(Path("checkpoint-0"), 0)
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise ConfigError(f"`--post_checkpoint_script` {template!r} cannot be filled in: {error} (placeholders "
                          "are text, except {global_step}, which is a number)") from None


def checkpoint_warnings(config) -> list[str]:
    warnings = []
    if not any(getattr(config, name) for name in INTERVALS):
        unused = [name for name in SAVE_TIME_OPTIONS if getattr(config, name)]
        if unused:
            warnings.append(", ".join(f"`--{name}`" for name in unused) + " only acts when a checkpoint is saved, "
                            "and no checkpoint interval is set (`--checkpoint_step_interval`, "
                            "`--checkpoint_epoch_interval` or `--checkpointing_rolling_steps`)")
    template = config.post_checkpoint_script
    if template and not needs_shell(template) and not executable_on_path(template):
        warnings.append(f"`--post_checkpoint_script`: {shlex.split(template)[0]!r} is not an executable on this "
                        "machine's PATH; each run of it will fail with a warning")
    return warnings


CHECKPOINT_RULES: tuple[Callable, ...] = (check_checkpoint_intervals, check_disk_low, check_post_checkpoint_script)
