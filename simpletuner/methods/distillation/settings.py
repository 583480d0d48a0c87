"""``--distillation_config``: the settings of the distillation methods, read and checked in one place.

Torch-free (the config rules call :func:`distillation_settings` before a model loads). Keys may be
given flat or, for f-distill's, under ``"f_distill": {...}`` as spec 003 writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simpletuner.options import ConfigError

#: Methods of the distillation family (``--training_method``), and what ``--distillation_method`` maps to.
DISTILLATION_METHODS = ("dmd2", "f_distill", "ladd", "lcm", "causvid", "self_forcing")
#: The causal video methods among them (a chunk-by-chunk student; causal_distillation.py).
CAUSAL_DISTILLATION_METHODS = ("causvid", "self_forcing")
DISTILLATION_METHOD_ALIASES = {"dmd": "dmd2", "lcm": "lcm"}
#: spec 002's names the spec documents do not define enough to build.
UNDEFINED_DISTILLATION_METHODS = ("dcm", "perflow")
#: The f-divergences f-distill weights by (simpletuner/objectives/distillation.py).
F_DIVERGENCES = ("js", "kl", "rkl", "sh", "neyman", "jf", "sf")
SAMPLE_T_KINDS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class DistillationSettings:
    student_sample_steps: int = 1  # per chunk for causvid / self_forcing, which usually use 4
    student_timesteps: tuple[int, ...] | None = None
    student_update_freq: int = 5
    guidance_scale: float | None = None  # None: the run's --validation_guidance
    gan_loss_weight_gen: float = 0.0
    gan_loss_weight_disc: float = 1.0
    gan_r1_reg_weight: float = 0.0
    gan_r1_reg_alpha: float = 0.1
    fake_score_rank: int | None = None  # None: --lora_rank
    fake_score_lr: float | None = None  # None: --learning_rate
    fake_score_warmup_steps: int = 0
    sample_t_cfg: dict = field(default_factory=lambda: {"kind": "uniform", "min": 0.02, "max": 0.98})
    f_div: str = "rkl"
    ratio_lower: float | None = None
    ratio_upper: float | None = None
    # LCM
    lcm_skip_steps: int = 20
    lcm_huber_c: float = 0.001
    # Self-Forcing: where the gradient enters each chunk's rollout
    enable_gradient_in_rollout: bool = True
    same_step_across_blocks: bool = False


KNOWN_KEYS = {name for name in DistillationSettings.__dataclass_fields__}


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"--distillation_config `{key}` must be a whole number >= {minimum}, got {value!r}")
    return value


def _float(key: str, value: Any, minimum: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (positive and value <= 0):
        bound = f"> {minimum}" if positive else f">= {minimum}"
        raise ConfigError(f"--distillation_config `{key}` must be a number {bound}, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"--distillation_config `{key}` must be true or false, got {value!r}")
    return value


def _sample_t(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"--distillation_config `sample_t_cfg` must be an object like "
                          f'{{"kind": "uniform", "min": 0.02, "max": 0.98}}, got {value!r}')
    unknown = sorted(set(value) - {"kind", "min", "max", "mean", "std"})
    if unknown:
        raise ConfigError(f"--distillation_config `sample_t_cfg` has unknown keys {unknown}; "
                          "known: kind, min, max, mean, std")
    kind = value.get("kind", "uniform")
    if kind not in SAMPLE_T_KINDS:
        raise ConfigError(f"--distillation_config `sample_t_cfg.kind` {kind!r} is not one of {', '.join(SAMPLE_T_KINDS)}")
    low, high = _float("sample_t_cfg.min", value.get("min", 0.02), 0.0), _float("sample_t_cfg.max", value.get("max", 0.98), 0.0)
    if not low < high <= 1.0:
        raise ConfigError(f"--distillation_config `sample_t_cfg` needs 0 <= min < max <= 1, got min {low}, max {high}")
    std = _float("sample_t_cfg.std", value.get("std", 1.0), 0.0, positive=True)
    mean = value.get("mean", 0.0)
    if isinstance(mean, bool) or not isinstance(mean, (int, float)):
        raise ConfigError(f"--distillation_config `sample_t_cfg.mean` must be a number, got {mean!r}")
    return {"kind": kind, "min": low, "max": high, "mean": float(mean), "std": std}


def parse_distillation_config(raw: dict | None) -> DistillationSettings:
    """The checked settings of a ``--distillation_config`` object (defaults for what it leaves out)."""
    raw = dict(raw or {})
    nested = raw.pop("f_distill", None)
    if nested is not None:
        if not isinstance(nested, dict):
            raise ConfigError(f"--distillation_config `f_distill` must be an object, got {nested!r}")
        raw.update(nested)
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"--distillation_config has unknown keys {unknown}; known: {', '.join(sorted(KNOWN_KEYS))}")
    values: dict[str, Any] = {}
    for key in ("student_sample_steps", "student_update_freq"):
        if key in raw:
            values[key] = _int(key, raw[key], 1)
    for key in ("fake_score_warmup_steps",):
        if key in raw:
            values[key] = _int(key, raw[key], 0)
    if "lcm_skip_steps" in raw:
        values["lcm_skip_steps"] = _int("lcm_skip_steps", raw["lcm_skip_steps"], 1)
    if raw.get("fake_score_rank") is not None:
        values["fake_score_rank"] = _int("fake_score_rank", raw["fake_score_rank"], 1)
    for key in ("gan_loss_weight_gen", "gan_loss_weight_disc", "gan_r1_reg_weight"):
        if key in raw:
            values[key] = _float(key, raw[key], 0.0)
    if raw.get("guidance_scale") is not None:
        values["guidance_scale"] = _float("guidance_scale", raw["guidance_scale"], 1.0)
    for key in ("fake_score_lr", "lcm_huber_c", "gan_r1_reg_alpha"):
        if raw.get(key) is not None:
            values[key] = _float(key, raw[key], 0.0, positive=True)
    for key in ("enable_gradient_in_rollout", "same_step_across_blocks"):
        if key in raw:
            values[key] = _bool(key, raw[key])
    if "sample_t_cfg" in raw:
        values["sample_t_cfg"] = _sample_t(raw["sample_t_cfg"])
    if "f_div" in raw:
        if raw["f_div"] not in F_DIVERGENCES:
            raise ConfigError(f"--distillation_config `f_div` {raw['f_div']!r} is not one of {', '.join(F_DIVERGENCES)}")
        values["f_div"] = raw["f_div"]
    for key in ("ratio_lower", "ratio_upper"):
        if raw.get(key) is not None:
            values[key] = _float(key, raw[key], 0.0, positive=True)
    if "ratio_lower" in values and "ratio_upper" in values and values["ratio_lower"] >= values["ratio_upper"]:
        raise ConfigError(f"--distillation_config needs ratio_lower < ratio_upper, got {values['ratio_lower']} and "
                          f"{values['ratio_upper']}")
    if raw.get("student_timesteps") is not None:
        steps = raw["student_timesteps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(t, int) and not isinstance(t, bool) for t in steps):
            raise ConfigError(f"--distillation_config `student_timesteps` must be a list of whole numbers, got {steps!r}")
        values["student_timesteps"] = tuple(steps)
        count = values.get("student_sample_steps", 1)
        if len(steps) != count:
            raise ConfigError(f"--distillation_config `student_timesteps` lists {len(steps)} timesteps but "
                              f"student_sample_steps is {count}; list one per step")
    return DistillationSettings(**values)


def distillation_settings(config) -> DistillationSettings:
    from simpletuner.options.values import read_json_option

    raw = read_json_option("distillation_config", config.distillation_config) if config.distillation_config else {}
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"--distillation_config must be a JSON object, got {type(raw).__name__}")
    return parse_distillation_config(raw)


#: The ``--distillation_config`` keys LCM reads; every other key belongs to the score-distillation
#: methods (LCM's student is sampled by LCMScheduler at any step count, trains every step, has no critic).
LCM_KEYS = ("guidance_scale", "lcm_skip_steps", "lcm_huber_c")


def score_distillation_only_keys() -> list[str]:
    """The settings LCM would silently ignore, in the order the settings list them."""
    return [key for key in DistillationSettings.__dataclass_fields__ if key not in LCM_KEYS] + ["f_distill"]


def lcm_refusal(config) -> str | None:
    """Why an LCM run's ``--distillation_config`` cannot be honoured (None when it can, or when the run is
    not LCM). A key of another method would be silently ignored, so it is refused instead, by name."""
    from simpletuner.options.values import read_json_option

    method = DISTILLATION_METHOD_ALIASES.get(config.distillation_method) if config.distillation_method \
        else config.training_method
    if method != "lcm" or not config.distillation_config:
        return None
    raw = read_json_option("distillation_config", config.distillation_config)
    if not isinstance(raw, dict):
        return None  # distillation_settings refuses a non-object with its own message
    foreign = [key for key in score_distillation_only_keys() if key in raw]
    if foreign:
        return (f"--distillation_config sets {', '.join(foreign)}, which only the score-distillation methods "
                "(dmd2, f_distill, ladd, causvid, self_forcing) read; LCM reads guidance_scale, lcm_skip_steps and "
                f"lcm_huber_c. Remove {'them' if len(foreign) > 1 else 'it'}, or choose a score-distillation "
                "--training_method")
    return None
