"""Cross-field rules, checked before any model or dataset is loaded.

Each rule is a small function that returns nothing or raises :class:`ConfigError` whose message names
the key(s), the value(s) and the fix. Rules that only deserve a warning return a message instead.
Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError, all_options

# Values of implemented options that the trainer cannot act on yet. Keeping them here (instead of
# narrowing the table's choices) lets `--help` show the full vocabulary users know from other trainers.
SUPPORTED_VALUES: dict[str, tuple] = {
    "optimizer": ("adamw_bf16", "optimi-adamw"),
    "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "linear", "polynomial"),
    "mixed_precision": ("no", "bf16"),
    "lora_type": ("standard",),
    "report_to": ("tensorboard", "none"),
    "resolution_type": ("pixel", "pixel_area", "area"),
}

LORA_ONLY_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout")


def check_required(config) -> None:
    missing = [o.name for o in all_options() if o.required and getattr(config, o.name) in (None, "")]
    if missing:
        raise ConfigError(
            "missing required option(s): " + ", ".join(f"`--{m}`" for m in missing)
            + "; set them on the command line or in config/config.json"
        )


def check_unimplemented(config) -> None:
    """An option the trainer does not act on yet may not be changed from its default."""
    for option in all_options():
        if option.implemented:
            continue
        value = getattr(config, option.name)
        if value != option.default and not (value in (None, "", [], {}) and option.default in (None, "", [], {})):
            raise ConfigError(
                f"`--{option.name}` is not supported yet (got {value!r}); remove it from your config or command line"
            )


def check_supported_values(config) -> None:
    for name, supported in SUPPORTED_VALUES.items():
        value = getattr(config, name)
        if value is not None and value not in supported:
            raise ConfigError(
                f"`--{name} {value}` is not supported yet; supported values: {', '.join(supported)}"
            )


def check_family(config) -> None:
    info = family_info(config.model_family)
    if config.model_flavour is not None and config.model_flavour not in info.flavours:
        raise ConfigError(
            f"`--model_flavour {config.model_flavour}` is not a flavour of {info.name}; "
            f"choose one of: {', '.join(info.flavours)}"
        )
    if config.model_type not in info.model_types:
        raise ConfigError(f"`--model_type {config.model_type}` is not available for {info.name}")
    if config.prediction_type is not None and config.prediction_type not in info.prediction_types:
        raise ConfigError(
            f"`--prediction_type {config.prediction_type}` is not supported for {info.name}; "
            f"use one of: {', '.join(info.prediction_types)}"
        )


def check_conflicts(config) -> None:
    if config.model_type == "full":
        changed = [n for n in LORA_ONLY_OPTIONS if n in config.explicit]
        if changed:
            raise ConfigError(
                f"`--{changed[0]}` only applies to `--model_type lora`, but `--model_type full` is set; "
                "remove one of them"
            )
    if config.validation_disable and config.validation_step_interval:
        raise ConfigError(
            "`--validation_disable` and `--validation_step_interval` conflict: validation cannot be both off "
            "and scheduled; remove one of them"
        )


def check_ranges(config) -> None:
    positive = ("train_batch_size", "gradient_accumulation_steps", "lora_rank", "vae_batch_size")
    for name in positive:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"`--{name}` = {getattr(config, name)} must be at least 1")
    non_negative = ("max_train_steps", "num_train_epochs", "lr_warmup_steps", "caption_dropout_probability")
    for name in non_negative:
        if getattr(config, name) is not None and getattr(config, name) < 0:
            raise ConfigError(f"`--{name}` = {getattr(config, name)} must not be negative")
    if not (config.max_train_steps or config.num_train_epochs):
        raise ConfigError("set `--max_train_steps` or `--num_train_epochs` to a positive number; both are 0")
    if config.caption_dropout_probability > 1:
        raise ConfigError(f"`--caption_dropout_probability` = {config.caption_dropout_probability} must be between 0 and 1")
    if config.resolution is None or config.resolution <= 0:
        raise ConfigError(f"`--resolution` = {config.resolution} must be positive")
    if config.learning_rate is None or config.learning_rate <= 0:
        raise ConfigError(f"`--learning_rate` = {config.learning_rate} must be positive")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise ConfigError(f"`--checkpoints_total_limit` = {config.checkpoints_total_limit} must be at least 1")
    for name in ("checkpoint_step_interval", "validation_step_interval"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"`--{name}` = {value} must be at least 1 (leave it unset to disable)")


def check_paths(config) -> None:
    if not config.data_backend_config:
        raise ConfigError("`--data_backend_config` is required: point it at your multidatabackend.json")
    if not Path(config.data_backend_config).is_file():
        raise ConfigError(f"`--data_backend_config`: file {config.data_backend_config!r} does not exist")
    from simpletuner.data.config import load_dataset_plan

    load_dataset_plan(config.data_backend_config)  # every dataset mistake surfaces before a model loads


def check_validation_settings(config) -> None:
    from simpletuner.validation.resolutions import parse_resolutions

    try:
        parse_resolutions(config.validation_resolution, fallback_edge=64)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def collect_warnings(config) -> list[str]:
    """Settings that are legal but probably not what the user meant."""
    warnings = []
    if config.validation_step_interval and not config.validation_prompt:
        warnings.append("`--validation_step_interval` is set but `--validation_prompt` is empty: "
                        "no validation images will be made")
    if config.lr_scheduler == "constant" and config.lr_warmup_steps:
        warnings.append(f"`--lr_warmup_steps {config.lr_warmup_steps}` has no effect with `--lr_scheduler constant`; "
                        "use `constant_with_warmup` to ramp the learning rate up")
    return warnings


RULES: tuple[Callable, ...] = (
    check_required, check_unimplemented, check_family, check_supported_values, check_conflicts, check_ranges,
    check_validation_settings, check_paths,
)


def validate_config(config) -> list[str]:
    """Run every rule; raise on the first error, return the warnings."""
    for rule in RULES:
        rule(config)
    return collect_warnings(config)
