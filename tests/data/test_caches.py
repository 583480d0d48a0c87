"""Latent and text-embedding caches: reuse, invalidation, corruption, atomic writes."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub; set before diffusers is imported

import errno
import gzip
from pathlib import Path

import pytest
import safetensors.torch
import torch

from simpletuner.data import cache as cache_pkg
from simpletuner.data.buckets import assign_buckets
from simpletuner.data.cache import store
from simpletuner.data.cache import vae as vae_module
from simpletuner.data.cache.store import (
    CHECKSUM_TENSOR,
    FINGERPRINT_TENSOR,
    CacheWriteError,
    LocalEntries,
    decode_entry,
    encode_entry,
    entry_path,
    fingerprint,
    read_entry,
    tensor_checksum,
    write_entry,
)
from simpletuner.data.cache.text import TextEmbedCache
from simpletuner.data.cache.vae import CONTENT_INDEX_NAME, VaeCache
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.metadata import scan_image_dataset
from simpletuner.testing.shapes import make_demo_dataset

IMAGES = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """One tiny SD 1.x model for the whole module (building it takes a few seconds)."""
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.options.resolve import merge_sources
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("sd1x", folder)
    config = merge_sources({}, {"model_family": "sd1x", "output_dir": str(folder.parent / "out"),
                                "pretrained_model_name_or_path": str(folder)}, "test", [])
    family = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    family.load()
    return family


def _dataset(tmp_path: Path, count: int = IMAGES) -> tuple[ImageDatasetConfig, dict]:
    data = tmp_path / "data"
    make_demo_dataset(data, count, size=64)
    cfg = ImageDatasetConfig(id="shapes", type="local", instance_data_dir=str(data))
    return cfg, assign_buckets(scan_image_dataset(cfg).records, 64, "pixel", 8, crop=False)


def _cache(tmp_path: Path, cfg: ImageDatasetConfig) -> VaeCache:
    """A fresh cache object (empty RAM layer), as a new run would create."""
    return VaeCache(tmp_path / "cache" / "vae", cfg.id, cfg.instance_data_dir)


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


# --- store -------------------------------------------------------------------------------------------


def test_fingerprint_is_canonical_and_versioned(monkeypatch) -> None:
    first = fingerprint(a=1, b=[2, 3], c={"x": "y"})
    assert first == fingerprint(c={"x": "y"}, b=(2, 3), a=1)
    assert len(first) == 64 and first != fingerprint(a=1, b=[2, 3], c={"x": "z"})
    monkeypatch.setattr(store, "CACHE_FORMAT_VERSION", store.CACHE_FORMAT_VERSION + 1)
    assert fingerprint(a=1, b=[2, 3], c={"x": "y"}) != first


def test_read_entry_rejects_stale_missing_and_bitrot(tmp_path: Path, caplog) -> None:
    path = tmp_path / "ab" / "entry.safetensors"
    tensors = {"x": torch.arange(64, dtype=torch.float32).reshape(4, 16)}
    write_entry(path, tensors, {"fingerprint": "fp1", "source": "test"})
    assert torch.equal(read_entry(path, "fp1")["x"], tensors["x"])
    with caplog.at_level(logging.DEBUG, logger=store.__name__):
        assert read_entry(path, "fp2") is None
        assert read_entry(tmp_path / "missing.safetensors", "fp1") is None
    assert "stale" in caplog.text and "missing" in caplog.text
    path.write_bytes(_flip_byte_inside(path.read_bytes(), tensors["x"]))  # the header is still valid
    assert read_entry(path, "fp1") is None


def _flip_byte_inside(data: bytes, tensor: torch.Tensor) -> bytes:
    """``data`` (an uncompressed entry) with one byte of ``tensor``'s stored bytes inverted."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    start = data.find(raw)
    assert start > 0 and data.find(raw, start + 1) == -1, "the tensor's bytes must occur exactly once"
    damaged = bytearray(data)
    damaged[start + len(raw) // 2] ^= 0xFF
    return bytes(damaged)


_TENSORS = {"latent_mean": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7,
            "mask": torch.tensor([1, 1, 0], dtype=torch.int64)}


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_entry_bytes_round_trip_with_fingerprint_and_checksum_as_tensors(compress: bool) -> None:
    data = encode_entry(_TENSORS, {"fingerprint": "fp1", "source": "a.png"}, compress=compress)
    assert (data[:2] == b"\x1f\x8b") is compress
    decoded = decode_entry(data, "fp1", "mem://a")
    assert set(decoded) == set(_TENSORS)  # the reserved tensors never reach the caller
    assert all(torch.equal(decoded[name], _TENSORS[name]) and decoded[name].dtype == _TENSORS[name].dtype
               for name in _TENSORS)
    # what is inside: the fingerprint and a checksum of exactly the caller's tensors, as UTF-8 uint8 tensors
    raw = safetensors.torch.load(gzip.decompress(data) if compress else data)
    assert raw[FINGERPRINT_TENSOR].dtype == torch.uint8
    assert raw[FINGERPRINT_TENSOR].numpy().tobytes() == b"fp1"
    assert raw[CHECKSUM_TENSOR].numpy().tobytes().decode("utf-8") == tensor_checksum(_TENSORS)


def test_file_entries_keep_metadata_for_file_readers_and_read_like_bytes(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "ab" / "entry.safetensors"
    write_entry(path, _TENSORS, {"fingerprint": "fp1", "source": "a.png"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"fingerprint": "fp1", "source": "a.png", "checksum": tensor_checksum(_TENSORS)}
        assert set(handle.keys()) == set(_TENSORS) | {FINGERPRINT_TENSOR, CHECKSUM_TENSOR}
    assert set(read_entry(path, "fp1")) == set(_TENSORS)
    local = LocalEntries(tmp_path / "store")
    local.write("fp2" * 4, _TENSORS, {"fingerprint": "fp2" * 4})
    assert set(local.read("fp2" * 4)) == set(_TENSORS)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_entry_for_another_fingerprint_is_stale(compress: bool, caplog) -> None:
    data = encode_entry(_TENSORS, {"fingerprint": "fp1"}, compress=compress)
    with caplog.at_level(logging.DEBUG, logger=store.__name__):
        assert decode_entry(data, "fp2", "mem://a") is None
    assert "cache entry mem://a is stale (fingerprint fp1, expected fp2); rebuilding" in caplog.text


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_tampered_tensor_byte_fails_the_checksum(compress: bool, caplog) -> None:
    plain = encode_entry(_TENSORS, {"fingerprint": "fp1"})
    damaged = _flip_byte_inside(plain, _TENSORS["latent_mean"])
    safetensors.torch.load(damaged)  # still valid safetensors: only the checksum can tell
    data = gzip.compress(damaged) if compress else damaged
    with caplog.at_level(logging.DEBUG, logger=store.__name__):
        assert decode_entry(data, "fp1", "mem://a") is None
    assert "cache entry mem://a fails its checksum; rebuilding" in caplog.text


def _replace_in_tensor_data(data: bytes, text: bytes, new: bytes) -> bytes:
    """``data`` with the last occurrence of ``text`` replaced: a reserved tensor's bytes, which come
    after the header (where the same text appears as metadata, left untouched here)."""
    start = data.rfind(text)
    assert 0 <= data.find(text) < start, "the text must appear in the metadata and in a reserved tensor"
    return data[:start] + new + data[start + len(text):]


def test_tampered_reserved_tensors_are_refused(caplog) -> None:
    plain = encode_entry(_TENSORS, {"fingerprint": "fp1"})
    checksum = tensor_checksum(_TENSORS).encode("utf-8")
    other = bytes([checksum[0] ^ 0x01]) + checksum[1:]  # still hex text, no longer the checksum
    with caplog.at_level(logging.DEBUG, logger=store.__name__):
        assert decode_entry(_replace_in_tensor_data(plain, checksum, other), "fp1", "mem://a") is None
        assert decode_entry(_replace_in_tensor_data(plain, b"fp1", b"fp9"), "fp1", "mem://b") is None
        assert decode_entry(_replace_in_tensor_data(plain, b"fp1", b"\xff\xfe1"), "fp1", "mem://c") is None
    assert "mem://a fails its checksum" in caplog.text
    assert "mem://b is stale (fingerprint fp9, expected fp1)" in caplog.text  # the tensor wins over metadata
    assert "mem://c is unreadable (UnicodeDecodeError" in caplog.text


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_entry_in_the_older_metadata_only_format_is_stale(compress: bool, caplog) -> None:
    # what the store wrote before the reserved tensors: fingerprint and checksum only in the header
    old = safetensors.torch.save(_TENSORS, metadata={"fingerprint": "fp1", "checksum": tensor_checksum(_TENSORS)})
    data = gzip.compress(old) if compress else old
    with caplog.at_level(logging.DEBUG, logger=store.__name__):
        assert decode_entry(data, "fp1", "mem://old") is None
    assert ("cache entry mem://old is stale (fingerprint none: written in an older entry format, expected fp1); "
            "rebuilding") in caplog.text


def test_reserved_names_and_missing_fingerprint_are_refused_on_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"may not be named __checksum__.*reserved"):
        encode_entry({"x": torch.ones(2), CHECKSUM_TENSOR: torch.ones(2)}, {"fingerprint": "fp"})
    with pytest.raises(ValueError, match=r"no 'fingerprint'"):
        write_entry(tmp_path / "e.safetensors", {"x": torch.ones(2)}, {"source": "a"})
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_no_temp_file_and_keeps_previous_entry(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ab" / "entry.safetensors"
    old = {"x": torch.ones(3)}
    write_entry(path, old, {"fingerprint": "fp"})

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a real failure may leave a half-written file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CacheWriteError, match=r"entry\.safetensors.*free disk space"):
        write_entry(path, {"x": torch.zeros(3)}, {"fingerprint": "fp"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.safetensors"]
    assert torch.equal(read_entry(path, "fp")["x"], old["x"])
    assert issubclass(cache_pkg.CacheWriteError, OSError)


# --- VAE cache ---------------------------------------------------------------------------------------


def test_second_ensure_reuses_every_entry_with_identical_values(tmp_path: Path, model) -> None:
    cfg, buckets = _dataset(tmp_path)
    first = _cache(tmp_path, cfg)
    report = first.ensure(buckets, model, batch_size=2, progress=False)
    assert (report.built, report.reused, report.skipped) == (IMAGES, 0, [])
    entries = _entries(tmp_path / "cache" / "vae")
    assert len(entries) == IMAGES
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    second = _cache(tmp_path, cfg)
    again = second.ensure(buckets, model, batch_size=2, progress=False)
    assert (again.built, again.reused) == (0, IMAGES)
    for size, records in buckets.items():
        for record in records:
            built, reused = first.load(record, size), second.load(record, size)
            assert set(reused) == {"latent_mean", "latent_std"}
            assert reused["latent_mean"].shape == (4, size[1] // 4, size[0] // 4)
            for name in built:
                assert torch.equal(built[name], reused[name])


def test_changing_the_target_size_rebuilds(tmp_path: Path, model) -> None:
    cfg, buckets = _dataset(tmp_path, count=3)
    _cache(tmp_path, cfg).ensure(buckets, model, batch_size=4, progress=False)
    smaller = {(32, 32): [record for records in buckets.values() for record in records]}
    report = _cache(tmp_path, cfg).ensure(smaller, model, batch_size=4, progress=False)
    assert (report.built, report.reused) == (3, 0)
    assert len(_entries(tmp_path / "cache" / "vae")) == 6


def test_truncated_entry_is_detected_and_rebuilt(tmp_path: Path, model) -> None:
    cfg, buckets = _dataset(tmp_path)
    first = _cache(tmp_path, cfg)
    first.ensure(buckets, model, batch_size=2, progress=False)
    size, records = next(iter(buckets.items()))
    victim = entry_path(first.cache_dir, first._keys[(records[0].path, size)])
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])

    second = _cache(tmp_path, cfg)
    report = second.ensure(buckets, model, batch_size=2, progress=False)
    assert (report.built, report.reused) == (1, IMAGES - 1)
    assert victim.stat().st_size == len(good)
    # Encoded alone now, in a batch of two before: equal up to batch-dependent float rounding.
    torch.testing.assert_close(second.load(records[0], size)["latent_mean"], first.load(records[0], size)["latent_mean"])


def test_truncated_image_is_skipped_with_one_warning(tmp_path: Path, model, caplog) -> None:
    cfg, buckets = _dataset(tmp_path)
    size, records = next(iter(buckets.items()))
    broken = records[1].path
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        report = _cache(tmp_path, cfg).ensure(buckets, model, batch_size=2, progress=False)
    assert report.built == IMAGES - 1
    assert [path for path, _ in report.skipped] == [broken]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and broken.name in r.getMessage()]
    assert len(warnings) == 1


def test_content_index_avoids_rehashing_unchanged_files(tmp_path: Path, model, monkeypatch) -> None:
    calls: list[Path] = []
    real_hash = vae_module.hash_file

    def counting_hash(path: Path) -> str:
        calls.append(Path(path))
        return real_hash(path)

    monkeypatch.setattr(vae_module, "hash_file", counting_hash)
    cfg, buckets = _dataset(tmp_path)
    _cache(tmp_path, cfg).ensure(buckets, model, batch_size=4, progress=False)
    assert len(calls) == IMAGES
    assert (tmp_path / "cache" / "vae" / CONTENT_INDEX_NAME).is_file()

    calls.clear()
    report = _cache(tmp_path, cfg).ensure(buckets, model, batch_size=4, progress=False)
    assert calls == [] and report.reused == IMAGES

    changed = next(iter(buckets.values()))[0].path
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(changed)
    report = _cache(tmp_path, cfg).ensure(buckets, model, batch_size=4, progress=False)
    assert calls == [changed]
    assert (report.built, report.reused) == (1, IMAGES - 1)


# --- text cache --------------------------------------------------------------------------------------


def test_text_cache_dedupes_and_includes_empty_caption(tmp_path: Path, model, monkeypatch) -> None:
    encoded: list[str] = []
    real_encode = model.encode_prompts

    def counting_encode(prompts: list[str]):
        encoded.extend(prompts)
        return real_encode(prompts)

    monkeypatch.setattr(model, "encode_prompts", counting_encode)
    cache = TextEmbedCache(tmp_path / "text", model)
    report = cache.ensure(["a red square", "a blue circle", "a red square"], batch_size=2, progress=False)
    assert (report.built, report.reused) == (3, 0)
    assert sorted(encoded) == ["", "a blue circle", "a red square"]
    assert len(_entries(tmp_path / "text")) == 3
    empty = cache.load("")
    assert set(empty) == {"prompt_embeds"} and empty["prompt_embeds"].shape == (77, 64)

    encoded.clear()
    fresh = TextEmbedCache(tmp_path / "text", model)
    again = fresh.ensure(["a blue circle", "a red square"], batch_size=2, progress=False)
    assert (again.built, again.reused, encoded) == (0, 3, [])
    assert torch.equal(fresh.load("a red square")["prompt_embeds"], cache.load("a red square")["prompt_embeds"])
