"""The VAE latent cache of one image dataset.

Encoding images is the slowest part of start-up, so each image's encoder output is stored once and
reused by every later run whose settings would produce the same tensor. An entry's key is the
fingerprint of everything that changes it: the image *content* (not its name or mtime), the target
size, the crop flag, the encoder (``model.fingerprint_parts()``) and the cache format version.

Hashing 10k images on every start would cost more than it saves, so content hashes are remembered
in ``<cache_dir_vae>/content_index.json`` by key together with the file's size and ``mtime_ns``
(its ETag in a bucket); an unchanged file is not read again.

Images are read through their dataset's storage backend (a folder, a bucket, a table), and the
entries themselves may live in a bucket (``cache_dir_vae: "s3://bucket/prefix"``, see
:class:`simpletuner.data.cache.store.BackendEntries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from simpletuner.data.backends import Backend, cache_backend, is_remote_cache
from simpletuner.data.backends.local import LocalBackend
from simpletuner.data.cache.store import (
    BackendEntries,
    CacheReport,
    LocalEntries,
    load_entry,
    TensorMemory,
    fingerprint,
)
from simpletuner.data.images import CorruptImageError, load_image_tensor
from simpletuner.data.metadata import ImageRecord

logger = logging.getLogger(__name__)

CONTENT_INDEX_NAME = "content_index.json"
_CONTENT_INDEX_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20

Size = tuple[int, int]


def hash_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_bytes(data: bytes) -> str:
    """sha256 hex digest of an image read from a bucket or a table."""
    return hashlib.sha256(data).hexdigest()


class ContentIndex:
    """Content hashes by image key, trusted while the backend's ``stat`` of the file is unchanged
    (size and mtime_ns on disk, size and ETag in a bucket).

    A missing or unreadable index is treated as empty: it is only an accelerator.
    """

    def __init__(self, entries: LocalEntries | BackendEntries, images: Backend) -> None:
        self.entries = entries
        self.images = images
        self._entries = self._read()
        self._dirty = False

    def content_hash(self, key: str) -> str:
        """The sha256 of the image ``key``, from the index when its stat still matches.

        Raises:
            OSError: the file cannot be stat'ed or read (e.g. deleted since the scan).
        """
        stat = self.images.stat(key)
        known = self._entries.get(key)
        if stat is not None and known and all(known.get(name) == value for name, value in stat.items()):
            return str(known["sha256"])
        local = self.images.local_path(key)
        # Looked up through the module so tests can count hashing calls.
        digest = hash_file(local) if local is not None else hash_bytes(self.images.read_bytes(key))
        if stat is not None:
            self._entries[key] = {**stat, "sha256": digest}
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the index atomically, only when something changed."""
        if not self._dirty:
            return
        payload = {"version": _CONTENT_INDEX_VERSION, "files": self._entries}
        self.entries.write_text(CONTENT_INDEX_NAME, json.dumps(payload, sort_keys=True, indent=0) + "\n")
        self._dirty = False

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.entries.read_text(CONTENT_INDEX_NAME)
            if text is None:
                return {}
            payload = json.loads(text)
        except (OSError, ValueError) as exc:
            logger.debug("content index in %s is unreadable (%s); re-hashing files", self.entries, exc)
            return {}
        if not isinstance(payload, dict) or payload.get("version") != _CONTENT_INDEX_VERSION:
            return {}
        files = payload.get("files")
        return files if isinstance(files, dict) else {}


class VaeCache:
    """Latents (encoder mean and std, no batch dimension) of one image dataset, on disk and in RAM.

    Call :meth:`ensure` once at start-up; afterwards :meth:`load` returns an image's tensors from
    the key computed then, without hashing the file again.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        dataset_id: str,
        data_root: str | Path | None = None,
        crop: bool = False,
        memory: TensorMemory | None = None,
        images: Backend | None = None,
        entries: LocalEntries | BackendEntries | None = None,
    ) -> None:
        """``images`` reads the dataset's files (a local folder at ``data_root`` by default);
        ``entries`` stores the cache (``cache_dir`` on disk, or the bucket of an ``s3://`` URL)."""
        remote = is_remote_cache(cache_dir)
        self.cache_dir = cache_dir if remote else Path(cache_dir)
        self.dataset_id = dataset_id
        self.crop = crop
        self.memory = memory if memory is not None else TensorMemory()
        self.images = images if images is not None else LocalBackend(Path(data_root or "."))
        if entries is None:
            entries = BackendEntries(cache_backend(cache_dir)) if remote else LocalEntries(self.cache_dir)
        self.entries = entries
        self.index = ContentIndex(self.entries, self.images)
        self._keys: dict[tuple[Path | str, Size], str] = {}
        self._anchors: dict[Path | str, tuple[float, float]] = {}

    def ensure(
        self,
        records_by_bucket: dict[Size, list[ImageRecord]],
        model,
        batch_size: int,
        progress: bool = True,
        anchors: dict[Path, tuple[float, float]] | None = None,
    ) -> CacheReport:
        """Make sure every record has a valid entry for its bucket size, encoding what is missing.

        ``anchors`` places each image's crop window (see :mod:`simpletuner.data.geometry`); images
        not listed are centred. Undecodable images are skipped (one warning each) and listed in the
        report, so the caller can drop them from its buckets; the rest of the dataset is still cached.
        """
        self._anchors = dict(anchors or {})
        if batch_size < 1:
            raise ValueError(f"vae batch size must be at least 1, got {batch_size}")
        report = CacheReport()
        model_parts = model.fingerprint_parts()
        pending: dict[Size, list[ImageRecord]] = {}
        for size, records in records_by_bucket.items():
            for record in records:
                key = self._key_for(record, size, model_parts, report)
                if key is None:
                    continue
                cached = self.entries.read(key)
                if cached is None:
                    pending.setdefault(size, []).append(record)
                else:
                    self.memory.put(key, cached)
                    report.reused += 1
        self.index.save()  # hashes survive even if encoding below is interrupted
        self._build(pending, model, batch_size, progress, report)
        return report

    def load(self, record: ImageRecord, size: Size) -> dict[str, torch.Tensor]:
        """The cached tensors of ``record`` at bucket ``size``; from RAM when they fit the budget.

        Raises:
            KeyError: ``ensure`` has not covered this record and size.
            CacheReadError: the entry went missing or corrupt after ``ensure`` checked it.
        """
        key = self._keys.get((record.path, tuple(size)))
        if key is None:
            raise KeyError(f"{record.path} at {size[0]}x{size[1]} is not in the latent cache of "
                           f"dataset {self.dataset_id!r}; call ensure() first")
        return load_entry(self.memory, self.entries, key, f"latents of {record.path}")

    # --- internals -----------------------------------------------------------------------------------

    def _key_for(self, record: ImageRecord, size: Size, model_parts: dict, report: CacheReport) -> str | None:
        """Fingerprint of the entry for ``record`` at ``size``; None (recorded as skipped) if unreadable."""
        try:
            content = self.index.content_hash(self._image_key(record))
        except OSError as exc:
            reason = f"cannot read image file: {type(exc).__name__}: {exc}"
            logger.warning("dataset %s: skipping %s: %s", self.dataset_id, record.path, reason)
            report.skipped.append((record.path, reason))
            return None
        key = fingerprint(kind="vae_latents", content_sha256=content, size=list(size), crop=self.crop,
                          anchor=list(self._anchor(record)), model=model_parts)
        self._keys[(record.path, tuple(size))] = key
        return key

    def _anchor(self, record: ImageRecord) -> tuple[float, float]:
        return self._anchors.get(record.path, (0.5, 0.5))

    def _image_key(self, record: ImageRecord) -> str:
        """The record's key in the image backend (records built by hand carry only a local path)."""
        if record.key is not None:
            return record.key
        root = getattr(self.images, "root", Path("."))
        try:
            return Path(os.path.relpath(record.path, root)).as_posix()
        except ValueError:  # another drive on Windows
            return Path(record.path).resolve().as_posix()

    def _decode(self, record: ImageRecord, size: Size) -> torch.Tensor:
        """The record's pixels at ``size``, read through the image backend."""
        key = self._image_key(record)
        local = self.images.local_path(key)
        try:
            source = local if local is not None else self.images.read_bytes(key)
        except FileNotFoundError as exc:
            raise CorruptImageError(f"{record.path}: cannot read image: {exc}") from exc
        return load_image_tensor(source, size, anchor=self._anchor(record), name=str(record.path))

    def _build(self, pending: dict[Size, list[ImageRecord]], model, batch_size: int, progress: bool,
               report: CacheReport) -> None:
        """Decode and encode the pending records bucket by bucket, ``batch_size`` at a time."""
        total = sum(len(records) for records in pending.values())
        with tqdm(total=total, desc=f"caching latents {self.dataset_id}", unit="img",
                  disable=not progress or total == 0) as bar:
            for size, records in pending.items():
                for start in range(0, len(records), batch_size):
                    chunk = records[start : start + batch_size]
                    report.built += self._encode_chunk(chunk, size, model, report)
                    bar.update(len(chunk))

    def _encode_chunk(self, chunk: list[ImageRecord], size: Size, model, report: CacheReport) -> int:
        """Encode one batch of same-size images and write their entries; returns how many were written."""
        decoded: list[tuple[ImageRecord, torch.Tensor]] = []
        for record in chunk:
            try:
                decoded.append((record, self._decode(record, size)))
            except CorruptImageError as exc:
                logger.warning("dataset %s: skipping %s", self.dataset_id, exc)
                report.skipped.append((record.path, str(exc)))
        if not decoded:
            return 0
        outputs = model.encode_images(torch.stack([pixels for _, pixels in decoded]))
        for index, (record, _) in enumerate(decoded):
            key = self._keys[(record.path, size)]
            tensors = {name: value[index].detach().to("cpu").clone() for name, value in outputs.items()}
            self.entries.write(key, tensors, {"fingerprint": key, "source": str(record.path)})
            self.memory.put(key, tensors)
        return len(decoded)
