"""Fixtures for the memory tests: tiny models of four families (and wider/deeper variants), a shapes
dataset at two sizes, a config builder, and one torch thread (on a shared 2-core machine a second
thread spin-waits)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Wider/deeper versions of the tiny denoisers (same classes, other sizes), for the planner.
VARIANTS = {
    "flux": ("transformer", dict(num_attention_heads=4, num_layers=3, num_single_layers=5)),
    "sd3": ("transformer", dict(num_attention_heads=8, num_layers=4, caption_projection_dim=64)),
    "pixart_sigma": ("transformer", dict(num_attention_heads=4, num_layers=5, cross_attention_dim=64)),
    "sd1x": ("unet", dict(block_out_channels=[32, 64, 64], layers_per_block=2,
                          down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py)."""


class TinyModels:
    """Tiny model folders built on first use, shared by the whole session."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, family: str) -> Path:
        folder = self.root / family
        if not folder.exists():
            from simpletuner.testing.tiny_models import make_tiny_model

            base, plus, _ = family.partition("+")
            if plus:
                make_variant(self.path(base), folder, *VARIANTS[base])
            else:
                make_tiny_model(family, folder, seed=0)
        return folder


def make_variant(source: Path, target: Path, component: str, changes: dict) -> None:
    """A copy of ``source`` whose ``component`` is rebuilt from its config with ``changes`` (seeded weights)."""
    import diffusers
    import torch

    shutil.copytree(source, target)
    config = json.loads((source / component / "config.json").read_text())
    model_class = getattr(diffusers, config["_class_name"])
    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    torch.manual_seed(1)
    model = model_class(**{**settings, **changes})
    shutil.rmtree(target / component)
    model.save_pretrained(target / component)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("memory-models"))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """``shapes(size)``: a folder of 8 coloured-shape images of ``size`` px with captions."""
    root = tmp_path_factory.mktemp("memory-data")

    def folder(size: int) -> Path:
        target = root / f"shapes{size}"
        if not target.exists():
            from simpletuner.testing.shapes import make_demo_dataset

            make_demo_dataset(target, 8, size=size, seed=3)
        return target

    return folder


@pytest.fixture
def memory_config(tiny, shapes, tmp_path):
    """``memory_config(family, **flags)``: a validated LoRA config for a tiny model (64 px, batch 2,
    3 steps); ``model`` picks a variant (``"flux+"``), ``image_size`` the dataset's image size,
    ``cache_tag`` a cache of its own (so the run encodes latents and captions itself)."""
    from simpletuner.options.resolve import resolve_run

    def build(family: str, model: str | None = None, image_size: int = 64, cache_tag: str = "", **overrides):
        resolution = int(overrides.get("resolution", 64))
        cache = tmp_path / f"cache-{model or family}-{resolution}{cache_tag}"
        dataset_list = tmp_path / f"datasets-{model or family}-{resolution}{cache_tag}.json"
        dataset_list.write_text(json.dumps([
            {"id": "shapes", "type": "local", "instance_data_dir": str(shapes(image_size)),
             "caption_strategy": "textfile", "resolution": resolution, "resolution_type": "pixel"},
            {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(cache / "text"), "default": True},
        ]))
        values = {
            "model_family": family, "pretrained_model_name_or_path": str(tiny.path(model or family)),
            "model_type": "lora", "output_dir": str(tmp_path / f"out-{model or family}"),
            "data_backend_config": str(dataset_list), "cache_dir": str(cache), "resolution": resolution,
            "resolution_type": "pixel", "aspect_bucket_alignment": 8, "mixed_precision": "no",
            "train_batch_size": 2, "max_train_steps": 3, "seed": 7, "learning_rate": 1e-3, "report_to": "none",
            "disable_benchmark": "true", "optimizer": "optimi-adamw", "lora_rank": 4, "validation_disable": "true",
        }
        values.update(overrides)
        values = {key: value for key, value in values.items() if value is not None}
        argv = [token for key, value in values.items()
                for token in (f"--{key}", value if isinstance(value, str) else json.dumps(value))]
        return resolve_run(argv).config

    return build
