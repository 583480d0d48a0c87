"""A stand-in model family and small workspaces for data-path tests that must stay fast.

``FakeModel`` offers exactly what the data path calls (``fingerprint_parts``, ``pixels_per_token``,
``encode_images``, ``encode_prompts``) with deterministic, cheap tensors: its "latents" are the pixels
average-pooled by 8, so a test can tell crops apart from latents, and it counts what it encodes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from simpletuner.data.config import DatasetPlan, parse_dataset_plan


class FakeModel:
    """Deterministic encoders: 8x average pooling for images, (length, byte sum) for prompts."""

    def __init__(self) -> None:
        self.images_encoded = 0
        self.prompts_encoded: list[str] = []

    def fingerprint_parts(self) -> dict[str, str]:
        return {"family": "fake", "model": "fake"}

    def vae_scale_factor(self) -> int:
        return 8

    def pixels_per_token(self) -> int:
        return 8

    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.images_encoded += pixels.shape[0]
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        return {"latent_mean": mean, "latent_std": torch.full_like(mean, 0.1)}

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.prompts_encoded.extend(prompts)
        rows = [[float(len(p)), float(sum(p.encode("utf-8")) % 1009)] for p in prompts]
        return {"prompt_embeds": torch.tensor(rows).unsqueeze(1)}


def make_config(root: Path, **extra):
    """A resolved TrainConfig for data tests (64 px, pixel resolution, batch 2, seed 3)."""
    from simpletuner.options.resolve import merge_sources

    values = {"model_family": "sd1x", "output_dir": str(root / "out"), "resolution": 64,
              "resolution_type": "pixel", "cache_dir": str(root / "cache"), "train_batch_size": 2,
              "seed": 3, "vae_batch_size": 4, **extra}
    return merge_sources({}, values, "test", [])


def write_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), caption: str | None = "a picture",
                 prefix: str = "img") -> list[Path]:
    """``count`` distinct solid images (their colour encodes the index) with ``.txt`` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{prefix}_{index:02d}.png"
        Image.new("RGB", size, (10 * index % 256, 255 - 7 * index % 256, 40)).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(f"{caption} {index}\n", encoding="utf-8")
        paths.append(path)
    return paths


def make_plan(root: Path, *entries: dict, text: dict | None = None) -> DatasetPlan:
    """The dataset entries plus a text_embeds entry caching under ``root/text``."""
    text_entry = {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "text"), **(text or {})}
    return parse_dataset_plan([*entries, text_entry])


def local(name: str, folder: Path, **keys) -> dict:
    """A local image dataset entry."""
    return {"id": name, "type": "local", "instance_data_dir": str(folder), **keys}


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its mtime and bytes, to prove nothing changed."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}
