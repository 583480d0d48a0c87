"""Validation rules for the trainer's own switches: text-encoder training, freezing, precision,
memory and schedule-length options. Torch-free, like every rule, so mistakes surface before a
model loads.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError

TEXT_ENCODER_OPTIONS = ("text_encoder_lr", "text_encoder_limit", "freeze_encoder_strategy", "freeze_encoder_before",
                        "freeze_encoder_after")


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def check_text_encoder_training(config) -> None:
    """``--train_text_encoder`` and the options that only mean something with it."""
    if not config.train_text_encoder:
        changed = [name for name in TEXT_ENCODER_OPTIONS if _set(config, name)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies with `--train_text_encoder true`; add it or remove "
                              f"`--{changed[0]}`")
        return
    info = family_info(config.model_family)
    if not info.text_encoders:
        reason = info.text_encoder_refusal or "its text encoders stay frozen"
        raise ConfigError(f"`--train_text_encoder` is not supported for {info.name}: {reason}")
    if config.text_encoder_lr is not None and config.text_encoder_lr <= 0:
        raise ConfigError(f"`--text_encoder_lr` = {config.text_encoder_lr} must be positive")
    if config.text_encoder_limit is not None and config.text_encoder_limit < 1:
        raise ConfigError(f"`--text_encoder_limit` = {config.text_encoder_limit} must be at least 1 step")
    check_freeze_strategy(config)


def check_freeze_strategy(config) -> None:
    strategy = config.freeze_encoder_strategy
    before, after = config.freeze_encoder_before, config.freeze_encoder_after
    if strategy is None:
        if before is not None or after is not None:
            raise ConfigError("`--freeze_encoder_before` / `--freeze_encoder_after` need `--freeze_encoder_strategy` "
                              "(before, between or after)")
        return
    if config.model_type == "lora":
        raise ConfigError(f"`--freeze_encoder_strategy {strategy}` freezes layers of a fully trained text encoder; "
                          "with `--model_type lora` the encoder's weights are frozen already. Remove it")
    needs = {"before": ("freeze_encoder_before",), "after": ("freeze_encoder_after",),
             "between": ("freeze_encoder_before", "freeze_encoder_after")}[strategy]
    missing = [name for name in needs if getattr(config, name) is None]
    if missing:
        raise ConfigError(f"`--freeze_encoder_strategy {strategy}` needs `--{missing[0]}` (a layer index)")
    if strategy == "between" and before >= after:
        raise ConfigError(f"`--freeze_encoder_strategy between` freezes layers from `--freeze_encoder_before` "
                          f"({before}) up to `--freeze_encoder_after` ({after}); before must be smaller")


def check_freezing_and_outputs(config) -> None:
    if config.layer_freeze_strategy == "bitfit" and config.model_type != "full":
        raise ConfigError("`--layer_freeze_strategy bitfit` trains only the bias terms of the full model; it needs "
                          "`--model_type full`")
    if config.save_text_encoder and not config.train_text_encoder and config.model_type == "lora":
        raise ConfigError("`--save_text_encoder` writes the trained text encoder; add `--train_text_encoder true` "
                          "or remove it")


def check_loss_extras(config) -> None:
    if config.snr_weight is not None:
        if not (config.snr_gamma or config.use_soft_min_snr):
            raise ConfigError("`--snr_weight` scales the Min-SNR weighting; add `--snr_gamma` (e.g. 5) or "
                              "`--use_soft_min_snr true`, or remove it")
        if config.snr_weight < 0:
            raise ConfigError(f"`--snr_weight` = {config.snr_weight} must not be negative")
    if config.masked_loss_probability is not None and not 0 <= config.masked_loss_probability <= 1:
        raise ConfigError(f"`--masked_loss_probability` = {config.masked_loss_probability} must be between 0 and 1")
    prediction = config.prediction_type or family_info(config.model_family).prediction_types[0]
    if prediction == "flow_matching":
        for name in ("snr_gamma", "use_soft_min_snr", "huber_schedule", "huber_c"):
            if name in config.explicit:
                raise ConfigError(f"`--{name}` is defined on a DDPM noise schedule; flow-matching training weights "
                                  "timesteps with `--flow_loss_weighting` instead. Remove it")
        if config.loss_type != "l2":
            raise ConfigError(f"`--loss_type {config.loss_type}` is not available for flow matching yet; use l2")
    if config.hidream_load_balancing_loss_weight is not None and not config.hidream_use_load_balancing_loss:
        raise ConfigError("`--hidream_load_balancing_loss_weight` has no effect without "
                          "`--hidream_use_load_balancing_loss true`; add it or remove the weight")


def check_run_length_and_memory(config) -> None:
    if config.ignore_final_epochs and not config.max_train_steps:
        raise ConfigError("`--ignore_final_epochs` lets `--max_train_steps` outrun the epoch count; set "
                          "`--max_train_steps` too")
    if config.gradient_checkpointing_interval is not None:
        if not config.gradient_checkpointing:
            raise ConfigError("`--gradient_checkpointing_interval` needs `--gradient_checkpointing true`")
        if config.gradient_checkpointing_interval < 1:
            raise ConfigError(f"`--gradient_checkpointing_interval` = {config.gradient_checkpointing_interval} "
                              "must be at least 1")
    if config.accelerator_cache_clear_interval is not None and config.accelerator_cache_clear_interval < 1:
        raise ConfigError(f"`--accelerator_cache_clear_interval` = {config.accelerator_cache_clear_interval} must be "
                          "at least 1 (leave it unset to disable)")


def check_layersync(config) -> None:
    """LayerSync needs its student block; its other options mean nothing without it switched on.
    (Families without transformer blocks refuse every LayerSync option: FamilyInfo.options.)"""
    tuning = [name for name in ("layersync_student_block", "layersync_teacher_block", "layersync_lambda")
              if _set(config, name)]
    if not config.layersync_enabled:
        if tuning:
            raise ConfigError(f"`--{tuning[0]}` has no effect without `--layersync_enabled true`; add it or remove "
                              f"`--{tuning[0]}`")
        return
    if config.layersync_student_block is None:
        raise ConfigError("`--layersync_enabled` needs `--layersync_student_block`: the block (1 = the first) whose "
                          "tokens are pulled toward the teacher block's")


TRAINING_RULES: tuple[Callable, ...] = (
    check_text_encoder_training, check_freezing_and_outputs, check_loss_extras, check_run_length_and_memory,
    check_layersync,
)
