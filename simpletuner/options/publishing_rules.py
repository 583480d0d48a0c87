"""Validation rules for the publishing options (``--push_to_hub`` and friends, ``--publishing_config``,
``--post_upload_script``). Torch-free."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from typing import Callable

from simpletuner.options import ConfigError

#: Options that only act while ``--push_to_hub`` is on.
PUSH_ONLY_OPTIONS = ("push_checkpoints_to_hub", "push_to_hub_background", "model_card_private")
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_push_options(config) -> None:
    if not config.push_to_hub:
        for name in PUSH_ONLY_OPTIONS:
            if getattr(config, name):
                raise ConfigError(f"`--{name}` only applies with `--push_to_hub true`; add `--push_to_hub true` "
                                  f"and `--hub_model_id owner/name`, or remove `--{name}`")
        return
    if not config.hub_model_id:
        raise ConfigError("`--push_to_hub` needs `--hub_model_id owner/name`, the Hub repository to upload to "
                          "(e.g. `--hub_model_id your-name/my-lora`)")


def check_hub_model_id(config) -> None:
    value = config.hub_model_id
    if value in (None, ""):
        return
    if not HUB_ID.match(value) or ".." in value or "--" in value:
        raise ConfigError(f"`--hub_model_id {value}` is not a Hub repository id; use `owner/name` (your user or "
                          "organisation name, a slash, then the repository name; letters, digits, `-`, `_`, `.`)")


def check_push_online(config) -> None:
    if config.push_to_hub and hub_offline():
        raise ConfigError("`--push_to_hub` needs the network, but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE (or "
                          "set it to 0) to push, or remove `--push_to_hub` and upload the output dir later with "
                          "`huggingface-cli upload`")


def check_publishing_config(config) -> None:
    """Every target parses and boto3 is there, so a run never trains for hours and then cannot upload.
    The message shows a file name, never inline JSON (it may hold keys)."""
    from simpletuner.publishing.s3 import PublishingConfigError, load_publishing_targets

    value = config.publishing_config
    if value in (None, "", [], {}):
        return
    shown = value if isinstance(value, str) else "(inline JSON)"
    try:
        load_publishing_targets(value)
    except PublishingConfigError as error:
        raise ConfigError(f"`--publishing_config` {shown}: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"`--publishing_config` {shown}: {error}; give inline JSON or a JSON file holding one "
                          'object or a list of objects such as {"provider": "s3", "bucket": "my-models"}') from None
    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("`--publishing_config` uploads to S3 with boto3, which is not installed; pip install boto3")


def check_post_upload_script(config) -> None:
    """The command splits into arguments, uses known placeholders only and needs no shell."""
    from simpletuner.options import all_options
    from simpletuner.training.checkpoint_hooks import allowed_placeholders, needs_shell, template_fields

    template = config.post_upload_script
    if template is None:
        return
    flag = f"`--post_upload_script` {template!r}"
    if not template.strip():
        raise ConfigError("`--post_upload_script` is empty; give a command such as "
                          "'/path/notify.sh {remote_checkpoint_path}' or remove it")
    try:
        shlex.split(template)
        fields = template_fields(template)
    except ValueError as error:
        raise ConfigError(f"{flag} cannot be split into arguments ({error}); close the quote, and write literal "
                          "braces as {{ and }}") from None
    if needs_shell(template):
        raise ConfigError(f"{flag} uses shell syntax (pipes, redirections, `;`, `&`, `$`), but the command runs "
                          "without a shell; put those steps in a script file and give its path")
    allowed = allowed_placeholders(option.name for option in all_options())
    unknown = sorted({name for name in fields if name not in allowed})
    if unknown:
        raise ConfigError(f"{flag} uses unknown placeholder(s) " + ", ".join("{" + name + "}" for name in unknown)
                          + "; available: " + ", ".join("{" + name + "}" for name in sorted(allowed)))
    from simpletuner.publishing.post_upload import PostUploadScript

    try:  # a format spec that does not suit its value fails now, not after training
        PostUploadScript.from_config(config).command_for("output", 0, "")
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise ConfigError(f"{flag} cannot be filled in: {error} (placeholders are text, except {{global_step}}, "
                          "which is a number)") from None


PUBLISHING_RULES: tuple[Callable, ...] = (check_push_options, check_hub_model_id, check_push_online,
                                          check_publishing_config, check_post_upload_script)
