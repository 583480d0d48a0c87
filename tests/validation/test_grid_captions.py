"""Validation grids say what they show: "base model" for the untrained model's images, "step N" for
the trained ones, and both over the halves of the before/after pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from simpletuner.validation.runner import CAPTION_KEY, ValidationSettings, Validator, panel_caption

RED, BLUE = (200, 30, 30), (30, 30, 200)


class RecordingTracker:
    def __init__(self) -> None:
        self.images: list[tuple[str, object, int]] = []

    def log_image(self, tag: str, image, step: int) -> None:
        self.images.append((tag, image, step))


def validator(tmp_path: Path, benchmark: dict | None = None) -> Validator:
    settings = ValidationSettings(prompts=["a", "b"], negative_prompt=None, num_images=1, num_inference_steps=1,
                                  guidance=1.0, seed=0, resolutions=[(64, 64)])
    return Validator(settings=settings, output_dir=tmp_path, tracker=RecordingTracker(), interval=None,
                     benchmark_enabled=True, device="cpu", benchmark=benchmark or {})


@pytest.mark.parametrize("step, label, expected", [
    (0, "step_0_base_model", "base model"),
    (0, None, "base model"),
    (20, None, "step 20"),
    (20, "step_20_ema", "step 20 (EMA weights)"),
    (7, "step_7_startup", "step 7 (startup)"),
])
def test_panel_caption(step: int, label: str | None, expected: str) -> None:
    assert panel_caption(step, label) == expected


def write_grid(tmp_path: Path, step: int, label: str, benchmark: dict | None = None):
    v = validator(tmp_path, benchmark)
    folder = tmp_path / label
    folder.mkdir()
    images = [Image.new("RGB", (64, 64), BLUE) for _ in range(2)]
    v._write(folder, (64, 64), ["00", "01"], images, step, panel_caption(step, label))
    return Image.open(folder / "grid_64x64.png"), v.tracker.images[0][1]


def band_has_text(grid, top: int, left: int, right: int) -> bool:
    """Dark pixels (the caption) in the white band above the tiles, between ``left`` and ``right``."""
    band = grid.convert("L").crop((left, 0, right, top))
    return min(band.getdata()) < 128


def test_base_model_grid_is_captioned(tmp_path: Path) -> None:
    grid, logged = write_grid(tmp_path, 0, "step_0_base_model")
    assert grid.text[CAPTION_KEY] == "base model"
    top = grid.height - 64  # one row of 64-px tiles under the caption band
    assert top > 0 and grid.width == 128 and logged.size == grid.size
    assert band_has_text(grid, top, 0, 64) and band_has_text(grid, top, 64, 128)
    assert grid.getpixel((32, top + 32)) == BLUE  # the images themselves are untouched


def test_comparison_grid_names_both_halves(tmp_path: Path) -> None:
    benchmark = {(64, 64): [Image.new("RGB", (64, 64), RED) for _ in range(2)]}
    grid, _ = write_grid(tmp_path, 20, "step_20", benchmark)
    assert grid.text[CAPTION_KEY] == "base model | step 20"
    top = grid.height - 64
    assert grid.width == 2 * 128
    assert grid.getpixel((32, top + 32)) == RED and grid.getpixel((96, top + 32)) == BLUE  # before | after
    for left in range(0, 256, 64):  # a caption over each half of each pair
        assert band_has_text(grid, top, left, left + 64)
