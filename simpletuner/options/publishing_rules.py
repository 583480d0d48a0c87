"""Validation rules for the Hub publishing options (``--push_to_hub`` and friends). Torch-free."""

from __future__ import annotations

import os
import re
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


PUBLISHING_RULES: tuple[Callable, ...] = (check_push_options, check_hub_model_id, check_push_online)
