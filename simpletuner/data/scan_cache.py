"""The stored scan of a dataset: skip work at the next start-up without changing what is trained.

After every scan, ``scan_metadata.json`` beside the dataset's latents (``cache_dir_vae``, a folder or
a bucket) records the listed files, each image's size with the file's stat (size and mtime, or ETag),
the usable records with their captions, the skipped files with their reasons, and a fingerprint of
the settings that shaped the captions. It is used three ways:

* **Always:** an image whose stat is unchanged is not opened again to read its size (in a bucket
  that saves one ranged GET per image). ``--metadata_update_interval N`` also saves the partial scan
  every N seconds, so a scan interrupted after an hour resumes instead of starting over.
* **``preserve_data_backend_cache``:** the stored listing replaces listing the storage again (a
  large bucket is listed once); new files are then not seen.
* **``skip_file_discovery`` with ``metadata`` or ``aspect``:** the stored records are used as they
  are; no file is opened. When the caption settings changed since, the dataset is scanned again
  with a warning, unless ``--override_dataset_config`` says to use the stored captions anyway.

With a stored listing, a file that has disappeared stops the run with a message naming it, unless
``--ignore_missing_files`` is set (then it is skipped, with its reason in the summary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from simpletuner.data.backends import Backend, DatasetSource
from simpletuner.data.caption_rules import CaptionRules
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.metadata import ImageRecord, ScanResult, scan_image_dataset
from simpletuner.options import ConfigError

logger = logging.getLogger(__name__)

SCAN_CACHE_NAME = "scan_metadata.json"
_VERSION = 1


class MissingFilesError(ConfigError):
    """Files of a stored listing are gone; the message names them and the two fixes."""


def scan_settings_fingerprint(cfg: ImageDatasetConfig, rules: CaptionRules) -> str:
    """What decides a dataset's file list and captions (never credentials)."""
    aws = cfg.aws
    parts: dict[str, Any] = {
        "type": cfg.type, "instance_data_dir": cfg.instance_data_dir, "metadata_backend": cfg.metadata_backend,
        "bucket": [aws.bucket_name, aws.data_prefix, aws.endpoint_url] if aws else None,
        "parquet": dataclasses.asdict(cfg.parquet) if cfg.parquet else None,
        "huggingface": dataclasses.asdict(cfg.huggingface) if cfg.huggingface else None,
        "dataset_name": cfg.dataset_name, "caption_strategy": cfg.caption_strategy,
        "instance_prompt": rules.instance_prompt, "prepend": rules.prepend, "only": rules.only,
        "split_lines": rules.split_lines, "filters": [rule.source for rule in rules.filters],
    }
    if cfg.dataset_type == "video":  # another file list (videos); image datasets keep their fingerprint
        parts["dataset_type"] = "video"
    if rules.shuffle is not None:  # other captions; datasets without it keep their fingerprint
        parts["caption_shuffle"] = rules.shuffle.describe()
    if rules.fallback is not None:
        parts["caption_fallback"] = rules.fallback
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@dataclass
class StoredScan:
    """The content of ``scan_metadata.json``."""

    settings: str = ""
    complete: bool = False
    files: list[str] = field(default_factory=list)
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)


class ScanCache:
    """Reads and writes one dataset's stored scan through its cache entries' text files.

    ``is_main_process``: under a launcher only the main process (rank 0) writes the shared file; the
    others scan after it and read what it stored. The caller knows the rank, this class does not look.
    """

    def __init__(self, entries, dataset_id: str, settings: str, update_interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, is_main_process: bool = True) -> None:
        self.entries = entries
        self.is_main_process = is_main_process
        self.dataset_id = dataset_id
        self.settings = settings
        self.update_interval = update_interval
        self.clock = clock
        self.stored = self._read()
        self._sizes: dict[str, dict[str, Any]] = dict(self.stored.sizes) if self.stored else {}
        self._backend: Backend | None = None
        self._last_save = clock()

    # --- reading -----------------------------------------------------------------------------------

    def _read(self) -> StoredScan | None:
        try:
            text = self.entries.read_text(SCAN_CACHE_NAME)
            payload = json.loads(text) if text else None
        except (OSError, ValueError) as exc:
            logger.debug("dataset %s: stored scan unreadable (%s); scanning", self.dataset_id, exc)
            return None
        if not isinstance(payload, dict) or payload.get("version") != _VERSION:
            return None
        fields = {f.name for f in dataclasses.fields(StoredScan)}
        return StoredScan(**{key: value for key, value in payload.items() if key in fields})

    def usable_records(self, override: bool) -> bool:
        """Whether the stored records may replace a scan (complete, and same settings or overridden)."""
        if not self.stored or not self.stored.complete:
            return False
        if self.stored.settings == self.settings or override:
            return True
        logger.warning("dataset %s: caption or storage settings changed since the stored scan; scanning again "
                       "(set --override_dataset_config to use the stored scan anyway)", self.dataset_id)
        return False

    def restore(self, backend: Backend, dataset_id: str) -> ScanResult:
        """The stored scan as a :class:`ScanResult` (no file is opened)."""
        stored = self.stored
        result = ScanResult(listed=list(stored.files))
        for row in stored.records:
            captions = tuple(row["captions"])
            if "frames" in row:  # a video dataset's record
                from simpletuner.data.video import VideoInfo, video_record

                info = VideoInfo(int(row["width"]), int(row["height"]), int(row["frames"]), row.get("fps"))
                result.records.append(video_record(backend.locate(row["key"]), info, captions[0], dataset_id,
                                                   row["key"], captions))
                continue
            result.records.append(ImageRecord(backend.locate(row["key"]), int(row["width"]), int(row["height"]),
                                              captions[0], dataset_id, key=row["key"], captions=captions))
        for key, reason in stored.skipped:
            result.skipped.append((backend.locate(key), reason))
            result.skipped_keys.append(key)
        return result

    def size_hint(self, backend: Backend) -> Callable[[str], tuple[int, int] | None]:
        """A known size for a key whose file is unchanged (same stat), else None."""
        self._backend = backend

        def hint(key: str) -> tuple[int, int] | None:
            known = self._sizes.get(key)
            if not known:
                return None
            try:
                stat = backend.stat(key)
            except OSError:
                return None
            return tuple(known["size"]) if stat is not None and stat == known.get("stat") else None

        return hint

    # --- writing -----------------------------------------------------------------------------------

    def on_scanned(self, key: str, size: tuple[int, int] | None) -> None:
        """Remember one image's size; save the partial scan every ``update_interval`` seconds."""
        if size is not None and self._backend is not None and key not in self._sizes:
            try:
                stat = self._backend.stat(key)
            except OSError:
                stat = None
            if stat is not None:
                self._sizes[key] = {"stat": stat, "size": list(size)}
        if self.update_interval is not None and self.clock() - self._last_save >= self.update_interval:
            self._write(StoredScan(settings=self.settings, complete=False, sizes=self._sizes))

    def save(self, result: ScanResult) -> None:
        """Store a finished scan (only when it differs from what is stored)."""
        records = [{"key": r.key, "width": r.width, "height": r.height, "captions": list(r.caption_variants),
                    **({"frames": r.frames, "fps": r.fps} if hasattr(r, "frames") else {})}
                   for r in result.records if r.key is not None]
        stored = StoredScan(settings=self.settings, complete=True, files=list(result.listed),
                            sizes={key: value for key, value in self._sizes.items()},
                            records=records, skipped=[[key, reason] for key, (_, reason)
                                                      in zip(result.skipped_keys, result.skipped)])
        if self.stored is not None and dataclasses.asdict(stored) == dataclasses.asdict(self.stored):
            return
        self._write(stored)
        self.stored = stored

    def _write(self, stored: StoredScan) -> None:
        if not self.is_main_process:  # under a launcher only the main process writes shared files
            return
        payload = {"version": _VERSION, **dataclasses.asdict(stored)}
        try:
            self.entries.write_text(SCAN_CACHE_NAME, json.dumps(payload, sort_keys=True) + "\n")
        except OSError as exc:  # an accelerator: failing to store it must not stop training
            logger.warning("dataset %s: cannot store the scan (%s); the next start scans again", self.dataset_id, exc)
        self._last_save = self.clock()


def scan_with_cache(cfg: ImageDatasetConfig, source: DatasetSource, rules: CaptionRules, cache: ScanCache, *,
                    override: bool = False, ignore_missing: bool = False, workers: int = 1,
                    log_each: bool = False) -> ScanResult:
    """Scan ``cfg`` (or reuse its stored scan, as the module docstring describes) and store the result.

    Raises:
        MissingFilesError: files of a stored listing are gone and ``ignore_missing`` is off.
        StorageError: the storage cannot be reached.
    """
    stages = set(cfg.skip_file_discovery or ())
    backend = source.images
    if stages & {"metadata", "aspect"} and source.items is None and cache.usable_records(override):
        result = cache.restore(backend, cfg.id)
        local = [r.key for r in result.records if backend.local_path(r.key) is not None]
        missing = [key for key in local if not backend.exists(key)]
        return _handle_missing(result, missing, backend, cfg, ignore_missing)
    keys = None
    if cfg.preserve_data_backend_cache and source.items is None and cache.stored and cache.stored.complete:
        keys = list(cache.stored.files)
    result = scan_image_dataset(cfg, source, rules=rules, keys=keys, size_hint=cache.size_hint(backend),
                                on_scanned=cache.on_scanned, workers=workers, log_each=log_each)
    if keys is not None:
        missing = [key for key in result.unreadable if not backend.exists(key)]
        result = _handle_missing(result, missing, backend, cfg, ignore_missing)
    cache.save(result)
    return result


def _handle_missing(result: ScanResult, missing: list[str], backend: Backend, cfg: ImageDatasetConfig,
                    ignore_missing: bool) -> ScanResult:
    """Stop on files of a stored listing that are gone, or (``ignore_missing``) skip them."""
    if not missing:
        return result
    if not ignore_missing:
        shown = ", ".join(str(backend.locate(key)) for key in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MissingFilesError(
            f"dataset {cfg.id!r}: {len(missing)} file(s) of the stored listing no longer exist ({shown}{more}); "
            "remove preserve_data_backend_cache / skip_file_discovery for one run to list the storage again, "
            "or set --ignore_missing_files to skip them")
    gone = set(missing)
    reason = "listed in the stored scan but missing (--ignore_missing_files)"
    kept = [r for r in result.records if r.key not in gone]
    result.skipped.extend((backend.locate(key), reason) for key in missing)
    result.skipped_keys.extend(missing)
    result.unreadable = [key for key in result.unreadable if key not in gone]
    # A missing file also failed its header read in a preserved listing: drop that duplicate reason.
    pairs = [(path, why, key) for (path, why), key in zip(result.skipped, result.skipped_keys)
             if not (key in gone and why != reason)]
    result.skipped = [(path, why) for path, why, _ in pairs]
    result.skipped_keys = [key for _, _, key in pairs]
    result.records = kept
    logger.warning("dataset %s: skipping %d missing file(s) of the stored listing", cfg.id, len(missing))
    return result
