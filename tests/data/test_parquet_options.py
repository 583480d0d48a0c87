"""``--parquet_caption_column`` / ``--parquet_filename_column``: defaults for the columns a
parquet dataset's own ``parquet`` object leaves out."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from simpletuner.data.metadata import scan_image_dataset  # noqa: E402
from simpletuner.data.settings import resolve_dataset  # noqa: E402
from tests.data.fake_model import make_config, make_plan, write_images  # noqa: E402


def _dataset(tmp_path: Path, parquet: dict):
    write_images(tmp_path / "images", 2, caption=None)
    table = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"id": ["img_00.png", "img_01.png"], "description": ["a red one", "a green one"],
                             "caption": ["wrong", "wrong"]}), table)
    entry = {"id": "photos", "type": "parquet", "instance_data_dir": str(tmp_path / "images"),
             "parquet": {"path": str(table), **parquet}}
    return make_plan(tmp_path, entry).images[0]


def test_global_columns_fill_what_the_entry_leaves_out(tmp_path: Path) -> None:
    raw = _dataset(tmp_path, {})
    config = make_config(tmp_path, parquet_caption_column="description", parquet_filename_column="id")
    cfg = resolve_dataset(raw, config)
    assert (cfg.parquet.caption_column, cfg.parquet.filename_column) == ("description", "id")
    assert [(r.key, r.caption) for r in scan_image_dataset(cfg).records] == [
        ("img_00.png", "a red one"), ("img_01.png", "a green one")]


def test_the_entry_wins_over_the_global_columns(tmp_path: Path) -> None:
    raw = _dataset(tmp_path, {"caption_column": "caption", "filename_column": "id"})
    cfg = resolve_dataset(raw, make_config(tmp_path, parquet_caption_column="description",
                                           parquet_filename_column="nope"))
    assert (cfg.parquet.caption_column, cfg.parquet.filename_column) == ("caption", "id")
    assert [r.caption for r in scan_image_dataset(cfg).records] == ["wrong", "wrong"]
    # without the flags the schema's defaults stay
    assert resolve_dataset(_dataset(tmp_path / "again", {}), make_config(tmp_path)).parquet.caption_column == "caption"
