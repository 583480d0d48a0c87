"""The VAE latent cache of one image dataset.

Encoding images is the slowest part of start-up, so each image's encoder output is stored once and
reused by every later run whose settings would produce the same tensor. An entry's key is the
fingerprint of everything that changes it: the image *content* (not its name or mtime), the target
size, the crop flag, the encoder (``model.fingerprint_parts()``) and the cache format version.

Hashing 10k images on every start would cost more than it saves, so content hashes are remembered
in ``<cache_dir_vae>/content_index.json`` by relative path together with the file's size and
``mtime_ns``; an unchanged file is not read again.
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

from simpletuner.data.cache.store import (
    CacheReport,
    load_entry,
    TensorMemory,
    entry_path,
    fingerprint,
    read_entry,
    write_entry,
    write_text_atomic,
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


class ContentIndex:
    """Content hashes by relative path, trusted while a file's (size, mtime_ns) is unchanged.

    A missing or unreadable index is treated as empty: it is only an accelerator.
    """

    def __init__(self, path: Path, root: Path) -> None:
        self.path = Path(path)
        self.root = Path(root)
        self._entries = self._read()
        self._dirty = False

    def content_hash(self, file: Path) -> str:
        """The sha256 of ``file``, from the index when its size and mtime still match.

        Raises:
            OSError: the file cannot be stat'ed or read (e.g. deleted since the scan).
        """
        stat = os.stat(file)
        key = self._relative_key(file)
        known = self._entries.get(key)
        if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            return str(known["sha256"])
        # Looked up through the module so tests can count hashing calls.
        digest = hash_file(file)
        self._entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the index atomically, only when something changed."""
        if not self._dirty:
            return
        payload = {"version": _CONTENT_INDEX_VERSION, "files": self._entries}
        write_text_atomic(self.path, json.dumps(payload, sort_keys=True, indent=0) + "\n")
        self._dirty = False

    def _relative_key(self, file: Path) -> str:
        """POSIX path relative to the dataset root, so moving the whole dataset keeps the index."""
        try:
            return Path(os.path.relpath(file, self.root)).as_posix()
        except ValueError:  # another drive on Windows
            return Path(file).resolve().as_posix()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.debug("content index %s is unreadable (%s); re-hashing files", self.path, exc)
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
        data_root: str | Path,
        crop: bool = False,
        memory: TensorMemory | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.dataset_id = dataset_id
        self.crop = crop
        self.memory = memory if memory is not None else TensorMemory()
        self.index = ContentIndex(self.cache_dir / CONTENT_INDEX_NAME, Path(data_root))
        self._keys: dict[tuple[Path, Size], str] = {}
        self._anchors: dict[Path, tuple[float, float]] = {}

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
                cached = read_entry(entry_path(self.cache_dir, key), key)
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
        return load_entry(self.memory, self.cache_dir, key, f"latents of {record.path}")

    # --- internals -----------------------------------------------------------------------------------

    def _key_for(self, record: ImageRecord, size: Size, model_parts: dict, report: CacheReport) -> str | None:
        """Fingerprint of the entry for ``record`` at ``size``; None (recorded as skipped) if unreadable."""
        try:
            content = self.index.content_hash(record.path)
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
                decoded.append((record, load_image_tensor(record.path, size, anchor=self._anchor(record))))
            except CorruptImageError as exc:
                logger.warning("dataset %s: skipping %s", self.dataset_id, exc)
                report.skipped.append((record.path, str(exc)))
        if not decoded:
            return 0
        outputs = model.encode_images(torch.stack([pixels for _, pixels in decoded]))
        for index, (record, _) in enumerate(decoded):
            key = self._keys[(record.path, size)]
            tensors = {name: value[index].detach().to("cpu").clone() for name, value in outputs.items()}
            write_entry(entry_path(self.cache_dir, key), tensors, {"fingerprint": key, "source": str(record.path)})
            self.memory.put(key, tensors)
        return len(decoded)
