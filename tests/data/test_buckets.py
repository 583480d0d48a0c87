"""Target sizes and bucket assignment, pinned to exact numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from simpletuner.data.buckets import aspect_key, assign_buckets, merge_buckets, round_to_alignment, target_size
from simpletuner.data.metadata import ImageRecord


@pytest.mark.parametrize(
    ("size", "resolution", "resolution_type", "alignment", "crop", "expected"),
    [
        # pixel: shorter side -> resolution. 1024/768*1024 = 1365.3 -> 1344 (21 * 64)
        ((768, 1024), 1024, "pixel", 64, False, (1024, 1344)),
        ((3000, 2000), 512, "pixel", 8, False, (768, 512)),
        ((100, 100), 512, "pixel", 64, False, (512, 512)),  # upscaled
        # pixel_area: area -> 1024^2. 1024*sqrt(1.5) = 1254.1 -> 1280; 1024/sqrt(1.5) = 836.1 -> 832
        ((1500, 1000), 1024, "pixel_area", 64, False, (1280, 832)),
        ((1000, 1000), 1024, "pixel_area", 64, False, (1024, 1024)),
        # area (megapixels, 10**6 px): edge 1000; 1000*sqrt(2) = 1414.2 -> 1408, 707.1 -> 704
        ((2000, 1000), 1.0, "area", 64, False, (1408, 704)),
        ((2000, 1000), 1.0, "area", 16, False, (1408, 704)),
        # alignment: never below one alignment step
        ((4000, 100), 64, "pixel_area", 64, False, (384, 64)),
        ((1000, 10), 16, "pixel", 64, False, (1600, 64)),
        # crop: square of the pixel edge rounded to alignment
        ((1500, 1000), 1000, "pixel", 64, True, (1024, 1024)),
        ((1500, 1000), 1.0, "area", 64, True, (1024, 1024)),
        ((1500, 1000), 500, "pixel_area", 8, True, (504, 504)),
    ],
)
def test_target_size(size, resolution, resolution_type, alignment, crop, expected) -> None:
    assert target_size(*size, resolution, resolution_type, alignment, crop) == expected


def test_rounding_is_half_up() -> None:
    assert round_to_alignment(96, 64) == 128  # 1.5 steps -> 2
    assert round_to_alignment(160, 64) == 192  # 2.5 steps -> 3 (banker's would give 128)
    assert round_to_alignment(10, 64) == 64


def test_unknown_resolution_type_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="pixel_area"):
        target_size(100, 100, 1024, "megapixel", 64, False)


def test_aspect_key() -> None:
    assert (aspect_key(1024, 1024), aspect_key(1536, 1024), aspect_key(832, 1216)) == ("1.00", "1.50", "0.68")


def _record(name: str, width: int, height: int, dataset: str = "ds") -> ImageRecord:
    return ImageRecord(Path(name), width, height, name, dataset)


def test_assign_buckets_mixed_aspects() -> None:
    records = [
        _record("wide1", 1500, 1000),
        _record("square1", 800, 800),
        _record("tall", 1000, 1500),
        _record("wide2", 3000, 2000),
        _record("square2", 2048, 2048),
    ]
    buckets = assign_buckets(records, 1024, "pixel_area", 64, crop=False)
    assert list(buckets) == [(832, 1280), (1024, 1024), (1280, 832)]
    assert [r.path.name for r in buckets[(1280, 832)]] == ["wide1", "wide2"]
    assert [r.path.name for r in buckets[(1024, 1024)]] == ["square1", "square2"]
    assert [r.path.name for r in buckets[(832, 1280)]] == ["tall"]
    cropped = assign_buckets(records, 1024, "pixel_area", 64, crop=True)
    assert list(cropped) == [(1024, 1024)] and len(cropped[(1024, 1024)]) == 5


def test_merge_buckets_across_datasets() -> None:
    a = assign_buckets([_record("a", 100, 100, "A")], 512, "pixel", 64, False)
    b = assign_buckets([_record("b", 50, 50, "B"), _record("c", 300, 100, "B")], 512, "pixel", 64, False)
    merged = merge_buckets(b, a)
    assert list(merged) == [(512, 512), (1536, 512)]
    assert [r.path.name for r in merged[(512, 512)]] == ["b", "a"]
