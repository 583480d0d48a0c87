"""Shared fixtures for the model-family tests: a tiny model folder per family, a small captioned
dataset, and a helper that builds CLI arguments for short runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simpletuner.testing.projects import make_family_project  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def family_args(root: Path, family: str, output: str, **overrides) -> list[str]:
    """CLI arguments for a short, quiet run of ``family`` on the project at ``root``."""
    values = {
        "model_family": family, "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
        "output_dir": str(root / output), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
        "aspect_bucket_alignment": 8, "mixed_precision": "no", "train_batch_size": 2, "max_train_steps": 3,
        "seed": 7, "learning_rate": 1e-3, "report_to": "none", "disable_benchmark": "true",
        "optimizer": "optimi-adamw",
    }
    values.update(overrides)
    return [token for key, value in values.items() if value is not None for token in (f"--{key}", str(value))]


def loaded_family(family: str, defaults: dict, **options):
    """The ``family`` model of a config of ``defaults`` with ``options`` over them, loaded on the CPU
    in fp32: what a test of the family's own methods needs, without a trainer around it."""
    import torch

    from simpletuner.models.registry import load_family_class
    from simpletuner.testing.config import make_config

    config = make_config(**{"model_family": family, **defaults, **options})
    model = load_family_class(family)(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


def keep_trainer(monkeypatch) -> dict:
    """Runs through the CLI create their own trainer; this keeps it as ``seen["trainer"]`` once set up."""
    from simpletuner.training.trainer import Trainer

    seen = {}
    original_setup = Trainer.setup

    def setup_and_keep(self):
        original_setup(self)
        seen["trainer"] = self

    monkeypatch.setattr(Trainer, "setup", setup_and_keep)
    return seen
