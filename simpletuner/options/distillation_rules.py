"""Rules for the distillation methods (``--training_method dmd2 / f_distill / ladd / lcm / causvid /
self_forcing``, spec 002's ``--distillation_method``) and ``--distillation_config``. Torch-free, checked
before a model loads.

A distillation run switches adapters on one base model (teacher, student, fake score) and steps a critic
optimizer of its own inside the method (simpletuner/methods/distillation/). What cannot share that
arrangement yet is refused here with the reason, rather than run wrongly.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.methods.distillation.settings import (CAUSAL_DISTILLATION_METHODS, DISTILLATION_METHOD_ALIASES,
                                                       DISTILLATION_METHODS, UNDEFINED_DISTILLATION_METHODS,
                                                       distillation_settings)
from simpletuner.options import ConfigError

#: Options whose feature hooks into the one denoiser forward a method runs per batch; a distillation
#: step runs the student, the teacher and the fake score, so their captures would mix the three.
FORWARD_FEATURES = ("crepa_enabled", "urepa_enabled", "layersync_enabled", "tread_config",
                    "scheduled_sampling_max_step_offset")
#: f-distill's own settings, and LADD's.
F_DISTILL_KEYS = ("f_div", "ratio_lower", "ratio_upper")
LADD_KEYS = ("gan_r1_reg_weight", "gan_r1_reg_alpha")
#: Self-Forcing's own settings.
SELF_FORCING_KEYS = ("enable_gradient_in_rollout", "same_step_across_blocks")
#: The families and checkpoints the chunk cache (simpletuner/models/wan_causal.py) drives: one Wan transformer,
#: text-to-video (a two-expert or image-to-video checkpoint conditions or routes on the whole clip).
CAUSAL_DISTILLATION_FAMILIES = ("wan",)
CAUSAL_DISTILLATION_FLAVOURS = ("t2v-1.3b-2.1", "t2v-14b-2.1")


def _on(config, name: str) -> bool:
    return getattr(config, name) not in (None, False, 0, "", "none")


def distillation_method(config) -> str | None:
    """The distillation method this config runs, or None."""
    if config.distillation_method:
        return DISTILLATION_METHOD_ALIASES.get(config.distillation_method)
    return config.training_method if config.training_method in DISTILLATION_METHODS else None


def check_method_names(config) -> None:
    chosen = config.distillation_method
    if chosen in UNDEFINED_DISTILLATION_METHODS:
        raise ConfigError(f"`--distillation_method {chosen}` is not built: neither spec 002 nor the distillation "
                          "documents define it beyond its name. Use `--distillation_method dmd` (DMD2) or `lcm`, or "
                          "`--training_method f_distill` / `ladd`")
    if chosen and "training_method" in config.explicit and config.training_method not in ("sft", DISTILLATION_METHOD_ALIASES[chosen]):
        raise ConfigError(f"`--distillation_method {chosen}` runs `--training_method {DISTILLATION_METHOD_ALIASES[chosen]}`, "
                          f"but `--training_method {config.training_method}` is set too; keep one of them")
    if config.distillation_config and distillation_method(config) is None:
        raise ConfigError("`--distillation_config` is only read by the distillation methods (dmd2, f_distill, ladd, "
                          f"lcm, causvid, self_forcing), but the method is {config.training_method}; set "
                          "`--training_method` or remove it")


def check_distillation_combinations(config) -> None:
    method = distillation_method(config)
    if method is None:
        return
    from simpletuner.options.validation_rules import VIDEO_FAMILIES

    what = f"`--training_method {method}`"
    if method in CAUSAL_DISTILLATION_METHODS:
        check_causal_distillation_family(config, what, config.model_family in VIDEO_FAMILIES)
    elif config.model_family in VIDEO_FAMILIES:
        extra = (" or `--training_method causvid` / `self_forcing` for a causal student"
                 if config.model_family in CAUSAL_DISTILLATION_FAMILIES else "")
        raise ConfigError(f"{what} distils image families; {config.model_family} is a video family, whose "
                          f"distillation is {' / '.join(CAUSAL_DISTILLATION_METHODS)} (Wan text-to-video only){extra}")
    if config.model_family == "deepfloyd":
        raise ConfigError(f"{what} is not built for DeepFloyd IF, whose stages predict a learned variance beside the "
                          "noise; distil another family")
    if (config.num_processes or 1) > 1:
        raise ConfigError(f"{what} trains on one process for now (its critic optimizer is not synchronised across "
                          f"processes yet), but `--num_processes {config.num_processes}` is set; set it to 1")
    if config.mixed_precision == "fp16" and method != "lcm":  # LCM has no critic
        raise ConfigError(f"{what} steps its critic without fp16's loss scaler; use `--mixed_precision bf16` or `no`")
    if config.model_type == "lora" and (config.lora_type or "standard") == "lycoris":
        raise ConfigError(f"{what} switches between named PEFT adapters (student, fake score); LyCORIS has no named "
                          "adapters. Use `--lora_type standard` or `--model_type full`")
    for name in ("controlnet", "control", "train_text_encoder", "fsdp_enable", *FORWARD_FEATURES):
        if _on(config, name):
            raise ConfigError(f"{what} cannot be combined with `--{name}` yet: the method runs the student, the teacher "
                              "and the fake score on every batch, which that option does not expect. Remove it")
    if (config.sp_size or 1) > 1:
        raise ConfigError(f"{what} cannot be combined with `--sp_size {config.sp_size}`; remove it")
    if (config.eval_steps_interval or config.eval_epoch_interval) and not config.eval_loss_disable:
        raise ConfigError(f"{what}: the evaluation loss is a denoising loss, which a few-step student is not trained "
                          "to lower; set `--eval_loss_disable true` (the CLIP score still runs) or remove the eval "
                          "interval")


def check_causal_distillation_family(config, what: str, video: bool) -> None:
    """CausVid / Self-Forcing generate video chunk by chunk through the Wan chunk cache."""
    family = config.model_family
    if not video:
        raise ConfigError(f"{what} distils a video model into a causal student that generates clips chunk by chunk; "
                          f"{family} is an image family. Use `--training_method dmd2` (or f_distill, ladd) for it")
    if family not in CAUSAL_DISTILLATION_FAMILIES:
        raise ConfigError(f"{what} needs a key/value cache of context chunks, which is built for Wan's transformer "
                          f"({', '.join(CAUSAL_DISTILLATION_FAMILIES)}) only; {family} cannot run it. Use "
                          "`--model_family wan` or `--training_method causal_sft`")
    flavour = config.model_flavour
    if flavour is not None and flavour not in CAUSAL_DISTILLATION_FLAVOURS:
        raise ConfigError(f"{what} drives one Wan text-to-video transformer chunk by chunk; `--model_flavour "
                          f"{flavour}` is not one (two experts or image-to-video conditioning on the whole clip). Use "
                          f"{' or '.join(CAUSAL_DISTILLATION_FLAVOURS)}")
    if config.refiner_training:
        raise ConfigError(f"{what} trains a single-transformer Wan checkpoint; `--refiner_training` is for the two "
                          "experts of Wan 2.2 A14B. Remove it")


def check_distillation_settings(config) -> None:
    method = distillation_method(config)
    if method is None:
        return
    settings = distillation_settings(config)  # raises on an unknown key or a bad value
    from simpletuner.options.values import read_json_option

    raw = read_json_option("distillation_config", config.distillation_config) if config.distillation_config else {}
    given = set(raw or {}) | set((raw or {}).get("f_distill") or {})
    if method != "f_distill" and given & set(F_DISTILL_KEYS):
        raise ConfigError(f"--distillation_config `{sorted(given & set(F_DISTILL_KEYS))[0]}` is f-distill's; "
                          f"`--training_method {method}` does not read it. Remove it or use f_distill")
    if method != "ladd" and given & set(LADD_KEYS):
        raise ConfigError(f"--distillation_config `{sorted(given & set(LADD_KEYS))[0]}` is LADD's R1 penalty; `--training_method "
                          f"{method}` does not read it. Remove it or use ladd")
    if method != "self_forcing" and given & set(SELF_FORCING_KEYS):
        raise ConfigError(f"--distillation_config `{sorted(given & set(SELF_FORCING_KEYS))[0]}` is Self-Forcing's; "
                          f"`--training_method {method}` does not read it. Remove it or use self_forcing")
    if method == "ladd" and "gan_loss_weight_gen" in given:
        raise ConfigError("--distillation_config `gan_loss_weight_gen` weighs DMD2's adversarial term; LADD's loss is "
                          "adversarial only. Remove it")
    refuse_unread_settings(method, settings, given)
    if settings.student_timesteps and method != "lcm":
        from simpletuner.models.registry import family_info

        if family_info(config.model_family).prediction_types[0] == "flow_matching":
            raise ConfigError("--distillation_config `student_timesteps` is for DDPM families; a flow-matching student "
                              "samples at its scheduler's own sigmas for student_sample_steps. Remove it")
    if method == "lcm":
        from simpletuner.methods.distillation.settings import lcm_refusal

        message = lcm_refusal(config)
        if message:
            raise ConfigError(message)


def refuse_unread_settings(method: str, settings, given: set[str]) -> None:
    """Settings this run's method would accept and then never read: refused by name, not ignored."""
    unread = {}
    if method == "ladd":  # no fake score, and the teacher is never sampled with guidance
        unread.update({"guidance_scale": "LADD never samples the teacher with guidance",
                       "fake_score_rank": "LADD has no fake score"})
        if settings.gan_r1_reg_weight == 0:
            unread["gan_r1_reg_alpha"] = "the R1 penalty is off (`gan_r1_reg_weight` is 0)"
    elif method in ("dmd2", "causvid", "self_forcing") and settings.gan_loss_weight_gen == 0:
        unread["gan_loss_weight_disc"] = "there is no discriminator while `gan_loss_weight_gen` is 0"
    for key in sorted(given & set(unread)):
        raise ConfigError(f"--distillation_config `{key}` is not read by `--training_method {method}`: {unread[key]}. "
                          "Remove it")


DISTILLATION_RULES: tuple[Callable, ...] = (check_method_names, check_distillation_combinations,
                                            check_distillation_settings)


def distillation_warnings(config) -> list[str]:
    """A distilled student samples without classifier-free guidance; an explicit ``--validation_guidance``
    still wins in validation, which is rarely what was meant (it is also the teacher's default guidance)."""
    method = distillation_method(config)
    if method is None or "validation_guidance" not in config.explicit or config.validation_guidance == 1.0:
        return []
    from simpletuner.options.validation_rules import EMBEDDED_GUIDANCE_FAMILIES

    if config.model_family in EMBEDDED_GUIDANCE_FAMILIES:
        return []
    return [f"`--validation_guidance {config.validation_guidance:g}` samples the {method} student with classifier-free "
            "guidance, which it was trained to do without (guidance 1); to set the teacher's guidance use "
            "`guidance_scale` in `--distillation_config` and leave `--validation_guidance` unset"]

