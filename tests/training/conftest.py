"""Shared by the training tests: a clean accelerate state per in-process run, and a tiny sd1x
project (model, 8 shape images with captions, dataset list) with a config builder for short runs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny sd1x model and 8 images at 64 px: at batch 2, 4 steps per epoch."""
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("training-project"), "sd1x")


def run_args(root: Path, output: str, **overrides) -> list[str]:
    """CLI arguments for a short sd1x LoRA run (batch 2, 3 steps) on the ``project`` at ``root``."""
    values = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
        "output_dir": str(root / output), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
        "aspect_bucket_alignment": 8, "mixed_precision": "no", "train_batch_size": 2, "max_train_steps": 3,
        "seed": 7, "learning_rate": 1e-3, "report_to": "none", "disable_benchmark": "true",
    }
    values.update(overrides)
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def config_for(root: Path, output: str, **overrides):
    """The validated config of :func:`run_args`, with optimi's AdamW unless ``optimizer`` is given."""
    from simpletuner.options.resolve import resolve_run

    return resolve_run(run_args(root, output, **{"optimizer": "optimi-adamw", **overrides})).config


class Interrupted(Exception):
    """Raised by :func:`crash_after_step`: a run killed right after a step (and its checkpoint)."""


@contextlib.contextmanager
def crash_after_step(step: int):
    """Inside the block, training raises :class:`Interrupted` once optimizer step ``step`` is done
    (after its checkpoint and validation), as if the process had been killed there."""
    from simpletuner.training.trainer import Trainer

    original = Trainer._after_step

    def after_step(self, *args):
        original(self, *args)
        if self.state.global_step == step:
            raise Interrupted()

    Trainer._after_step = after_step
    try:
        yield
    finally:
        Trainer._after_step = original
