"""Validation rules for CREPA (simpletuner/regularizers/crepa.py). Torch-free.

CREPA's tuning options mean nothing while it is off, and each group of them only means something with
the switch it refines (the encoder options without backbone features, decay options with a decaying
schedule, the threshold's options with a threshold), so a setting that would be ignored is refused.
Families without transformer blocks refuse every CREPA option through ``FamilyInfo.options``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simpletuner.models.registry import CREPA_OPTIONS
from simpletuner.options import ConfigError

#: ``--crepa_model`` short names (simpletuner.regularizers.crepa.DINOV2_HUB_IDS maps them to hub ids).
ENCODER_NAMES = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitg14")
ENCODER_OPTIONS = ("crepa_model", "crepa_encoder_image_size", "crepa_encoder_frames_batch_size")
DECAY_OPTIONS = ("crepa_decay_steps", "crepa_lambda_end")
THRESHOLD_OPTIONS = ("crepa_similarity_ema_decay", "crepa_threshold_mode")


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def refuse_unless(config, names: tuple[str, ...], condition: bool, needs: str) -> None:
    if condition:
        return
    for name in names:
        if _set(config, name):
            raise ConfigError(f"`--{name}` has no effect without {needs}; add it or remove `--{name}`")


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
        check_encoder(config)
    check_schedule(config)


def check_encoder(config) -> None:
    model = config.crepa_model
    if model not in ENCODER_NAMES and not Path(model).is_dir():
        raise ConfigError(f"`--crepa_model` {model!r} is neither {', '.join(ENCODER_NAMES)} nor a folder holding a "
                          "Dinov2Model (config.json and weights); fix the name or the path")


def check_schedule(config) -> None:
    decaying = config.crepa_scheduler != "constant"
    refuse_unless(config, DECAY_OPTIONS, decaying, "a decaying `--crepa_scheduler` (linear, cosine or polynomial)")
    refuse_unless(config, ("crepa_power",), config.crepa_scheduler == "polynomial", "`--crepa_scheduler polynomial`")
    refuse_unless(config, THRESHOLD_OPTIONS, config.crepa_similarity_threshold is not None,
                   "`--crepa_similarity_threshold`")
    if decaying and not config.crepa_decay_steps and not config.max_train_steps:
        raise ConfigError(f"`--crepa_scheduler {config.crepa_scheduler}` decays over `--crepa_decay_steps`, or over "
                          "the whole run when that is 0, which needs `--max_train_steps`; set one of them")


CREPA_RULES: tuple[Callable, ...] = (check_crepa,)
