"""Rules for the video validation options (``--validation_dataset_file``). Torch-free like every rule:
a mistake in the file (a missing caption, a picture that does not exist, a misspelt key) stops the run
before a model loads, instead of at the first validation."""

from __future__ import annotations

from typing import Callable

from simpletuner.options import ConfigError


def check_validation_dataset_file(config) -> None:
    if not config.validation_dataset_file:
        return
    from simpletuner.validation.dataset_file import load_validation_dataset

    try:
        load_validation_dataset(config.validation_dataset_file)
    except ValueError as error:
        raise ConfigError(f"`--validation_dataset_file`: {error}") from None


VIDEO_VALIDATION_RULES: tuple[Callable, ...] = (check_validation_dataset_file,)
