"""Parquet metadata: captions (with a fallback column) and sizes from a table, images from files or cells."""

from __future__ import annotations

import io
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

from simpletuner.data.backends.local import LocalBackend  # noqa: E402
from simpletuner.data.config import DatasetConfigError, parse_dataset_plan  # noqa: E402
from simpletuner.data.metadata import scan_image_dataset  # noqa: E402

_TEXT = {"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/text"}


def _images(folder: Path) -> None:
    """a.png 40x20, b.png 20x30, sub/c.jpg 16x16 (no caption files: the table has the captions)."""
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (20, 30), (10, 200, 10)).save(folder / "b.png")
    Image.new("RGB", (16, 16), (10, 10, 200)).save(folder / "sub" / "c.jpg")


def _table(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _cfg(tmp_path: Path, parquet: dict, **extra):
    entry = {"id": "photos", "type": "parquet", "instance_data_dir": str(tmp_path / "images"),
             "parquet": parquet, **extra}
    return parse_dataset_plan([entry, _TEXT]).images[0]


def test_captions_come_from_the_column_and_fall_back_when_empty(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    table = _table(tmp_path / "meta.parquet", file=["a.png", "b.png", "sub/c.jpg"],
                   caption=["a red banner", "  ", None], tags=["unused", "green, tall", ""])
    cfg = _cfg(tmp_path, {"path": str(table), "filename_column": "file", "caption_column": "caption",
                          "fallback_caption_column": "tags"})
    assert cfg.caption_strategy == "parquet"  # the table's captions by default
    result = scan_image_dataset(cfg)
    assert [(r.key, r.caption, r.width, r.height) for r in result.records] == [
        ("a.png", "a red banner", 40, 20), ("b.png", "green, tall", 20, 30)]
    assert result.records[0].path == tmp_path / "images" / "a.png"
    assert result.skipped == [(tmp_path / "images" / "sub" / "c.jpg",
                               "row 2: empty caption in column 'caption' and in fallback column 'tags'")]


def test_width_and_height_columns_mean_no_image_is_opened(tmp_path: Path, monkeypatch) -> None:
    _images(tmp_path / "images")
    table = _table(tmp_path / "meta.parquet", file=["a.png", "b.png"], caption=["one", "two"],
                   w=[400, 200], h=[200, 300])
    cfg = _cfg(tmp_path, {"path": str(table), "filename_column": "file", "width_column": "w", "height_column": "h"})

    def no_opening(*args, **kwargs):
        raise AssertionError("the scan must not open an image when the table gives its size")

    monkeypatch.setattr(Image, "open", no_opening)
    monkeypatch.setattr(LocalBackend, "read_bytes", no_opening)
    monkeypatch.setattr(LocalBackend, "read_head", no_opening)
    result = scan_image_dataset(cfg)
    assert [(r.key, r.width, r.height) for r in result.records] == [("a.png", 400, 200), ("b.png", 200, 300)]


def test_names_without_extension_are_matched_by_stem_and_missing_files_reported(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    table = _table(tmp_path / "meta.parquet", id=["a", "sub/c", "gone", "a"], text=["x", "y", "z", "again"])
    cfg = _cfg(tmp_path, {"path": str(table), "filename_column": "id", "caption_column": "text"})
    result = scan_image_dataset(cfg)
    assert [(r.key, r.caption) for r in result.records] == [("a.png", "x"), ("sub/c.jpg", "y")]
    reasons = [reason for _, reason in result.skipped]
    assert reasons[0].startswith("row 2: no image file for it in ") and "row 3 names the same image as row 0" in reasons[1]


def test_images_stored_in_the_table_are_scanned_and_decoded(tmp_path: Path) -> None:
    from simpletuner.data.backends import open_dataset
    from simpletuner.data.images import load_image_tensor

    cells = []
    for size in ((24, 16), (16, 16)):
        buffer = io.BytesIO()
        Image.new("RGB", size, (250, 250, 0)).save(buffer, "PNG")
        cells.append(buffer.getvalue())
    table = _table(tmp_path / "meta.parquet", name=["first.png", "second.png"], caption=["wide", "square"],
                   image=pa.array(cells, type=pa.binary()))
    entry = {"id": "cells", "type": "parquet", "parquet": {"path": str(table), "filename_column": "name",
                                                          "image_column": "image"}}
    cfg = parse_dataset_plan([entry, _TEXT]).images[0]
    source = open_dataset(cfg)
    result = scan_image_dataset(cfg, source)
    assert [(r.key, r.caption, r.width, r.height) for r in result.records] == [
        ("first.png", "wide", 24, 16), ("second.png", "square", 16, 16)]
    assert str(result.records[0].path) == f"{table}[first.png]"
    pixels = load_image_tensor(source.images.read_bytes("first.png"), (24, 16))
    assert pixels.shape == (3, 16, 24) and float(pixels[2].max()) < -0.9  # yellow: no blue


def test_simpletuner_shape_local_type_with_parquet_metadata(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    table = _table(tmp_path / "meta.parquet", filename=["b.png"], caption=["only b"])
    entry = {"id": "photos", "type": "local", "metadata_backend": "parquet", "caption_strategy": "parquet",
             "instance_data_dir": str(tmp_path / "images"), "parquet": {"path": str(table)}}
    cfg = parse_dataset_plan([entry, _TEXT]).images[0]
    assert [(r.key, r.caption) for r in scan_image_dataset(cfg).records] == [("b.png", "only b")]


def test_parquet_config_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    table = _table(tmp_path / "meta.parquet", file=["a.png"], caption=["x"])
    with pytest.raises(DatasetConfigError, match="needs a \"parquet\" object"):
        parse_dataset_plan([{"id": "p", "type": "parquet", "instance_data_dir": str(tmp_path)}, _TEXT])
    with pytest.raises(DatasetConfigError, match="key 'parquet': unknown key 'caption_colum'; did you mean 'caption_column'"):
        _cfg(tmp_path, {"path": str(table), "caption_colum": "c"})
    with pytest.raises(DatasetConfigError, match="set both 'width_column' and 'height_column'"):
        _cfg(tmp_path, {"path": str(table), "width_column": "w"})
    with pytest.raises(DatasetConfigError, match="'path' has value .*missing.parquet.* does not exist"):
        _cfg(tmp_path, {"path": str(tmp_path / "missing.parquet")})
    with pytest.raises(DatasetConfigError, match="caption_strategy' has value 'parquet', which needs"):
        parse_dataset_plan([{"id": "p", "type": "local", "instance_data_dir": str(tmp_path),
                             "caption_strategy": "parquet"}, _TEXT])
    with pytest.raises(DatasetConfigError, match="unknown key 'caption_column'; table settings go inside"):
        parse_dataset_plan([{"id": "p", "type": "local", "instance_data_dir": str(tmp_path),
                             "caption_column": "c"}, _TEXT])
    cfg = _cfg(tmp_path, {"path": str(table), "filename_column": "file", "caption_column": "nope"})
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match=r"has no column 'nope'; its columns are \['file', 'caption'\]"):
        scan_image_dataset(cfg)
