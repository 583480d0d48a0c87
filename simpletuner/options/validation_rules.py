"""Rules for the validation-sampling options (schedule, seeds, guidance, sampler, prompt libraries).
Torch-free like every rule; the tables below are also what :mod:`simpletuner.validation.runner` uses,
so the config check and the sampler agree on what is possible."""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError

#: Families whose pipeline ``__call__`` takes ``guidance_rescale`` (checked against diffusers in the tests).
GUIDANCE_RESCALE_FAMILIES = ("sd1x", "sd2x", "sdxl")
#: Families whose ``--validation_guidance`` is a value fed to the model (no unconditional pass).
EMBEDDED_GUIDANCE_FAMILIES = ("flux",)

#: ``--validation_noise_scheduler`` names -> diffusers class, for noise-prediction (DDPM) families ...
DDPM_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
#: ... and for flow-matching families.
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
#: Schedulers that cannot step a given prediction type.
UNSUPPORTED_PREDICTION = {"euler-a": ("sample",)}
#: Pixel-space IF predicts a learned variance that only a DDPM step consumes.
PIXEL_SPACE_SCHEDULERS = ("ddpm",)


def scheduler_class_name(name: str, flow_matching: bool) -> str | None:
    return (FLOW_SCHEDULERS if flow_matching else DDPM_SCHEDULERS).get(name)


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def check_validation_schedule(config) -> None:
    interval = config.validation_epoch_interval
    if interval is not None and interval < 1:
        raise ConfigError(f"`--validation_epoch_interval` = {interval} must be at least 1 (leave it unset to "
                          "validate by steps only)")
    if interval is not None and config.validation_disable:
        raise ConfigError("`--validation_disable` and `--validation_epoch_interval` conflict: remove one of them")
    if config.validation_on_startup and config.validation_disable:
        raise ConfigError("`--validation_disable` and `--validation_on_startup` conflict: remove one of them")


def check_validation_seeds(config) -> None:
    if config.validation_randomize and config.validation_seed is not None:
        raise ConfigError(f"`--validation_randomize` picks a new seed at every validation, so `--validation_seed "
                          f"{config.validation_seed}` would be ignored; remove one of them")


def check_validation_guidance(config) -> None:
    family = config.model_family
    rescale = config.validation_guidance_rescale
    if rescale is not None:
        if family not in GUIDANCE_RESCALE_FAMILIES:
            raise ConfigError(f"`--validation_guidance_rescale {rescale}`: the {family} pipeline has no guidance "
                              f"rescale; it works for {', '.join(GUIDANCE_RESCALE_FAMILIES)}. Remove it")
        if not 0 <= rescale <= 1:
            raise ConfigError(f"`--validation_guidance_rescale` = {rescale} must be between 0 and 1 (0.7 is usual)")
    if not config.validation_disable_unconditional:
        return
    if rescale is not None:
        raise ConfigError(f"`--validation_guidance_rescale {rescale}` rescales classifier-free guidance, which "
                          "`--validation_disable_unconditional` turns off; remove one of them")
    if family in EMBEDDED_GUIDANCE_FAMILIES:
        if config.validation_guidance_real is not None:
            raise ConfigError(f"`--validation_guidance_real {config.validation_guidance_real}` needs the unconditional "
                              "pass that `--validation_disable_unconditional` turns off; remove one of them")
    elif _set(config, "validation_guidance") and config.validation_guidance != 1.0:
        raise ConfigError(f"`--validation_guidance {config.validation_guidance}` needs the unconditional pass that "
                          "`--validation_disable_unconditional` turns off (it samples at guidance 1.0); remove one")


def check_validation_scheduler(config) -> None:
    name = config.validation_noise_scheduler
    if name is None:
        return
    info = family_info(config.model_family)
    prediction = config.prediction_type or info.prediction_types[0]
    flow = prediction == "flow_matching"
    table = FLOW_SCHEDULERS if flow else DDPM_SCHEDULERS
    allowed = tuple(table)
    if info.pixel_space:
        allowed = tuple(n for n in allowed if n in PIXEL_SPACE_SCHEDULERS)
    allowed = tuple(n for n in allowed if prediction not in UNSUPPORTED_PREDICTION.get(n, ()))
    if name not in allowed:
        kind = "a flow-matching" if flow else f"a {prediction}-prediction"
        raise ConfigError(f"`--validation_noise_scheduler {name}` cannot sample {kind} {info.name} model; "
                          f"choose one of: {', '.join(allowed)} (or leave it unset for the model's own scheduler)")


def check_prompt_libraries(config) -> None:
    if config.user_prompt_library:
        from simpletuner.validation.prompt_library import load_user_prompt_library

        try:
            load_user_prompt_library(config.user_prompt_library)
        except ValueError as error:
            raise ConfigError(f"`--user_prompt_library`: {error}") from None


def validation_option_warnings(config) -> list[str]:
    warnings = []
    if config.validation_disable_unconditional and config.model_family not in EMBEDDED_GUIDANCE_FAMILIES \
            and _set(config, "validation_negative_prompt"):
        warnings.append("`--validation_negative_prompt` is only used by the unconditional pass, which "
                        "`--validation_disable_unconditional` turns off")
    if config.validation_epoch_interval and not (config.validation_prompt or config.validation_prompt_library
                                                 or config.user_prompt_library):
        warnings.append("`--validation_epoch_interval` is set but there is no validation prompt: "
                        "no validation images will be made")
    return warnings


VALIDATION_RULES: tuple[Callable, ...] = (
    check_validation_schedule, check_validation_seeds, check_validation_guidance, check_validation_scheduler,
    check_prompt_libraries,
)
