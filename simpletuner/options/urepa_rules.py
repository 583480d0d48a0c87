"""Validation rules for U-REPA (simpletuner/regularizers/urepa.py). Torch-free.

U-REPA's tuning options mean nothing while it is off, and the schedule's refinements only mean something
with the setting they refine (decay options with a decaying schedule, the power with the polynomial one,
the threshold's options with a threshold), so a setting that would be ignored is refused. Families
without a UNet refuse every U-REPA option through ``FamilyInfo.options``; ``--urepa_use_tae`` is
declared but not implemented, so it is refused by the table's not-supported-yet rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simpletuner.models.registry import UREPA_OPTIONS
from simpletuner.options import ConfigError
from simpletuner.options.crepa_rules import ENCODER_NAMES, refuse_unless

DECAY_OPTIONS = ("urepa_decay_steps", "urepa_lambda_end")
THRESHOLD_OPTIONS = ("urepa_similarity_ema_decay", "urepa_threshold_mode")


def check_urepa(config) -> None:
    tuning = tuple(name for name in UREPA_OPTIONS if name != "urepa_enabled")
    refuse_unless(config, tuning, bool(config.urepa_enabled), "`--urepa_enabled true`")
    if not config.urepa_enabled:
        return
    model = config.urepa_model
    if model not in ENCODER_NAMES and not Path(model).is_dir():
        raise ConfigError(f"`--urepa_model` {model!r} is neither {', '.join(ENCODER_NAMES)} nor a folder holding a "
                          "Dinov2Model (config.json and weights); fix the name or the path")
    decaying = config.urepa_scheduler != "constant"
    refuse_unless(config, DECAY_OPTIONS, decaying, "a decaying `--urepa_scheduler` (linear, cosine or polynomial)")
    refuse_unless(config, ("urepa_power",), config.urepa_scheduler == "polynomial", "`--urepa_scheduler polynomial`")
    refuse_unless(config, THRESHOLD_OPTIONS, config.urepa_similarity_threshold is not None,
                   "`--urepa_similarity_threshold`")
    if decaying and not config.urepa_decay_steps and not config.max_train_steps:
        raise ConfigError(f"`--urepa_scheduler {config.urepa_scheduler}` decays over `--urepa_decay_steps`, or over "
                          "the whole run when that is 0, which needs `--max_train_steps`; set one of them")


UREPA_RULES: tuple[Callable, ...] = (check_urepa,)
