"""The VAE latent cache of one image dataset.

Encoding images is the slowest part of start-up, so each image's encoder output is stored once and
reused by every later run whose settings would produce the same tensor. An entry's key is the
fingerprint of everything that changes it: the image *content* (not its name or mtime), the target
size, the crop flag, the encoder (``model.latent_fingerprint_parts()``) and the cache format version.

Hashing 10k images on every start would cost more than it saves, so content hashes are remembered
in ``<cache_dir_vae>/content_index.json`` by key together with the file's size and ``mtime_ns``
(its ETag in a bucket); an unchanged file is not read again.

Images are read through their dataset's storage backend (a folder, a bucket, a table), and the
entries themselves may live in a bucket (``cache_dir_vae: "s3://bucket/prefix"``, see
:class:`simpletuner.data.cache.store.BackendEntries`).

The index also remembers which entry each image was last cached as (size, crop window, encoder).
When the image is now placed in another bucket, ``--vae_cache_scan_behaviour`` decides:
``recreate`` deletes that entry and encodes the image at its new size; ``sync`` keeps the entry
and moves the image back to the bucket it was cached at (:attr:`CacheReport.moved`).

Modes (``--vae_cache_ondemand`` / ``--vae_cache_disable``): ``upfront`` encodes every missing
entry at start-up; ``ondemand`` encodes a missing entry the first time a batch needs it (and keeps
it); ``disable`` encodes every batch and never writes or keeps latents.

Encoding overlaps I/O with compute: bytes of remote images are fetched ahead by a pool of threads
(``--read_batch_size`` in flight), pixels are decoded and resized ahead by another
(``--image_processing_batch_size`` in flight, ``--max_workers`` threads), and entries for a bucket
are written in groups of ``--write_batch_size`` (in parallel when the cache is a bucket).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from simpletuner.data.backends import Backend, cache_backend, is_remote_cache
from simpletuner.data.backends.local import LocalBackend
from simpletuner.data.cache.store import (
    BackendEntries,
    CacheReport,
    CacheReadError,
    LocalEntries,
    TensorMemory,
    fingerprint,
)
from simpletuner.data.images import CorruptImageError, load_image_tensor
from simpletuner.data.metadata import ImageRecord
from simpletuner.data.parallel import ordered_map

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

    A missing or unreadable index is treated as empty: it is only an accelerator. ``writes`` is False on
    every process but the main one: they run after it and share its file, so they only read it.
    """

    def __init__(self, entries: LocalEntries | BackendEntries, images: Backend, writes: bool = True) -> None:
        self.entries = entries
        self.images = images
        self.writes = writes
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

    def known_hash(self, key: str) -> str | None:
        """The indexed hash of ``key`` without checking the file (``skip_file_discovery: vae``)."""
        known = self._entries.get(key)
        return str(known["sha256"]) if known and "sha256" in known else None

    def latent_of(self, key: str) -> dict[str, Any] | None:
        """What image ``key`` was last cached as: ``{"entry", "size", "crop", "anchor", "model"}``."""
        known = self._entries.get(key)
        return known.get("latent") if known else None

    def set_latent(self, key: str, latent: dict[str, Any]) -> None:
        """Remember the entry image ``key`` is now cached as (only for files whose hash is indexed)."""
        known = self._entries.get(key)
        if known is not None and known.get("latent") != latent:
            known["latent"] = latent
            self._dirty = True

    def save(self) -> None:
        """Write the index atomically, only when something changed, and only from the main process
        (``writes``): the others run after it and share its file."""
        if not self._dirty or not self.writes:
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


#: ``--vae_cache_scan_behaviour`` choices; None (the class default) leaves entries of other sizes alone.
SCAN_BEHAVIOURS = ("recreate", "sync")
#: Cache modes, see the module docstring.
CACHE_MODES = ("upfront", "ondemand", "disable")


@dataclass(frozen=True)
class VaeCacheOptions:
    """How a :class:`VaeCache` builds and keeps entries (all default to the simple sequential path).

    Attributes:
        mode: ``upfront``, ``ondemand`` or ``disable``.
        scan_behaviour: ``recreate``, ``sync`` or None (entries cached at another size are kept).
        workers: threads decoding and resizing images (1: no thread).
        read_ahead: remote images whose bytes are fetched ahead of decoding.
        process_ahead: images decoded and resized ahead of the encoder.
        write_batch_size: entries written together (in parallel to a bucket).
        log_each: log every file as it is encoded (``--print_filenames``).
        is_main_process: this process writes the shared content index; under a launcher the caller
            passes ``rank == 0`` (the other processes run after the main one and read its file).
    """

    mode: str = "upfront"
    scan_behaviour: str | None = None
    workers: int = 1
    read_ahead: int = 8
    process_ahead: int = 8
    write_batch_size: int = 64
    log_each: bool = False
    is_main_process: bool = True


class VaeCache:
    """Latents (encoder mean and std, no batch dimension) of one image dataset, on disk and in RAM.

    Call :meth:`ensure` once at start-up; afterwards :meth:`load` / :meth:`load_batch` return an
    image's tensors from the key computed then, without hashing the file again.
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
        options: VaeCacheOptions | None = None,
        compress: bool = False,
        label: str = "latents",
        flip: bool = False,
    ) -> None:
        """``images`` reads the dataset's files (a local folder at ``data_root`` by default);
        ``entries`` stores the cache (``cache_dir`` on disk, or the bucket of an ``s3://`` URL,
        gzipped when ``compress``); ``label`` names what it holds in progress bars. ``flip``
        (``random_flip``) caches the latents of each crop mirrored left to right: the pixels are
        flipped before encoding, and the flag is part of every entry's fingerprint."""
        remote = is_remote_cache(cache_dir)
        self.cache_dir = cache_dir if remote else Path(cache_dir)
        self.dataset_id = dataset_id
        self.label = label
        self.crop = crop
        self.flip = flip
        self.memory = memory if memory is not None else TensorMemory()
        self.images = images if images is not None else LocalBackend(Path(data_root or "."))
        if entries is None:
            entries = (BackendEntries(cache_backend(cache_dir), compress=compress) if remote
                       else LocalEntries(self.cache_dir, compress=compress))
        self.entries = entries
        self.options = options or VaeCacheOptions()
        if self.options.mode not in CACHE_MODES:
            raise ValueError(f"unknown VAE cache mode {self.options.mode!r}; use one of {CACHE_MODES}")
        if self.options.scan_behaviour not in (None, *SCAN_BEHAVIOURS):
            raise ValueError(f"unknown vae_cache_scan_behaviour {self.options.scan_behaviour!r}; "
                             f"use one of {SCAN_BEHAVIOURS}")
        self.index = ContentIndex(self.entries, self.images, writes=self.options.is_main_process)
        self.model = None
        #: Called with (record, reason) when an image cannot be decoded (``delete_problematic_images``).
        self.on_problem: Callable[[ImageRecord, str], None] | None = None
        self._model_parts: dict = {}
        self._keys: dict[tuple[Path | str, Size], str] = {}
        self._content: dict[Path | str, str] = {}
        self._anchors: dict[Path | str, tuple[float, float]] = {}
        self._bad: set[Path | str] = set()
        self._self_healing = self.options.mode != "upfront"

    @property
    def mode(self) -> str:
        return self.options.mode

    def anchor_of(self, record: ImageRecord) -> tuple[float, float]:
        """Where ``record``'s crop window sits now (conditioning images are cropped the same way)."""
        return self._anchor(record)

    def ensure(
        self,
        records_by_bucket: dict[Size, list[ImageRecord]],
        model,
        batch_size: int,
        progress: bool = True,
        anchors: dict[Path, tuple[float, float]] | None = None,
        verify: bool = True,
    ) -> CacheReport:
        """Make sure every record has a valid entry for its bucket size, encoding what is missing.

        ``anchors`` places each image's crop window (see :mod:`simpletuner.data.geometry`); images
        not listed are centred. Undecodable images are skipped (one warning each) and listed in the
        report, so the caller can drop them from its buckets; the rest of the dataset is still cached.
        In ``ondemand`` mode missing entries are only counted (``report.deferred``); in ``disable``
        mode nothing is read or hashed. ``verify=False`` (``skip_file_discovery: vae``) trusts the
        content index and reads no entry now: entries are verified when first loaded.
        """
        self._anchors = dict(anchors or {})
        if batch_size < 1:
            raise ValueError(f"vae batch size must be at least 1, got {batch_size}")
        self.model = model
        report = CacheReport()
        if self.mode == "disable":
            return report
        # text settings that families add to fingerprint_parts() must not invalidate latents
        self._model_parts = (getattr(model, "latent_fingerprint_parts", None) or model.fingerprint_parts)()
        if not verify:
            self._self_healing = True
        pending: dict[Size, list[ImageRecord]] = {}
        for size, records in records_by_bucket.items():
            for record in records:
                key = self._key_for(record, size, self._model_parts, report, trust_index=not verify)
                if key is None or not verify:
                    continue
                cached = self.entries.read(key)
                if cached is None:
                    cached, size_now = self._reconcile(record, size, key, report)
                    if cached is None:
                        pending.setdefault(size, []).append(record)
                        continue
                    key = self._keys[(record.path, size_now)]
                else:
                    size_now = size
                self.memory.put(key, cached)
                self._remember(record, size_now, key)
                report.reused += 1
        if self.mode == "ondemand":
            report.deferred = sum(len(records) for records in pending.values())
            self.index.save()
            return report
        self.index.save()  # hashes survive even if encoding below is interrupted
        self._build(pending, model, batch_size, progress, report)
        self.index.save()
        return report

    def load(self, record: ImageRecord, size: Size) -> dict[str, torch.Tensor]:
        """The cached tensors of ``record`` at bucket ``size``; from RAM when they fit the budget.

        Raises:
            KeyError: ``ensure`` has not covered this record and size.
            CacheReadError: the entry went missing or corrupt after ``ensure`` checked it (in
                ``upfront`` mode; the other modes encode it again).
        """
        tensors = self.load_batch([record], size)[0]
        if tensors is None:
            raise CacheReadError(f"{record.path} cannot be decoded; it was left out")
        return tensors

    def load_batch(self, records: list[ImageRecord], size: Size) -> list[dict[str, torch.Tensor] | None]:
        """The tensors of each record at ``size``, encoding the missing ones in one VAE call when
        the mode allows it. None marks an image that cannot be decoded (logged once, then left out).
        """
        size = tuple(size)
        results: list[dict[str, torch.Tensor] | None] = [None] * len(records)
        missing: list[int] = []
        for index, record in enumerate(records):
            if record.path in self._bad:
                continue
            if self.mode == "disable":
                missing.append(index)
                continue
            key = self._keys.get((record.path, size))
            if key is None:
                if not self._self_healing or record.path not in self._content:
                    raise KeyError(f"{record.path} at {size[0]}x{size[1]} is not in the latent cache of "
                                   f"dataset {self.dataset_id!r}; call ensure() first")
                key = self._fingerprint(record, size)
                self._keys[(record.path, size)] = key
            tensors = self.memory.get(key)
            if tensors is None:
                tensors = self.entries.read(key)
                if tensors is None:
                    if not self._self_healing:
                        raise CacheReadError(f"cache entry {self.entries.location(key)} (latents of {record.path}) is "
                                             "missing or corrupt; restart training and it will be rebuilt")
                    missing.append(index)
                    continue
                self.memory.put(key, tensors)
            results[index] = tensors
        if missing:
            encoded = self._encode_now([records[index] for index in missing], size)
            for index, tensors in zip(missing, encoded):
                results[index] = tensors
        return results

    def start_epoch(self, epoch: int, anchor_for: Callable[[ImageRecord, int], tuple[float, float]] | None = None,
                    records: list[ImageRecord] | None = None) -> int:
        """``vae_cache_clear_each_epoch``: delete this dataset's entries (disk and RAM) so they are
        encoded again when next used, with crop windows re-drawn by ``anchor_for(record, epoch)``.

        Returns how many entries were deleted.
        """
        deleted = 0
        for key in set(self._keys.values()):
            self.memory.drop(key)
            try:
                self.entries.delete(key)
                deleted += 1
            except OSError as exc:
                logger.warning("dataset %s: cannot delete cache entry %s: %s", self.dataset_id,
                               self.entries.location(key), exc)
        self._keys.clear()
        if anchor_for is not None:
            for record in records or ():
                self._anchors[record.path] = anchor_for(record, epoch)
        self._self_healing = True
        logger.info("dataset %s: epoch %d: cleared %d cached latents (vae_cache_clear_each_epoch)",
                    self.dataset_id, epoch, deleted)
        return deleted

    # --- internals -----------------------------------------------------------------------------------

    def _key_for(self, record: ImageRecord, size: Size, model_parts: dict, report: CacheReport,
                 trust_index: bool = False) -> str | None:
        """Fingerprint of the entry for ``record`` at ``size``; None (recorded as skipped) if unreadable."""
        try:
            image_key = self._image_key(record)
            known = self.index.known_hash(image_key) if trust_index else None
            content = known or self.index.content_hash(image_key)
        except OSError as exc:
            reason = f"cannot read image file: {type(exc).__name__}: {exc}"
            logger.warning("dataset %s: skipping %s: %s", self.dataset_id, record.path, reason)
            report.skipped.append((record.path, reason))
            return None
        self._content[record.path] = content
        key = self._fingerprint(record, size, model_parts)
        self._keys[(record.path, tuple(size))] = key
        return key

    def _fingerprint(self, record: ImageRecord, size: Size, model_parts: dict | None = None,
                     anchor: tuple[float, float] | None = None, crop: bool | None = None) -> str:
        # ``flipped`` only when set, so the entries of unflipped caches keep their keys
        flipped = {"flipped": True} if self.flip else {}
        return fingerprint(kind="vae_latents", content_sha256=self._content[record.path], size=list(size),
                           crop=self.crop if crop is None else crop,
                           anchor=list(anchor if anchor is not None else self._anchor(record)),
                           model=model_parts if model_parts is not None else self._model_parts, **flipped)

    def _reconcile(self, record: ImageRecord, size: Size, key: str, report: CacheReport
                   ) -> tuple[dict[str, torch.Tensor] | None, Size]:
        """An image cached at another size (or crop) by the same encoder: delete that entry
        (``recreate``) or keep it and move the image to its size (``sync``)."""
        behaviour = self.options.scan_behaviour
        previous = self.index.latent_of(self._image_key(record)) if behaviour else None
        if not previous or previous.get("entry") == key or previous.get("model") != _model_hash(self._model_parts):
            return None, size
        old_size = tuple(previous["size"])
        old_anchor = tuple(previous["anchor"])
        old_key = self._fingerprint(record, old_size, anchor=old_anchor, crop=previous["crop"])
        if old_key != previous["entry"]:  # the image's content changed since: nothing to reconcile
            return None, size
        if behaviour == "recreate":
            self.memory.drop(old_key)
            try:
                self.entries.delete(old_key)
                report.recreated += 1
            except OSError as exc:
                logger.warning("dataset %s: cannot delete stale entry %s: %s", self.dataset_id,
                               self.entries.location(old_key), exc)
            return None, size
        cached = self.entries.read(old_key)
        if cached is None:
            return None, size
        del self._keys[(record.path, tuple(size))]
        self._keys[(record.path, old_size)] = old_key
        self._anchors[record.path] = old_anchor
        report.moved[record] = old_size
        return cached, old_size

    def _remember(self, record: ImageRecord, size: Size, key: str) -> None:
        """Note in the content index which entry the image is cached as."""
        self.index.set_latent(self._image_key(record), {
            "entry": key, "size": list(size), "crop": self.crop, "anchor": list(self._anchor(record)),
            "model": _model_hash(self._model_parts)})

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

    def _fetch(self, record: ImageRecord) -> Path | bytes | CorruptImageError:
        """The image as a local path, or its bytes from remote storage (the I/O stage)."""
        key = self._image_key(record)
        local = self.images.local_path(key)
        if local is not None:
            return local
        try:
            return self.images.read_bytes(key)
        except FileNotFoundError as exc:
            return CorruptImageError(f"{record.path}: cannot read image: {exc}")

    def _decode(self, record: ImageRecord, size: Size, source: Path | bytes | CorruptImageError | None = None
                ) -> torch.Tensor | CorruptImageError:
        """The record's pixels at ``size`` (the CPU stage), or the error saying why not."""
        source = self._fetch(record) if source is None else source
        if isinstance(source, CorruptImageError):
            return source
        if self.options.log_each:
            logger.info("dataset %s: encoding %s", self.dataset_id, record.path)
        try:
            return self._load_pixels(source, size, record)
        except CorruptImageError as exc:
            return exc

    def _load_pixels(self, source: Path | bytes, size: Size, record: ImageRecord) -> torch.Tensor:
        """Decode, resize and crop one image to ``size`` (a video cache decodes a clip instead),
        mirrored left to right for a ``flip`` cache (the crop window stays where it was chosen)."""
        pixels = load_image_tensor(source, size, anchor=self._anchor(record), name=str(record.path))
        return pixels.flip(-1) if self.flip else pixels

    def _decoded(self, jobs: list[tuple[Size, ImageRecord]]):
        """(size, record, pixels or error) for each job, in order, with I/O and decoding run ahead."""
        options = self.options
        remote = bool(jobs) and self.images.local_path(self._image_key(jobs[0][1])) is None
        fetched = ordered_map(lambda job: (job, self._fetch(job[1])), jobs,
                              options.workers if remote else 1, options.read_ahead)
        return ordered_map(lambda item: (item[0][0], item[0][1], self._decode(item[0][1], item[0][0], item[1])),
                           fetched, options.workers, options.process_ahead)

    def _build(self, pending: dict[Size, list[ImageRecord]], model, batch_size: int, progress: bool,
               report: CacheReport) -> None:
        """Decode and encode the pending records bucket by bucket, ``batch_size`` at a time."""
        jobs = [(size, record) for size, records in pending.items() for record in records]
        writer = _EntryWriter(self.entries, self.options.write_batch_size, self.options.workers)
        chunk: list[tuple[ImageRecord, torch.Tensor]] = []
        chunk_size: Size | None = None
        with tqdm(total=len(jobs), desc=f"caching {self.label} {self.dataset_id}", unit="img",
                  disable=not progress or not jobs) as bar:
            for size, record, pixels in self._decoded(jobs):
                if chunk and (size != chunk_size or len(chunk) == batch_size):
                    report.built += self._encode_chunk(chunk, chunk_size, model, writer)
                    bar.update(len(chunk))
                    chunk = []
                if isinstance(pixels, CorruptImageError):
                    self._problem(record, str(pixels))
                    report.skipped.append((record.path, str(pixels)))
                    bar.update(1)
                    continue
                chunk.append((record, pixels))
                chunk_size = size
            if chunk:
                report.built += self._encode_chunk(chunk, chunk_size, model, writer)
                bar.update(len(chunk))
        writer.flush()

    def _encode_chunk(self, chunk: list[tuple[ImageRecord, torch.Tensor]], size: Size, model,
                      writer: "_EntryWriter | None") -> int:
        """Encode one batch of same-size images and write their entries; returns how many."""
        outputs = model.encode_images(torch.stack([pixels for _, pixels in chunk]))
        for index, (record, _) in enumerate(chunk):
            key = self._keys[(record.path, tuple(size))]
            tensors = {name: value[index].detach().to("cpu").clone() for name, value in outputs.items()}
            if writer is not None:
                writer.add(key, tensors, {"fingerprint": key, "source": str(record.path)})
            self.memory.put(key, tensors)
            self._remember(record, size, key)
        return len(chunk)

    def _encode_now(self, records: list[ImageRecord], size: Size) -> list[dict[str, torch.Tensor] | None]:
        """Encode ``records`` during training (on-demand, disabled or self-healing cache)."""
        decoded = [(record, self._decode(record, size)) for record in records]
        good = []
        for record, pixels in decoded:
            if isinstance(pixels, CorruptImageError):
                self._bad.add(record.path)
                self._problem(record, str(pixels))
            else:
                good.append((record, pixels))
        if not good:
            return [None] * len(records)
        outputs = self.model.encode_images(torch.stack([pixels for _, pixels in good]))
        by_path: dict = {}
        writer = None if self.mode == "disable" else _EntryWriter(self.entries, len(good), 1)
        for index, (record, _) in enumerate(good):
            tensors = {name: value[index].detach().to("cpu").clone() for name, value in outputs.items()}
            by_path[record.path] = tensors
            if writer is not None:
                key = self._keys[(record.path, tuple(size))]
                writer.add(key, tensors, {"fingerprint": key, "source": str(record.path)})
                self.memory.put(key, tensors)
        if writer is not None:
            writer.flush()
        return [by_path.get(record.path) for record in records]

    def _problem(self, record: ImageRecord, reason: str) -> None:
        logger.warning("dataset %s: skipping %s", self.dataset_id, reason)
        if self.on_problem is not None:
            self.on_problem(record, reason)


class _EntryWriter:
    """Groups entry writes: ``batch`` at a time, in parallel threads when the cache is a bucket
    (each PUT waits on the network), one after the other on a local disk."""

    def __init__(self, entries: LocalEntries | BackendEntries, batch: int, workers: int) -> None:
        self.entries = entries
        self.batch = max(1, batch)
        self.workers = workers if getattr(entries, "remote", False) else 1
        self._pending: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]] = []

    def add(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self._pending.append((key, tensors, metadata))
        if len(self._pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for _ in ordered_map(lambda item: self.entries.write(*item), pending, self.workers, len(pending)):
            pass


def _model_hash(model_parts: dict) -> str:
    """A short identity of the encoder for the content index."""
    return hashlib.sha256(json.dumps(model_parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
