"""Validation rules for U-REPA (simpletuner/regularizers/urepa.py). Torch-free.

U-REPA's tuning options mean nothing while it is off, and the schedule's refinements only mean something
with the setting they refine (decay options with a decaying schedule, the power with the polynomial one,
the threshold's options with a threshold), so a setting that would be ignored is refused. Families
without a UNet refuse every U-REPA option through ``FamilyInfo.options``; ``--urepa_use_tae`` and the
teacher-feature source are checked with CREPA's in options/alignment_rules.py.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import UREPA_OPTIONS
from simpletuner.options.alignment_rules import check_encoder, check_schedule, refuse_unless


def check_urepa(config) -> None:
    tuning = tuple(name for name in UREPA_OPTIONS if name != "urepa_enabled")
    refuse_unless(config, tuning, bool(config.urepa_enabled), "`--urepa_enabled true`")
    if not config.urepa_enabled:
        return
    check_encoder(config, "urepa")
    check_schedule(config, "urepa")


UREPA_RULES: tuple[Callable, ...] = (check_urepa,)
