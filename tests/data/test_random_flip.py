"""``random_flip``: the mirrored crops are cached as entries of their own (flipping pixels, not
latents), and each image trains on one side or the other by a seeded draw per epoch."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from simpletuner.data.build import build_training_data
from simpletuner.data.cache.vae import VaeCache
from simpletuner.data.config import DatasetConfigError
from simpletuner.data.dataset import draws_flipped
from simpletuner.data.images import load_image_tensor
from tests.data.fake_model import FakeModel, local, make_config, make_plan


def write_asymmetric(folder: Path, count: int) -> None:
    """Images whose left and right halves differ (a flip changes them), with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (64, 64), (200, 30 * index % 256, 40))
        image.paste((20, 90, 250 - 20 * index), (0, 0, 24, 64))  # a stripe on the left only
        image.save(folder / f"img_{index:02d}.png")
        (folder / f"img_{index:02d}.txt").write_text(f"a striped picture {index}", encoding="utf-8")


def test_flipped_latents_are_the_latents_of_the_flipped_image(tmp_path: Path):
    write_asymmetric(tmp_path / "d", 4)
    model = FakeModel()
    plan = make_plan(tmp_path, local("d", tmp_path / "d", random_flip=True))
    data = build_training_data(make_config(tmp_path), model, plan, show_progress=False)
    assert model.images_encoded == 8  # every image once plain, once mirrored
    seen = {True: 0, False: 0}
    for _ in range(8):
        batch = data.next_batch()
        for position, (path, flipped) in enumerate(zip(batch["paths"], batch["flipped"])):
            source = Image.open(path).convert("RGB")
            shown = tmp_path / "shown.png"  # the mirrored file, encoded the ordinary way
            (ImageOps.mirror(source) if flipped else source).save(shown)
            expected = model.encode_images(load_image_tensor(shown, (64, 64)).unsqueeze(0))["latent_mean"][0]
            assert torch.allclose(batch["latent_mean"][position], expected, atol=1e-6)
            seen[flipped] += 1
    assert seen[True] and seen[False]  # both sides are trained on


def test_the_side_is_a_seeded_draw_per_image_and_epoch(tmp_path: Path):
    draws = [draws_flipped(3, epoch, "a.png") for epoch in range(40)]
    assert draws == [draws_flipped(3, epoch, "a.png") for epoch in range(40)]
    assert 10 < sum(draws) < 30
    write_asymmetric(tmp_path / "d", 4)
    plan = make_plan(tmp_path, local("d", tmp_path / "d", random_flip=True))
    first = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    again = build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    assert [first.next_batch()["flipped"] for _ in range(6)] == [again.next_batch()["flipped"] for _ in range(6)]


def test_the_flip_is_part_of_the_fingerprint_and_reused(tmp_path: Path):
    write_asymmetric(tmp_path / "d", 2)
    plan = make_plan(tmp_path, local("d", tmp_path / "d", random_flip=True))
    build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False)
    second = FakeModel()
    build_training_data(make_config(tmp_path), second, plan, show_progress=False)
    assert second.images_encoded == 0  # both sides come from the cache on the next start
    plain = VaeCache(tmp_path / "c", "d", tmp_path / "d")
    flipped = VaeCache(tmp_path / "c", "d", tmp_path / "d", flip=True)
    from simpletuner.data.metadata import ImageRecord

    record = ImageRecord(tmp_path / "d" / "img_00.png", 64, 64, "x", "d")
    for cache in (plain, flipped):
        cache._content[record.path] = "same-content"
        cache._model_parts = {"model": "fake"}
    assert plain._fingerprint(record, (64, 64)) != flipped._fingerprint(record, (64, 64))


@pytest.mark.parametrize("extra, words", [
    ({"conditioning_data": "masks"}, "conditioning_data"),
    ({"vae_cache_clear_each_epoch": True}, "vae_cache_clear_each_epoch"),
])
def test_combinations_that_cannot_flip_are_refused(tmp_path: Path, extra, words):
    write_asymmetric(tmp_path / "d", 1)
    with pytest.raises(DatasetConfigError, match=f"dataset 'd'.*random_flip cannot be combined with {words}"):
        make_plan(tmp_path, local("d", tmp_path / "d", random_flip=True, **extra))
