"""Start-up discovery options: the stored scan, skipping stages, missing files, deletions, logging."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
from PIL import Image

from simpletuner.data import metadata as metadata_module
from simpletuner.data.backends import StorageError
from simpletuner.data.build import build_training_data
from simpletuner.data.cache import vae as vae_module
from simpletuner.data.scan_cache import SCAN_CACHE_NAME, MissingFilesError
from tests.data.fake_model import FakeModel, local, make_config, make_plan, snapshot, write_images

IMAGES = 4


def _build(tmp_path: Path, entry: dict | None = None, model: FakeModel | None = None, **options):
    plan = make_plan(tmp_path, local("d", tmp_path / "d", **(entry or {})))
    return build_training_data(make_config(tmp_path, **options), model or FakeModel(), plan, show_progress=False)


@pytest.fixture
def header_reads(monkeypatch) -> list[str]:
    """Keys whose image header the scan reads."""
    calls: list[str] = []
    real = metadata_module.read_image_size_from

    def counting(backend, key):
        calls.append(key)
        return real(backend, key)

    monkeypatch.setattr(metadata_module, "read_image_size_from", counting)
    return calls


def _stored(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "cache" / "vae" / "d" / SCAN_CACHE_NAME).read_text())


def test_unchanged_files_are_not_opened_again(tmp_path: Path, header_reads) -> None:
    write_images(tmp_path / "d", IMAGES)
    _build(tmp_path)
    assert len(header_reads) == IMAGES and _stored(tmp_path)["complete"]
    header_reads.clear()
    _build(tmp_path)
    assert header_reads == []
    Image.new("RGB", (64, 96)).save(tmp_path / "d" / "img_01.png")  # changed: its header is read again
    data = _build(tmp_path)
    assert header_reads == ["img_01.png"] and data.summaries[0].buckets == {(64, 64): 3, (64, 128): 1}


def test_interrupted_scan_resumes_from_metadata_update_interval_saves(tmp_path: Path, monkeypatch) -> None:
    write_images(tmp_path / "d", IMAGES)
    real = metadata_module.read_image_size_from
    seen: list[str] = []

    def flaky(backend, key):
        seen.append(key)
        if len(seen) > 2:
            raise StorageError("connection lost")
        return real(backend, key)

    monkeypatch.setattr(metadata_module, "read_image_size_from", flaky)
    with pytest.raises(StorageError):
        _build(tmp_path, metadata_update_interval=0)
    stored = _stored(tmp_path)
    assert not stored["complete"] and sorted(stored["sizes"]) == ["img_00.png", "img_01.png"]
    seen.clear()
    monkeypatch.setattr(metadata_module, "read_image_size_from",
                        lambda backend, key: seen.append(key) or real(backend, key))
    _build(tmp_path)
    assert seen == ["img_02.png", "img_03.png"]


def test_skip_file_discovery_uses_the_stored_scan_and_trusts_the_caches(tmp_path: Path, header_reads,
                                                                         monkeypatch) -> None:
    write_images(tmp_path / "d", IMAGES)
    first = _build(tmp_path)
    header_reads.clear()
    hashed: list[Path] = []
    monkeypatch.setattr(vae_module, "hash_file", lambda path: hashed.append(path) or "x")
    monkeypatch.setattr(metadata_module, "caption_variants_for", lambda *a, **k: pytest.fail("caption read"))
    model = FakeModel()
    skipped = _build(tmp_path, model=model, skip_file_discovery="metadata vae text")
    assert header_reads == [] and hashed == [] and model.prompts_encoded == [] and model.images_encoded == 0
    assert skipped.summaries[0].buckets == first.summaries[0].buckets
    assert skipped.next_batch()["paths"] == first.next_batch()["paths"]
    per_entry = _build(tmp_path, entry={"skip_file_discovery": ["aspect"]})
    assert header_reads == [] and per_entry.summaries[0].buckets == first.summaries[0].buckets


def test_override_dataset_config_decides_whether_changed_settings_rescan(tmp_path: Path, caplog) -> None:
    write_images(tmp_path / "d", 2)
    _build(tmp_path)
    changed = {"skip_file_discovery": "metadata", "caption_strategy": "filename"}
    with caplog.at_level(logging.WARNING, logger="simpletuner.data"):
        rescanned = _build(tmp_path, entry=changed)
    assert "scanning again" in caplog.text
    assert rescanned.next_batch()["captions"] == ["img", "img"]
    _build(tmp_path)  # store the textfile captions again
    kept = _build(tmp_path, entry=changed, override_dataset_config=True)
    assert sorted(kept.next_batch()["captions"]) == ["a picture 0", "a picture 1"]


def test_preserved_listing_ignores_new_files_and_missing_ones_need_ignore_missing_files(tmp_path: Path) -> None:
    write_images(tmp_path / "d", IMAGES)
    _build(tmp_path)
    write_images(tmp_path / "d", 1, prefix="new")
    preserved = _build(tmp_path, entry={"preserve_data_backend_cache": True})
    assert preserved.summaries[0].found == IMAGES
    assert _build(tmp_path, preserve_data_backend_cache=False).summaries[0].found == IMAGES + 1
    _build(tmp_path, entry={"preserve_data_backend_cache": True})
    (tmp_path / "d" / "img_02.png").unlink()
    with pytest.raises(MissingFilesError, match="img_02.png.*--ignore_missing_files"):
        _build(tmp_path, preserve_data_backend_cache=True)
    data = _build(tmp_path, preserve_data_backend_cache=True, ignore_missing_files=True)
    assert data.summaries[0].skipped == [(tmp_path / "d" / "img_02.png",
                                          "listed in the stored scan but missing (--ignore_missing_files)")]
    _build(tmp_path)  # a full scan is stored again
    (tmp_path / "d" / "img_01.png").unlink()
    with pytest.raises(MissingFilesError, match="img_01.png"):
        _build(tmp_path, entry={"skip_file_discovery": "metadata"})


def _bad_corpus(folder: Path) -> None:
    write_images(folder, IMAGES)
    Image.new("RGB", (16, 16)).save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("too small", encoding="utf-8")
    (folder / "fake.png").write_bytes(b"this is not a picture")
    (folder / "fake.txt").write_text("fake", encoding="utf-8")
    good = (folder / "img_00.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])  # header fine, pixels truncated
    (folder / "cut.txt").write_text("cut", encoding="utf-8")


def test_nothing_on_disk_changes_without_the_delete_options(tmp_path: Path) -> None:
    _bad_corpus(tmp_path / "d")
    before = snapshot(tmp_path / "d")
    data = _build(tmp_path, entry={"minimum_image_size": 32})
    assert len(data.summaries[0].skipped) == 3 and data.summaries[0].deleted == []
    assert snapshot(tmp_path / "d") == before


def test_delete_unwanted_and_problematic_images(tmp_path: Path) -> None:
    _bad_corpus(tmp_path / "d")
    data = _build(tmp_path, entry={"minimum_image_size": 32, "delete_unwanted_images": True})
    assert not (tmp_path / "d" / "tiny.png").exists()
    assert (tmp_path / "d" / "fake.png").exists() and (tmp_path / "d" / "cut.png").exists()
    assert data.summaries[0].deleted == [str(tmp_path / "d" / "tiny.png")]
    data = _build(tmp_path, delete_problematic_images=True)
    assert not (tmp_path / "d" / "fake.png").exists() and not (tmp_path / "d" / "cut.png").exists()
    assert sorted(data.summaries[0].deleted) == [str(tmp_path / "d" / "cut.png"), str(tmp_path / "d" / "fake.png")]
    assert "deleted " in data.describe()
    assert sorted(p.name for p in (tmp_path / "d").glob("*.png")) == [f"img_{i:02d}.png" for i in range(IMAGES)]


def test_global_size_options_are_dataset_defaults(tmp_path: Path) -> None:
    _bad_corpus(tmp_path / "d")
    data = _build(tmp_path, minimum_image_size=32)
    assert any("minimum_image_size 32" in reason for _, reason in data.summaries[0].skipped)
    data = _build(tmp_path, entry={"minimum_image_size": 8}, minimum_image_size=32)
    assert not any("minimum_image_size" in reason for _, reason in data.summaries[0].skipped)
    upscaled = _build(tmp_path, max_upscale_threshold=0.5)
    assert any("upscaling" in reason for _, reason in upscaled.summaries[0].skipped)


def test_print_filenames_logs_every_file(tmp_path: Path, caplog) -> None:
    write_images(tmp_path / "d", 2)
    with caplog.at_level(logging.INFO, logger="simpletuner.data"):
        _build(tmp_path, print_filenames=True)
    text = caplog.text
    for name in ("img_00.png", "img_01.png"):
        assert f"scanning {tmp_path / 'd' / name}" in text and f"encoding {tmp_path / 'd' / name}" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="simpletuner.data"):
        _build(tmp_path)
    assert "scanning" not in caplog.text
