"""A ready-to-train project folder for tests and benchmarks: a tiny model, captioned shapes, a dataset list.

Many tests train a family for a few steps; they all need the same three things on disk, made the same
way, so their caches can be shared and their numbers compared.
"""

from __future__ import annotations

import json
from pathlib import Path


def make_family_project(root: Path, family: str, images: int = 8, size: int = 64, seed: int = 0) -> Path:
    """``root`` with ``model/`` (the tiny ``family`` model), ``data/`` (demo shapes with captions) and
    ``multidatabackend.json`` (the images plus a text-embed cache under ``cache/text``); returns ``root``."""
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
