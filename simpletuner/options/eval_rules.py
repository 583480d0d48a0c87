"""Rules for the evaluation-loss options (``--eval_*``); torch-free.

The eval loss runs on a schedule (``--eval_steps_interval`` and/or ``--eval_epoch_interval``); the
options that shape it mean nothing without one, so setting them alone is an error rather than a
silent no-op. Whether the dataset list has an eval dataset (and ``--eval_dataset_id`` names one) is
checked once the datasets are built.

``--evaluation_type clip`` adds a CLIP score of images sampled from the validation prompts at the same
schedule; it needs a CLIP model (``--pretrained_evaluation_model_name_or_path``) and at least one prompt.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.options import ConfigError

#: Options that only shape an evaluation, with the value that means "not set".
_NEEDS_SCHEDULE = (("eval_timesteps", None), ("eval_dataset_id", None), ("eval_dataset_pooling", False),
                   ("eval_loss_disable", False), ("evaluation_type", "none"),
                   ("pretrained_evaluation_model_name_or_path", None), ("num_eval_images", None))
#: Options that only shape the CLIP score (``--evaluation_type clip``).
_NEEDS_CLIP = ("pretrained_evaluation_model_name_or_path", "num_eval_images")


def _scheduled(config) -> bool:
    return bool(config.eval_steps_interval or config.eval_epoch_interval)


def check_eval_intervals(config) -> None:
    steps, epochs = config.eval_steps_interval, config.eval_epoch_interval
    if steps is not None and steps < 1:
        raise ConfigError(f"`--eval_steps_interval` = {steps} must be a positive number of optimizer steps "
                          "(leave it unset for no step-based evaluation)")
    if epochs is not None and not epochs > 0:
        raise ConfigError(f"`--eval_epoch_interval` = {epochs} must be a positive number of epochs, e.g. 1 or 0.5 "
                          "for twice per epoch (leave it unset for no epoch-based evaluation)")


def check_eval_timesteps(config) -> None:
    count = config.eval_timesteps
    if count is not None and count < 1:
        raise ConfigError(f"`--eval_timesteps` = {count} must be at least 1 (the number of fixed noise levels "
                          "each eval image is scored at)")


def check_eval_needs_schedule(config) -> None:
    if _scheduled(config):
        return
    for name, unset in _NEEDS_SCHEDULE:
        value = getattr(config, name)
        if value not in (unset, None, ""):
            raise ConfigError(f"`--{name}` = {value!r} has no effect without an evaluation schedule; set "
                              "`--eval_steps_interval` or `--eval_epoch_interval`, or remove it")


def _clip(config) -> bool:
    return config.evaluation_type == "clip"


def _has_prompt(config) -> bool:
    from simpletuner.validation.prompt_library import library_prompts

    if config.validation_prompt:
        return True
    try:
        return bool(library_prompts(config))
    except ValueError:  # a broken --user_prompt_library: the validation rules report it
        return True


def check_clip_evaluation(config) -> None:
    count = config.num_eval_images
    if count is not None and count < 1:
        raise ConfigError(f"`--num_eval_images` = {count} must be at least 1 (the images sampled for each "
                          "evaluation metric)")
    if not _clip(config):
        for name in _NEEDS_CLIP:
            value = getattr(config, name)
            if value not in (None, ""):
                raise ConfigError(f"`--{name}` = {value!r} has no effect without `--evaluation_type clip`; "
                                  "set it, or remove the option")
        return
    if not config.pretrained_evaluation_model_name_or_path:
        raise ConfigError("`--evaluation_type clip` needs `--pretrained_evaluation_model_name_or_path`: a CLIP "
                          "model folder or hub id, e.g. openai/clip-vit-large-patch14")
    if not _has_prompt(config):
        raise ConfigError("`--evaluation_type clip` scores images sampled from the validation prompts, but there "
                          "is none; set `--validation_prompt`, `--validation_prompt_library` or "
                          "`--user_prompt_library`")


def eval_warnings(config) -> list[str]:
    warnings = []
    if config.eval_steps_interval and config.eval_epoch_interval:
        warnings.append("both `--eval_steps_interval` and `--eval_epoch_interval` are set: evaluation runs on "
                        "either schedule (once on a step both select)")
    if _scheduled(config) and config.eval_loss_disable and config.evaluation_type in (None, "none"):
        warnings.append("`--eval_loss_disable` turns off the only evaluation metric (no `--evaluation_type`): "
                        "the eval schedule does nothing")
    return warnings


EVAL_RULES: tuple[Callable, ...] = (check_eval_intervals, check_eval_timesteps, check_eval_needs_schedule,
                                    check_clip_evaluation)
