"""Rules for ``--training_method causal_sft`` and its options (``--causal_chunk_frames``,
``--context_noise``). Torch-free like every rule, so a run that cannot work stops before a model loads.

Causal SFT gives every frame chunk its own timestep, so the denoiser must take a timestep per token
(diffusers' Wan and LTX-Video transformers do; the image transformers and UNets take one per sample).
A family says it can by listing the causal options in its ``FamilyInfo.options`` (the catalogue in
simpletuner/models/registry.py); that same entry makes the generic family-option rule refuse
``--causal_chunk_frames`` / ``--context_noise`` for every other family.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.models.registry import FAMILIES, family_info
from simpletuner.options import ConfigError

#: The options of causal SFT; a family whose denoiser takes per-frame timesteps lists them in its options.
CAUSAL_SFT_OPTIONS = ("causal_chunk_frames", "context_noise")
CAUSAL_METHOD = "causal_sft"


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def families_with_frame_timesteps() -> list[str]:
    """The families whose denoiser takes a timestep per latent frame (they list the causal options)."""
    return [entry.name for entry in FAMILIES.values() if CAUSAL_SFT_OPTIONS[0] in entry.options]


def check_causal_options_need_the_method(config) -> None:
    """A causal option under another method would be silently ignored (the causal distillation methods,
    causvid and self_forcing, read them too)."""
    readers = (CAUSAL_METHOD, "causvid", "self_forcing")
    if config.training_method in readers:
        return
    changed = [name for name in CAUSAL_SFT_OPTIONS if _set(config, name)]
    if changed:
        raise ConfigError(f"`--{changed[0]}` only applies to `--training_method {CAUSAL_METHOD}`, but the method is "
                          f"{config.training_method}; set `--training_method {CAUSAL_METHOD}` or remove it (the causal "
                          "distillation methods causvid and self_forcing read it too)")


def check_causal_family(config) -> None:
    """The family's denoiser takes per-frame timesteps, trains flow matching, and no rollout is on."""
    if config.training_method != CAUSAL_METHOD:
        return
    info = family_info(config.model_family)
    if CAUSAL_SFT_OPTIONS[0] not in info.options:
        able = families_with_frame_timesteps()
        instead = (f"use a video family whose transformer takes one ({', '.join(able)})" if able
                   else "no available family takes one yet")
        raise ConfigError(f"`--training_method {CAUSAL_METHOD}` gives every frame chunk its own timestep, but the "
                          f"{info.name} denoiser takes a single timestep per sample; {instead}, or train with "
                          "`--training_method sft`")
    prediction = config.prediction_type or info.prediction_types[0]
    if prediction != "flow_matching":
        raise ConfigError(f"`--training_method {CAUSAL_METHOD}` trains flow-matching models, but `--prediction_type "
                          f"{prediction}` is set; remove `--prediction_type` or use `--training_method sft`")
    if config.scheduled_sampling_max_step_offset:
        raise ConfigError(f"`--training_method {CAUSAL_METHOD}` and `--scheduled_sampling_max_step_offset "
                          f"{config.scheduled_sampling_max_step_offset}` cannot be combined: the rollout draws one "
                          "timestep per sample, not one per chunk; remove one of them")


CAUSAL_RULES: tuple[Callable, ...] = (check_causal_options_need_the_method, check_causal_family)
