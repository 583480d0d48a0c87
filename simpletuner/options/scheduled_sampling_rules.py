"""Validation rules for ``--scheduled_sampling_*`` (rollout) and its ReflexFlow options. Torch-free, like
every rule, so a mistake surfaces before a model loads."""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import family_info
from simpletuner.options import ConfigError

#: What ``--scheduled_sampling_order`` means per solver: the history length of the multistep solvers
#: (UniPC, DPM-Solver++), or the fixed order of the one-step ones. A torch-free copy of the constants in
#: methods/rollout_solvers.py (tests/methods/test_rollout_solvers.py keeps the two equal).
MULTISTEP_SAMPLERS = ("unipc", "dpm")
MAX_MULTISTEP_ORDER = 3
FIXED_ORDERS = {"euler": 1, "rk4": 4}
REFLEXFLOW_TUNING = ("scheduled_sampling_reflexflow_alpha", "scheduled_sampling_reflexflow_beta1",
                     "scheduled_sampling_reflexflow_beta2")
ROLLOUT_OPTIONS = ("scheduled_sampling_strategy", "scheduled_sampling_probability", "scheduled_sampling_prob_start",
                   "scheduled_sampling_prob_end", "scheduled_sampling_ramp_steps", "scheduled_sampling_start_step",
                   "scheduled_sampling_ramp_shape", "scheduled_sampling_sampler", "scheduled_sampling_order",
                   "scheduled_sampling_reflexflow",
                   *REFLEXFLOW_TUNING)
RAMP_OPTIONS = ("scheduled_sampling_prob_start", "scheduled_sampling_prob_end", "scheduled_sampling_start_step",
                "scheduled_sampling_ramp_shape")


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def _trains_flow(config) -> bool:
    prediction_type = config.prediction_type or family_info(config.model_family).prediction_types[0]
    return prediction_type == "flow_matching"


def check_rollout_order(config) -> None:
    """The order fits the solver: 1 to 3 for the multistep ones; for Euler and RK4, whose order is
    fixed, an explicit value is refused unless it states that order (the table default is left alone,
    since it is there for the default solver, UniPC)."""
    sampler, order = config.scheduled_sampling_sampler, config.scheduled_sampling_order
    if sampler in MULTISTEP_SAMPLERS:
        if order > MAX_MULTISTEP_ORDER:
            raise ConfigError(f"`--scheduled_sampling_order {order}` is too high for `--scheduled_sampling_sampler "
                              f"{sampler}`: its multistep history supports orders 1 to {MAX_MULTISTEP_ORDER}; set "
                              f"`--scheduled_sampling_order` to 1, 2 or {MAX_MULTISTEP_ORDER}")
        return
    fixed = FIXED_ORDERS[sampler]
    if _set(config, "scheduled_sampling_order") and order != fixed:
        raise ConfigError(f"`--scheduled_sampling_order {order}` does not apply to `--scheduled_sampling_sampler "
                          f"{sampler}`, a one-step solver of fixed order {fixed}; remove `--scheduled_sampling_order`, "
                          "or pick `--scheduled_sampling_sampler unipc` or `dpm`, whose multistep order it sets")


def check_scheduled_sampling(config) -> None:
    """Rollout options only with a rollout length, an order that fits the solver, one probability source."""
    if not config.scheduled_sampling_max_step_offset:
        changed = [name for name in ROLLOUT_OPTIONS if _set(config, name)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` only applies to scheduled sampling, which is off; set "
                              "`--scheduled_sampling_max_step_offset` to a positive number of steps or remove it")
        return
    check_rollout_order(config)
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
