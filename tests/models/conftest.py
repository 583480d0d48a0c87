"""Shared fixtures for the model-family tests: a tiny model folder per family, a small captioned
dataset, and a helper that builds CLI arguments for short runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; each in-process run must start from a clean one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def make_family_project(root: Path, family: str, images: int = 8, size: int = 64, seed: int = 0) -> Path:
    """``root`` with ``model/`` (the tiny ``family`` model), ``data/`` (demo shapes with captions) and
    ``multidatabackend.json`` (the images plus a text-embed cache)."""
    from simpletuner.testing.shapes import make_demo_dataset
    from simpletuner.testing.tiny_models import make_tiny_model

    make_tiny_model(family, root / "model", seed=seed)
    make_demo_dataset(root / "data", images, size=size, seed=3)
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(root / "data"), "caption_strategy": "textfile",
         "resolution": size, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text"), "default": True},
    ]))
    return root


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
