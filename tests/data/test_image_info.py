"""SDXL micro-conditioning numbers: original size, crop corner and target size of every batch image,
from the same resize-and-crop geometry the latent cache decodes with."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner.data.dataset import build_training_data
from simpletuner.data.image_info import image_size_info, size_conditioning_batch
from simpletuner.data.images import crop_at, resize_to_cover
from tests.data.fake_model import FakeModel, local, make_config, make_plan


def test_centre_crop_of_a_wide_image_sits_half_the_slack_from_the_left() -> None:
    info = image_size_info(300, 100, (64, 64), (0.5, 0.5))  # resized to 192x64, a 64x64 window in its middle
    assert info.original_size == (100, 300)
    assert info.target_size == (64, 64)
    assert info.crop_top_left == (0, (192 - 64) // 2)


@pytest.mark.parametrize("size, bucket, anchor", [
    ((300, 100), (64, 64), (0.5, 0.5)), ((100, 300), (64, 64), (0.0, 0.0)), ((257, 131), (96, 64), (0.37, 0.81)),
    ((64, 64), (64, 64), (0.5, 0.5)), ((40, 90), (64, 128), (1.0, 1.0)),
])
def test_numbers_match_where_the_image_decoder_cuts(size, bucket, anchor) -> None:
    """Cut a gradient image with the decoder's own resize and crop, find where the window came from."""
    width, height = size
    ramp = np.add.outer(np.arange(height) * 0, np.arange(width))  # column index in every pixel
    rows = np.add.outer(np.arange(height), np.arange(width) * 0)
    image = Image.fromarray(np.stack([ramp % 256, rows % 256, ramp // 256], -1).astype(np.uint8))
    resized = resize_to_cover(image, bucket, resample=Image.Resampling.NEAREST)
    window = np.asarray(crop_at(resized, bucket, anchor))
    full = np.asarray(resized)
    info = image_size_info(width, height, bucket, anchor)
    top, left = info.crop_top_left
    np.testing.assert_array_equal(window, full[top:top + bucket[1], left:left + bucket[0]])
    assert info.target_size == (bucket[1], bucket[0]) and info.original_size == (height, width)


def test_batches_carry_the_numbers_as_long_tensors(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for index in range(2):
        Image.new("RGB", (192, 64), (20 * index, 90, 200)).save(data / f"wide_{index}.png")
        (data / f"wide_{index}.txt").write_text(f"a wide picture {index}\n", encoding="utf-8")
    plan = make_plan(tmp_path, local("wide", data, crop=True, crop_style="center", crop_aspect="square",
                                     resolution=64, resolution_type="pixel"))
    training = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    batch = training.next_batch()
    for key, row in (("original_size", [64, 192]), ("crop_top_left", [0, 64]), ("target_size", [64, 64])):
        assert batch[key].dtype == torch.long and batch[key].shape == (2, 2)
        assert batch[key].tolist() == [row, row], key
    assert batch["latent_mean"].shape[-2:] == (8, 8)  # 64 px at the fake model's scale of 8


def test_an_uncropped_image_has_a_zero_corner() -> None:
    batch = size_conditioning_batch([image_size_info(64, 64, (64, 64), (0.5, 0.5))])
    assert set(batch) == {"original_size", "crop_top_left", "target_size"}
    assert batch["crop_top_left"].tolist() == [[0, 0]]
