"""Geometry keys of multidatabackend.json: filters, downsampling, crop aspects and crop windows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from simpletuner.data.config import DatasetConfigError, ImageDatasetConfig, parse_dataset_plan
from simpletuner.data.geometry import Placement, buckets_of, measure, place_image, place_images
from simpletuner.data.metadata import ImageRecord


def dataset(**overrides) -> ImageDatasetConfig:
    values = dict(id="d", type="local", instance_data_dir=".", resolution=512.0, resolution_type="pixel")
    values.update(overrides)
    return ImageDatasetConfig(**values)


def record(width: int, height: int, name: str = "img.png") -> ImageRecord:
    return ImageRecord(path=Path(name), width=width, height=height, caption="c", dataset_id="d")


def test_measure_uses_the_resolution_unit():
    assert measure(800, 600, "pixel") == 600
    assert measure(800, 200, "pixel_area") == 400
    assert measure(2000, 1000, "area") == 2.0


def test_minimum_size_and_aspect_limits_leave_images_out_with_reasons():
    cfg = dataset(minimum_image_size=400, minimum_aspect_ratio=0.5, maximum_aspect_ratio=2.0)
    assert "smaller than minimum_image_size 400" in place_image(record(600, 300), cfg, 64)
    assert "below minimum_aspect_ratio 0.5" in place_image(record(400, 1000), cfg, 64)
    assert "above maximum_aspect_ratio 2" in place_image(record(2100, 1000), cfg, 64)
    assert isinstance(place_image(record(800, 600), cfg, 64), Placement)


def test_max_upscale_threshold():
    cfg = dataset(max_upscale_threshold=0.2)
    assert place_image(record(450, 450), cfg, 64).size == (512, 512)  # 13.8% enlargement: kept
    reason = place_image(record(400, 400), cfg, 64)  # 28% enlargement: left out
    assert reason == "needs 28% upscaling to reach 512x512; max_upscale_threshold is 0.2"


def test_downsampling_changes_the_source_size_used_by_later_rules():
    cfg = dataset(maximum_image_size=1500, target_downsample_size=1000, max_upscale_threshold=0.0)
    placement = place_image(record(4000, 2000), cfg, 64)
    assert placement.source_size == (2000, 1000)
    assert placement.size == (1024, 512)
    small = place_image(record(1200, 800), cfg, 64)
    assert small.source_size == (1200, 800)


def test_crop_aspects():
    square = dataset(crop=True)
    assert place_image(record(1000, 500), square, 64).size == (512, 512)
    preserve = dataset(crop=True, crop_aspect="preserve")
    assert place_image(record(1000, 500), preserve, 64).size == (1024, 512)
    closest = dataset(crop=True, crop_aspect="closest", crop_aspect_buckets=(0.75, 1.0, 1.5))
    assert place_image(record(1000, 640), closest, 64).size == (768, 512)  # 1.56 -> 1.5
    assert place_image(record(600, 800), closest, 64).size == (512, 704)  # 0.75, 682.7 rounds to 704
    random_aspect = dataset(crop=True, crop_aspect="random", crop_aspect_buckets=(0.75, 1.0, 1.5))
    sizes = {place_image(record(800, 800, f"{i}.png"), random_aspect, 64).size for i in range(60)}
    assert sizes == {(512, 704), (512, 512), (768, 512)}
    again = {place_image(record(800, 800, f"{i}.png"), random_aspect, 64).size for i in range(60)}
    assert sizes == again


def test_pixel_area_crop_aspect_keeps_the_area():
    cfg = dataset(resolution_type="pixel_area", crop=True, crop_aspect="closest", crop_aspect_buckets=(2.0,))
    width, height = place_image(record(900, 400), cfg, 8).size
    assert (width, height) == (728, 360)
    assert abs(width * height - 512 * 512) / (512 * 512) < 0.01


def test_crop_styles_place_the_window():
    assert place_image(record(800, 600), dataset(crop=True), 64).anchor == (0.5, 0.5)
    assert place_image(record(800, 600), dataset(crop=True, crop_style="corner"), 64).anchor == (0.0, 0.0)
    anchors = {place_image(record(800, 600, f"{i}.png"), dataset(crop=True, crop_style="random"), 64).anchor
               for i in range(20)}
    assert len(anchors) == 20 and all(0 <= x < 1 and 0 <= y < 1 for x, y in anchors)
    assert place_image(record(800, 600), dataset(crop_style="corner"), 64).anchor == (0.5, 0.5), \
        "without crop the whole image is used, centred"


def test_place_images_groups_and_reports():
    cfg = dataset(minimum_image_size=300)
    records = [record(512, 512, "a.png"), record(1024, 512, "b.png"), record(100, 100, "c.png")]
    placed, skipped = place_images(records, cfg, 64)
    assert {size: [r.path.name for r in rs] for size, rs in buckets_of(placed).items()} == {
        (512, 512): ["a.png"], (1024, 512): ["b.png"]}
    assert [(str(p), "smaller" in reason) for p, reason in skipped] == [("c.png", True)]


@pytest.mark.parametrize("extra, message", [
    ({"maximum_image_size": 2048}, "must be set together"),
    ({"maximum_image_size": 1000, "target_downsample_size": 2000}, "must not exceed"),
    ({"minimum_aspect_ratio": 2, "maximum_aspect_ratio": 1}, "is larger than 'maximum_aspect_ratio'"),
    ({"crop_aspect": "closest"}, "needs 'crop_aspect_buckets'"),
    ({"crop_style": "middle"}, "key 'crop_style' has value 'middle'"),
    ({"crop_aspect_buckets": [1.0, -2]}, "expected a list of positive numbers"),
    ({"max_upscale_threshold": -0.1}, "use 0 or more"),
    ({"minimum_image_size": 0}, "use a positive number"),
])
def test_geometry_keys_are_validated(tmp_path, extra, message):
    entries = [{"id": "img", "type": "local", "instance_data_dir": str(tmp_path), **extra},
               {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "t")}]
    with pytest.raises(DatasetConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_dataset_plan(entries, "datasets.json")


def test_geometry_keys_parse():
    entries = [{"id": "img", "type": "local", "instance_data_dir": ".", "crop": True, "crop_aspect": "closest",
                "crop_aspect_buckets": [1, 1.5], "crop_style": "random", "maximum_image_size": 4096,
                "target_downsample_size": 2048, "max_upscale_threshold": 0.25},
               {"id": "text", "dataset_type": "text_embeds", "cache_dir": "t"}]
    cfg = parse_dataset_plan(entries).images[0]
    assert cfg.crop_aspect_buckets == (1.0, 1.5) and cfg.crop_style == "random"
    assert dataclasses.replace(cfg).target_downsample_size == 2048
