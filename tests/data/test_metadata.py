"""Metadata scan and caption strategies, on tiny images written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from simpletuner.data.captions import caption_for, caption_from_filename
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.metadata import ImageRecord, scan_image_dataset


def _cfg(directory: Path, **extra) -> ImageDatasetConfig:
    return ImageDatasetConfig(id="ds", type="local", instance_data_dir=str(directory), **extra)


def _png(path: Path, size: tuple[int, int], caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def test_textfile_caption_first_nonempty_line(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png", (8, 8), "\n  a red square  \nsecond caption\n")
    assert caption_for(image, _cfg(tmp_path)) == "a red square"


def test_textfile_missing_or_blank_is_none(tmp_path: Path) -> None:
    assert caption_for(_png(tmp_path / "a.png", (8, 8)), _cfg(tmp_path)) is None
    assert caption_for(_png(tmp_path / "b.png", (8, 8), " \n\n"), _cfg(tmp_path)) is None


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        ("a_red-square.png", "a red square"),
        ("blue_circle (2).jpg", "blue circle"),
        ("green_triangle_0042.png", "green triangle"),
        ("cat_01 (3).png", "cat"),
        ("1990s_car.png", "1990s car"),
        ("0001.png", None),
    ],
)
def test_filename_caption(name: str, caption: str | None) -> None:
    assert caption_from_filename(Path(name)) == caption


def test_instance_prompt_caption(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, caption_strategy="instanceprompt", instance_prompt="a photo of sks dog")
    assert caption_for(tmp_path / "x.png", cfg) == "a photo of sks dog"


def test_scan_sorted_recursive_with_sizes_and_skips(tmp_path: Path) -> None:
    _png(tmp_path / "b.png", (30, 20), "wide")
    _png(tmp_path / "sub" / "a.png", (20, 30), "tall")
    _png(tmp_path / "a.png", (16, 16), "square")
    _png(tmp_path / "nocaption.png", (16, 16))
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all")
    (tmp_path / "corrupt.txt").write_text("caption of a broken file")
    (tmp_path / "notes.md").write_text("ignored: not an image extension")

    result = scan_image_dataset(_cfg(tmp_path))

    assert result.records == [
        ImageRecord(tmp_path / "a.png", 16, 16, "square", "ds"),
        ImageRecord(tmp_path / "b.png", 30, 20, "wide", "ds"),
        ImageRecord(tmp_path / "sub" / "a.png", 20, 30, "tall", "ds"),
    ]
    reasons = {path.name: reason for path, reason in result.skipped}
    assert set(reasons) == {"corrupt.jpg", "nocaption.png"}
    assert reasons["corrupt.jpg"].startswith("cannot read image header: ")
    assert str(tmp_path / "nocaption.txt") in reasons["nocaption.png"]
    assert "not found" in reasons["nocaption.png"]


def test_scan_reports_exif_rotated_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 20)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    result = scan_image_dataset(_cfg(tmp_path, caption_strategy="filename"))
    assert [(r.width, r.height, r.caption) for r in result.records] == [(20, 40, "phone")]


def test_scan_does_not_decode_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "a.png", (8, 8), "x")

    def forbidden_load(self):  # noqa: ANN001
        raise AssertionError("the scan must read headers only")

    monkeypatch.setattr(Image.Image, "load", forbidden_load)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)
    assert len(scan_image_dataset(_cfg(tmp_path)).records) == 1
