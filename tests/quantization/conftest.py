"""Shared fixtures: a tiny sd1x pipeline folder and a shapes dataset, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd1x(tmp_path_factory) -> Path:
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("quant-model") / "model"
    make_tiny_model("sd1x", folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def project(tmp_path_factory, tiny_sd1x) -> Path:
    from simpletuner.testing.shapes import make_demo_dataset

    root = tmp_path_factory.mktemp("quant-project")
    make_demo_dataset(root / "data", 4, size=64, seed=3)
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(root / "data"), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text"), "default": True},
    ]))
    return root


def run_config(root: Path, model: Path, output: str, **overrides):
    """A resolved (and validated) 3-step LoRA run on the tiny sd1x model."""
    from simpletuner.options.resolve import resolve_run

    values = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(model), "model_type": "lora",
        "output_dir": str(root / output), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
        "aspect_bucket_alignment": 8, "mixed_precision": "no", "train_batch_size": 2, "max_train_steps": 3,
        "seed": 7, "learning_rate": 1e-3, "report_to": "none", "disable_benchmark": "true",
        "optimizer": "optimi-adamw", "lora_rank": 4, "lora_dropout": 0.0,
    }
    values.update(overrides)
    values = {key: value for key, value in values.items() if value is not None}
    argv = [token for key, value in values.items() for token in (f"--{key}", str(value))]
    return resolve_run(argv).config
