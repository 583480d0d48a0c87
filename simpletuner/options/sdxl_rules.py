"""Config rules for SDXL and Kolors, checked before anything loads (torch-free, like every rule).

That the refiner, aesthetic-score and attention-slice options are only set for the families that list
them in the registry is checked generically; the rules here check that they agree with each other.
"""

from __future__ import annotations

from simpletuner.options import ConfigError
from simpletuner.options.refiner_rules import check_refiner_split

#: The scale aesthetic predictors (LAION's, the SDXL refiner's conditioning) score images on.
AESTHETIC_RANGE = (0.0, 10.0)


def check_sdxl(config) -> None:
    if config.model_family not in ("sdxl", "kolors"):
        return
    check_refiner_split(config, "the share of the schedule the refiner stage takes, e.g. 0.2 for timesteps 0-199 "
                                "of 1000", inverted_part="the base stage")
    if config.refiner_training and config.sdxl_refiner_uses_full_range:
        raise ConfigError("`--refiner_training` trains one slice of the schedule and `--sdxl_refiner_uses_full_range` "
                          "all of it; remove one of them")
    score = config.data_aesthetic_score
    if score is not None and not AESTHETIC_RANGE[0] <= score <= AESTHETIC_RANGE[1]:
        raise ConfigError(f"`--data_aesthetic_score` = {score} must be between {AESTHETIC_RANGE[0]:g} and "
                          f"{AESTHETIC_RANGE[1]:g} (the aesthetic-score scale the SDXL refiner was trained on)")


def sdxl_warnings(config) -> list[str]:
    """Refiner-only options on a run that names the SDXL base flavour do nothing; say so."""
    if config.model_family != "sdxl" or config.pretrained_model_name_or_path:
        return []
    if (config.model_flavour or "base-1.0") == "refiner-1.0":
        return []
    named = [name for name in ("sdxl_refiner_uses_full_range", "data_aesthetic_score")
             if getattr(config, name) not in (None, False)]
    return [f"`--{name}` only affects the SDXL refiner; `--model_flavour {config.model_flavour or 'base-1.0'}` "
            "ignores it" for name in named]
