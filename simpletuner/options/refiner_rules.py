"""The ``--refiner_training*`` rules every family with two stages shares (torch-free, like every rule).

SDXL's base + refiner pair and Wan 2.2's two experts both split the noise schedule in two and train
one part: ``--refiner_training`` picks the low-noise part, ``--refiner_training_invert_schedule`` the
other, and ``--refiner_training_strength`` moves the split. Only what the parts are called differs,
so the families pass their words and the checks stay one.
"""

from __future__ import annotations

from simpletuner.options import ConfigError


def check_refiner_split(config, strength_meaning: str, inverted_part: str) -> None:
    """Refuse a split outside (0, 1) and an inverted schedule without ``--refiner_training``.

    Args:
        strength_meaning: what the strength is for this family, ending the range message
            (e.g. "the share of the schedule the refiner stage takes, ...").
        inverted_part: the part ``--refiner_training_invert_schedule`` trains (e.g. "the base stage").
    """
    strength = config.refiner_training_strength
    if strength is not None and not 0 < strength < 1:
        raise ConfigError(f"`--refiner_training_strength` = {strength} must be between 0 and 1 (exclusive): "
                          f"{strength_meaning}")
    if config.refiner_training_invert_schedule and not config.refiner_training:
        raise ConfigError(f"`--refiner_training_invert_schedule` picks {inverted_part} of `--refiner_training`; add "
                          "`--refiner_training` or remove it")
