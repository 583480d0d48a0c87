"""Validation rules for CREPA (simpletuner/regularizers/crepa.py). Torch-free.

CREPA's tuning options mean nothing while it is off, and each group of them only means something with
the switch it refines (the encoder options without backbone features, decay options with a decaying
schedule, the threshold's options with a threshold), so a setting that would be ignored is refused.
Families without transformer blocks refuse every CREPA option through ``FamilyInfo.options``.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import CREPA_OPTIONS
from simpletuner.options import ConfigError
from simpletuner.options.alignment_rules import check_encoder, check_schedule, refuse_unless

ENCODER_OPTIONS = ("crepa_model", "crepa_encoder_image_size", "crepa_encoder_frames_batch_size")


def check_crepa(config) -> None:
    tuning = tuple(name for name in CREPA_OPTIONS if name != "crepa_enabled")
    refuse_unless(config, tuning, bool(config.crepa_enabled), "`--crepa_enabled true`")
    if not config.crepa_enabled:
        return
    if config.crepa_block_index is None:
        raise ConfigError("`--crepa_enabled` needs `--crepa_block_index`: the 0-based index of the transformer block "
                          "whose image tokens are aligned (early blocks, e.g. 8, tend to work best)")
    backbone = bool(config.crepa_use_backbone_features)
    refuse_unless(config, ("crepa_teacher_block_index",), backbone, "`--crepa_use_backbone_features true`")
    refuse_unless(config, ENCODER_OPTIONS, not backbone,
                   "an image encoder (`--crepa_use_backbone_features true` aligns with the denoiser's own block)")
    if backbone and config.crepa_teacher_block_index is not None and config.crepa_teacher_block_index < config.crepa_block_index:
        raise ConfigError(f"`--crepa_teacher_block_index` {config.crepa_teacher_block_index} must name a block at or "
                          f"after `--crepa_block_index` {config.crepa_block_index}: the target is a deeper block")
    if not backbone:
        check_encoder(config, "crepa")
    check_schedule(config, "crepa")


CREPA_RULES: tuple[Callable, ...] = (check_crepa,)
