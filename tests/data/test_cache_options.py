"""Cache options: compression, stale-entry handling, on-demand/disabled caching, per-epoch clearing,
global cache folders, threaded encoding and S3 connection pools."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from simpletuner.data.backends.aws import S3Backend
from simpletuner.data.backends.local import LocalBackend
from simpletuner.data.build import build_training_data
from simpletuner.data.cache.store import RESERVED_TENSOR_NAMES, BackendEntries, read_entry, write_entry
from simpletuner.data.settings import resolve_dataset
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images

IMAGES = 4


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def _build(tmp_path: Path, model: FakeModel | None = None, entry: dict | None = None, **options):
    plan = make_plan(tmp_path, local("d", tmp_path / "d", **(entry or {})))
    return build_training_data(make_config(tmp_path, **options), model or FakeModel(), plan, show_progress=False)


def _all_latents(data) -> dict[str, torch.Tensor]:
    out = {}
    for _ in range(data.sampler.batches_per_epoch()):
        batch = data.next_batch()
        out.update(zip(batch["paths"], batch["latent_mean"]))
    return out


def test_compressed_entries_read_back_identically(tmp_path: Path) -> None:
    tensors = {"prompt_embeds": torch.cat([torch.randn(4, 8), torch.zeros(73, 8)])}  # padded like real embeds
    write_entry(tmp_path / "plain.safetensors", tensors, {"fingerprint": "k"})
    write_entry(tmp_path / "packed.safetensors", tensors, {"fingerprint": "k"}, compress=True)
    packed = (tmp_path / "packed.safetensors").read_bytes()
    assert packed[:2] == b"\x1f\x8b" and len(packed) < (tmp_path / "plain.safetensors").stat().st_size / 2
    assert torch.equal(read_entry(tmp_path / "packed.safetensors", "k")["prompt_embeds"], tensors["prompt_embeds"])
    (tmp_path / "cut.safetensors").write_bytes(packed[: len(packed) // 2])
    assert read_entry(tmp_path / "cut.safetensors", "k") is None  # a truncated compressed entry is rebuilt

    write_images(tmp_path / "d", IMAGES)
    first = _build(tmp_path, compress_disk_cache=True)
    assert all(path.read_bytes()[:2] == b"\x1f\x8b" for path in _entries(tmp_path / "cache"))
    assert all(path.read_bytes()[:2] == b"\x1f\x8b" for path in _entries(tmp_path / "text"))
    plain_reader = _build(tmp_path)  # the option off still reads compressed entries
    assert plain_reader.summaries[0].latents_reused == IMAGES and plain_reader.text_report.built == 0
    expected = _all_latents(first)
    for path, latent in _all_latents(plain_reader).items():
        assert torch.equal(latent, expected[path])


def _rewrite_in_metadata_only_format(path: Path) -> None:
    """Turn a current entry into what the store wrote before reserved tensors existed: the same
    tensors, with fingerprint and checksum only in the safetensors metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name not in RESERVED_TENSOR_NAMES}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_entries_in_the_older_format_are_rebuilt_in_place(tmp_path: Path, caplog) -> None:
    import logging

    write_images(tmp_path / "d", IMAGES)
    first = _build(tmp_path)
    expected = _all_latents(first)
    entries = _entries(tmp_path / "cache") + _entries(tmp_path / "text")
    assert len(entries) == IMAGES + first.text_report.built
    for path in entries:
        _rewrite_in_metadata_only_format(path)

    with caplog.at_level(logging.DEBUG, logger="simpletuner.data.cache.store"):
        model = FakeModel()
        rebuilt = _build(tmp_path, model)
    assert caplog.text.count("written in an older entry format") == len(entries)
    summary = rebuilt.summaries[0]
    assert (summary.latents_built, summary.latents_reused, model.images_encoded) == (IMAGES, 0, IMAGES)
    assert (rebuilt.text_report.built, rebuilt.text_report.reused) == (first.text_report.built, 0)
    assert _entries(tmp_path / "cache") + _entries(tmp_path / "text") == entries  # same names, no orphans
    for path in entries:  # each one rewritten in the current format
        assert RESERVED_TENSOR_NAMES <= set(safetensors.torch.load_file(str(path)))
    for path, latent in _all_latents(rebuilt).items():
        assert torch.equal(latent, expected[path])
    assert not RESERVED_TENSOR_NAMES.intersection(rebuilt.next_batch())
    assert _build(tmp_path).summaries[0].latents_reused == IMAGES


def test_scan_behaviour_recreate_deletes_stale_entries_and_sync_keeps_their_size(tmp_path: Path) -> None:
    write_images(tmp_path / "d", IMAGES)
    _build(tmp_path)
    assert len(_entries(tmp_path / "cache" / "vae")) == IMAGES
    recreated = _build(tmp_path, resolution=128, vae_cache_scan_behaviour="recreate")
    summary = recreated.summaries[0]
    assert (summary.latents_recreated, summary.latents_built, summary.buckets) == (IMAGES, IMAGES, {(128, 128): IMAGES})
    assert len(_entries(tmp_path / "cache" / "vae")) == IMAGES  # the 64 px entries are gone

    synced = _build(tmp_path, resolution=64, vae_cache_scan_behaviour="sync")
    summary = synced.summaries[0]
    assert (summary.latents_moved, summary.latents_built, summary.buckets) == (IMAGES, 0, {(128, 128): IMAGES})
    assert "kept at their cached size (sync)" in synced.describe()
    assert synced.next_batch()["latent_mean"].shape == (2, 3, 16, 16)


def test_ondemand_encodes_at_first_use_and_keeps_entries(tmp_path: Path) -> None:
    write_images(tmp_path / "d", IMAGES)
    model = FakeModel()
    data = _build(tmp_path, model, vae_cache_ondemand=True)
    assert model.images_encoded == 0 and data.summaries[0].latents_deferred == IMAGES
    data.next_batch()
    assert model.images_encoded == 2 and len(_entries(tmp_path / "cache" / "vae")) == 2
    data.next_batch()
    again = _build(tmp_path, FakeModel(), vae_cache_ondemand=True)
    assert again.summaries[0].latents_reused == IMAGES


def test_disabled_cache_encodes_every_batch_and_writes_nothing(tmp_path: Path) -> None:
    write_images(tmp_path / "d", IMAGES)
    model = FakeModel()
    data = _build(tmp_path, model, vae_cache_disable=True)
    assert model.images_encoded == 0
    batches = [data.next_batch() for _ in range(4)]
    assert model.images_encoded == 8
    assert _entries(tmp_path / "cache" / "vae") == []
    upfront = _all_latents(_build(tmp_path))
    for batch in batches:
        for path, latent in zip(batch["paths"], batch["latent_mean"]):
            assert torch.equal(latent, upfront[path])


def _textured(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.add.outer(5 * np.arange(128), 3 * np.arange(64)).astype(np.uint8)  # 64 x 128: room to crop
    for index in range(count):
        Image.fromarray(np.stack([grid * (index + 1), grid // 2, grid], axis=-1)).save(folder / f"t_{index}.png")
        (folder / f"t_{index}.txt").write_text(f"texture {index}", encoding="utf-8")


def test_clear_each_epoch_deletes_latents_and_redraws_random_crops(tmp_path: Path) -> None:
    _textured(tmp_path / "d", IMAGES)
    entry = {"vae_cache_clear_each_epoch": True, "crop": True, "crop_style": "random", "resolution": 32}
    model = FakeModel()
    data = _build(tmp_path, model, entry)
    first_epoch = _all_latents(data)
    assert model.images_encoded == IMAGES
    second_epoch = _all_latents(data)
    assert model.images_encoded == 2 * IMAGES  # cleared at the epoch change, encoded again when used
    assert any(not torch.equal(first_epoch[p], second_epoch[p]) for p in first_epoch)  # new crop windows
    replay = _build(tmp_path, FakeModel(), entry)  # a new run: the same crops epoch by epoch
    for expected in (first_epoch, second_epoch):
        replayed = _all_latents(replay)
        assert all(torch.equal(replayed[p], expected[p]) for p in expected)


def test_hash_filenames_is_accepted_and_entry_names_are_always_hashes(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    _build(tmp_path, entry={"hash_filenames": False})
    names = [path.stem for path in _entries(tmp_path / "cache" / "vae")]
    assert len(names) == 2 and all(len(name) == 64 and int(name, 16) >= 0 for name in names)


def test_global_cache_folders(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    plan = make_plan(tmp_path, local("d", tmp_path / "d"))
    plan = plan.__class__(plan.images, plan.text_embeds.__class__(id="text", cache_dir=None))
    config = make_config(tmp_path, cache_dir_vae=str(tmp_path / "latents"), cache_dir_text=str(tmp_path / "prompts"))
    build_training_data(config, FakeModel(), plan, show_progress=False)
    assert len(_entries(tmp_path / "latents" / "d")) == 2 and len(_entries(tmp_path / "prompts")) == 3
    assert resolve_dataset(plan.images[0], make_config(tmp_path)).cache_dir_vae == str(tmp_path / "cache" / "vae" / "d")


def test_threaded_encoding_gives_the_same_latents(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 6)
    threaded = _all_latents(_build(tmp_path, max_workers=3, read_batch_size=2, image_processing_batch_size=2))
    for entry in _entries(tmp_path / "cache"):
        entry.unlink()
    sequential = _all_latents(_build(tmp_path, max_workers=1))
    assert threaded.keys() == sequential.keys()
    assert all(torch.equal(threaded[p], sequential[p]) for p in threaded)


def test_grouped_writes_to_a_bucket_style_store(tmp_path: Path) -> None:
    from simpletuner.data.cache.vae import _EntryWriter

    entries = BackendEntries(LocalBackend(tmp_path / "bucket"))
    writer = _EntryWriter(entries, batch=3, workers=2)
    for index in range(5):
        writer.add(f"{index:064x}", {"x": torch.full((2,), float(index))}, {"fingerprint": f"{index:064x}"})
    assert len(_entries(tmp_path / "bucket")) == 3  # the first group of three went out together
    writer.flush()
    assert [entries.read(f"{index:064x}")["x"][0].item() for index in range(5)] == [0, 1, 2, 3, 4]


def test_aws_max_pool_connections_reaches_the_boto_client(tmp_path: Path) -> None:
    backend = S3Backend(bucket="b", endpoint_url="http://127.0.0.1:9", access_key_id="k", secret_access_key="s",
                        region_name="us-east-1", max_pool_connections=7)
    assert backend._client_or_create().meta.config.max_pool_connections == 7
    plan = make_plan(tmp_path, {"id": "s3", "type": "aws", "aws_bucket_name": "b"}, local("d", tmp_path))
    resolved = resolve_dataset(plan.images[0], make_config(tmp_path, aws_max_pool_connections=5))
    assert resolved.aws.max_pool_connections == 5
    assert S3Backend.from_settings(resolved.aws).max_pool_connections == 5
