"""Config rules for FLUX.1, checked before anything loads (torch-free, like every rule).

That the ``--flux_*`` options and the Flux validation options are only set for ``--model_family
flux`` is checked generically (the family lists them in the registry); the rules here check that the
Flux settings agree with each other and with the rest of the config.
"""

from __future__ import annotations

from simpletuner.options import ConfigError

#: ``--flux_lora_target`` presets that need ControlNet training (not available).
CONTROLNET_PRESETS = ("controlnet", "all+ffs+embedder+controlnet")
#: Sigma options that ``--flux_fast_schedule`` replaces.
FAST_SCHEDULE_CONFLICTS = ("flow_use_uniform_schedule", "flow_use_beta_schedule", "flow_use_discrete_schedule",
                           "flow_schedule_auto_shift", "flow_schedule_shift")


def _real_cfg(config) -> bool:
    return (config.validation_guidance_real or 1.0) > 1.0


def check_flux(config) -> None:
    if config.model_family != "flux":
        return
    _check_guidance(config)
    _check_lora_target(config)
    if config.flux_fast_schedule:
        changed = [name for name in FAST_SCHEDULE_CONFLICTS if getattr(config, name) not in (None, False)]
        if changed:
            raise ConfigError(f"`--flux_fast_schedule` draws its own few noise levels, so `--{changed[0]}` would "
                              "have no effect; remove one of them")
    _check_validation_cfg(config)


def _check_guidance(config) -> None:
    mode = config.flux_guidance_mode or "constant"
    low, high, value = config.flux_guidance_min, config.flux_guidance_max, config.flux_guidance_value
    if mode == "random-range":
        if low is None or high is None:
            raise ConfigError("`--flux_guidance_mode random-range` draws guidance uniformly between "
                              "`--flux_guidance_min` and `--flux_guidance_max`; set both (e.g. 1.0 and 4.0)")
        if not 0 <= low <= high:
            raise ConfigError(f"`--flux_guidance_min` = {low} and `--flux_guidance_max` = {high} must satisfy "
                              "0 <= min <= max")
        if value is not None:
            raise ConfigError("`--flux_guidance_value` is the constant-mode guidance; with `--flux_guidance_mode "
                              "random-range` use `--flux_guidance_min` / `--flux_guidance_max` and remove it")
        return
    if low is not None or high is not None:
        name = "flux_guidance_min" if low is not None else "flux_guidance_max"
        raise ConfigError(f"`--{name}` bounds the random guidance draw; add `--flux_guidance_mode random-range` "
                          "or remove it (constant mode uses `--flux_guidance_value`)")
    if value is not None and value < 0:
        raise ConfigError(f"`--flux_guidance_value` = {value} must not be negative")


def _check_lora_target(config) -> None:
    target = config.flux_lora_target
    if target is None:
        return
    if config.model_type != "lora":
        raise ConfigError(f"`--flux_lora_target {target}` picks LoRA modules, but `--model_type "
                          f"{config.model_type}` trains the whole transformer; remove it")
    if target in CONTROLNET_PRESETS:
        raise ConfigError(f"`--flux_lora_target {target}` adapts ControlNet layers, and ControlNet training is not "
                          "available; use mmdit, context, context+ffs, all, all+ffs, all+ffs+embedder, ai-toolkit, "
                          "tiny or nano")


def _check_validation_cfg(config) -> None:
    real = config.validation_guidance_real
    if real is not None and real < 1.0:
        raise ConfigError(f"`--validation_guidance_real` = {real} must be at least 1.0 (1.0 or unset: no real CFG)")
    steps = config.validation_no_cfg_until_timestep
    if steps is None:
        return
    if steps < 0:
        raise ConfigError(f"`--validation_no_cfg_until_timestep` = {steps} must not be negative")
    if not _real_cfg(config):
        raise ConfigError("`--validation_no_cfg_until_timestep` delays real CFG, which is off; set "
                          "`--validation_guidance_real` above 1.0 or remove it")


def flux_warnings(config) -> list[str]:
    """Legal Flux settings that probably do not do what the user wants."""
    if config.model_family != "flux":
        return []
    warnings = []
    if config.model_flavour == "schnell" and not config.flux_fast_schedule:
        warnings.append("FLUX.1 [schnell] samples in a few large steps; `--flux_fast_schedule true` trains on those "
                        "noise levels and usually keeps it a few-step model")
    if config.model_flavour == "schnell" and any(getattr(config, name) is not None for name in (
            "flux_guidance_mode", "flux_guidance_value", "flux_guidance_min", "flux_guidance_max")):
        warnings.append("FLUX.1 [schnell] has no guidance embedding: the `--flux_guidance_*` options have no effect")
    if "validation_negative_prompt" in config.explicit and config.validation_negative_prompt and not _real_cfg(config):
        warnings.append("flux validation only uses `--validation_negative_prompt` with real CFG "
                        "(`--validation_guidance_real` above 1.0); without it the negative prompt is ignored")
    steps = config.validation_no_cfg_until_timestep
    if steps is not None and _real_cfg(config) and steps >= config.validation_num_inference_steps:
        warnings.append(f"`--validation_no_cfg_until_timestep` = {steps} is not below `--validation_num_inference_steps`"
                        f" = {config.validation_num_inference_steps}: real CFG never turns on")
    return warnings
