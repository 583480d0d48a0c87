"""Shared by the option-rule tests: a minimal valid command line and helpers to resolve it."""

from __future__ import annotations

from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from tests.conftest import write_minimal_dataset_list


@pytest.fixture
def argv(tmp_path: Path) -> list[str]:
    """The smallest command line that validates: an sd1x run on an empty image folder."""
    dataset_list = write_minimal_dataset_list(tmp_path)
    return ["--model_family", "sd1x", "--output_dir", str(tmp_path / "out"), "--data_backend_config", str(dataset_list)]


def resolve(tmp_path: Path, argv: list[str]):
    return resolve_run(argv, environ={}, root=tmp_path)


def error_of(tmp_path: Path, argv: list[str]) -> str:
    """The ConfigError message ``argv`` is refused with."""
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, argv)
    return str(error.value)
