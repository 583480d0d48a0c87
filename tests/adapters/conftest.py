"""Fixtures for the adapter tests: one tiny sd1x project (model, 8 shape images, dataset list), a
config builder, and one torch thread (two threads on a shared 2-core machine run these tiny models
many times slower)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("adapters"), "sd1x")


def adapter_config(root: Path, output: str = "out", **overrides):
    """A validated sd1x LoRA config (64 px, batch 2, 3 steps); overrides are flag values."""
    from simpletuner.options.resolve import resolve_run

    values = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
        "output_dir": str(root / output), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel", "aspect_bucket_alignment": 8,
        "mixed_precision": "no", "train_batch_size": 2, "max_train_steps": 3, "seed": 7, "learning_rate": 1e-3,
        "report_to": "none", "disable_benchmark": "true", "optimizer": "optimi-adamw", "lora_rank": 4,
    }
    values.update(overrides)
    values = {k: v for k, v in values.items() if v is not None}
    argv = [token for key, value in values.items()
            for token in (f"--{key}", value if isinstance(value, str) else json.dumps(value))]
    return resolve_run(argv).config
