"""Validation rules for ``--scheduled_sampling_*`` (rollout) and its ReflexFlow options. Torch-free, like
every rule, so a mistake surfaces before a model loads."""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError

#: The rollout solvers simpletuner implements (methods/scheduled_sampling.py); the table lists the rest
#: of the vocabulary users know from other trainers.
SUPPORTED_ROLLOUT_SAMPLERS = ("euler",)
REFLEXFLOW_TUNING = ("scheduled_sampling_reflexflow_alpha", "scheduled_sampling_reflexflow_beta1",
                     "scheduled_sampling_reflexflow_beta2")
ROLLOUT_OPTIONS = ("scheduled_sampling_strategy", "scheduled_sampling_probability", "scheduled_sampling_prob_start",
                   "scheduled_sampling_prob_end", "scheduled_sampling_ramp_steps", "scheduled_sampling_start_step",
                   "scheduled_sampling_ramp_shape", "scheduled_sampling_sampler", "scheduled_sampling_reflexflow",
                   *REFLEXFLOW_TUNING)
RAMP_OPTIONS = ("scheduled_sampling_prob_start", "scheduled_sampling_prob_end", "scheduled_sampling_start_step",
                "scheduled_sampling_ramp_shape")


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def _trains_flow(config) -> bool:
    prediction_type = config.prediction_type or family_info(config.model_family).prediction_types[0]
    return prediction_type == "flow_matching"


def check_scheduled_sampling(config) -> None:
    """Rollout options only with a rollout length, a sampler we implement, one probability source."""
    if not config.scheduled_sampling_max_step_offset:
        changed = [name for name in ROLLOUT_OPTIONS if _set(config, name)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies to scheduled sampling, which is off; set "
                              "`--scheduled_sampling_max_step_offset` to a positive number of steps or remove it")
        return
    sampler = config.scheduled_sampling_sampler
    if sampler not in SUPPORTED_ROLLOUT_SAMPLERS:
        raise ConfigError(f"`--scheduled_sampling_sampler {sampler}` is not supported yet: rollouts are solved with "
                          f"{', '.join(SUPPORTED_ROLLOUT_SAMPLERS)} only; add `--scheduled_sampling_sampler euler`")
    if config.scheduled_sampling_ramp_steps:
        if _set(config, "scheduled_sampling_probability"):
            raise ConfigError("`--scheduled_sampling_probability` and `--scheduled_sampling_ramp_steps` conflict: with "
                              "a ramp the probability moves from `--scheduled_sampling_prob_start` to "
                              "`--scheduled_sampling_prob_end`; remove one of them")
    else:
        changed = [name for name in RAMP_OPTIONS if _set(config, name)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` shapes the probability ramp, which is off; set "
                              "`--scheduled_sampling_ramp_steps` > 0 or remove it")
    if config.diff2flow_loss:
        raise ConfigError("`--scheduled_sampling_max_step_offset` and `--diff2flow_loss` cannot be combined yet (the "
                          "flow target of a rolled-out input is not defined); remove one of them")


def check_reflexflow(config) -> None:
    """ReflexFlow is a flow-matching objective: refuse it (and its knobs) for DDPM-style models."""
    if _trains_flow(config):
        if config.scheduled_sampling_reflexflow is False:
            changed = [name for name in REFLEXFLOW_TUNING if _set(config, name)]
            if changed:
                raise ConfigError(f"`--{changed[0]}` tunes ReflexFlow, which `--scheduled_sampling_reflexflow false` "
                                  "turns off; remove one of them")
        return
    info = family_info(config.model_family)
    changed = [name for name in ("scheduled_sampling_reflexflow", *REFLEXFLOW_TUNING)
               if _set(config, name) and getattr(config, name) is not False]
    if changed:
        raise ConfigError(f"`--{changed[0]}` only applies to flow-matching models; {info.name} trains "
                          f"{config.prediction_type or info.prediction_types[0]}, so remove it")


SCHEDULED_SAMPLING_RULES: tuple[Callable, ...] = (check_scheduled_sampling, check_reflexflow)
