"""Cache entries on disk: fingerprinted, written atomically, verified on read.

Every cached tensor set (one image's latents, one caption's embeddings) is one safetensors file.
Besides the cached tensors it holds two small reserved tensors, ``__fingerprint__`` and
``__checksum__``: the UTF-8 text of the fingerprint the entry was built for and of a checksum of the
cached tensors' bytes, each stored as a 1-D uint8 tensor. They are tensors, not only header metadata,
because entries are verified from bytes (a gunzipped file, an object fetched from a bucket) and
safetensors' readers for bytes return tensors but drop the metadata; this way the library parses the
whole entry and no header is read by hand. The same two values are also written as metadata, for
people and for file tools such as ``safe_open``, but readers here trust only the tensors. The
reserved tensors are removed before an entry's tensors reach a caller.

A reader that finds a missing, truncated, bit-rotted or stale entry gets ``None`` and rebuilds it: a
cache may cost time, never correctness (see ``DESIGN.md``, "Caches are keyed by a fingerprint"). An
entry written before the reserved tensors existed has no ``__fingerprint__`` tensor, so it counts as
stale and is rebuilt in place under the same name (the fingerprint, and so the file name, did not
change).

Writes go to a uniquely named temporary file in the entry's folder and are renamed into place with
``os.replace``, so a crash, a full disk or two processes writing the same entry never leave a
half-written file under the final name.

A cache may also live in a bucket (``cache_dir_vae: "s3://bucket/prefix"``): :class:`BackendEntries`
stores the same safetensors bytes through a storage backend, where one PUT replaces an object
atomically, and verifies them on read exactly like local entries. :class:`LocalEntries` is the
local folder; both offer ``read``/``write``/``location``/``delete`` and small text files (the content
index).

With ``--compress_disk_cache`` an entry's safetensors bytes are gzip-compressed before they are
written (text-encoder outputs padded to the maximum length are mostly zeros and shrink several
times). Readers recognise the gzip header, so compressed and plain entries are both read, the
tensors and their checksum are the same either way, and switching the option needs no rebuild.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

if TYPE_CHECKING:
    from simpletuner.data.backends import Backend

logger = logging.getLogger(__name__)

#: Bumped whenever the layout or meaning of cached tensors changes; part of every fingerprint, so a
#: new version silently rebuilds instead of misreading old entries.
CACHE_FORMAT_VERSION = 1

#: Default in-memory budget for cached tensors across all caches of one run (see TensorMemory).
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3


class CacheWriteError(OSError):
    """A cache entry could not be written (full disk, no permission); the message names the path."""


class CacheReadError(RuntimeError):
    """A cache entry that was valid when checked is now missing or corrupt."""


@dataclass
class CacheReport:
    """What one ``ensure`` pass did, for the startup summary.

    Attributes:
        built: entries encoded and written now.
        reused: valid entries found on disk.
        skipped: inputs that could not be cached, with a human-readable reason.
        deferred: missing entries left to be encoded at first use (on-demand caching).
        recreated: stale entries (cached at another bucket size) deleted to be encoded again.
        moved: records kept at the size their entry was cached at (``vae_cache_scan_behaviour
            sync``), by record.
    """

    built: int = 0
    reused: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    deferred: int = 0
    recreated: int = 0
    moved: dict = field(default_factory=dict)


def fingerprint(**parts: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``parts`` plus :data:`CACHE_FORMAT_VERSION`.

    Canonical means sorted keys and fixed separators, so equal settings always give equal keys
    whatever order the caller passes them in. Tuples serialise as lists; anything else that JSON
    does not know is written with ``str``.
    """
    payload = {"cache_format_version": CACHE_FORMAT_VERSION, **parts}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def entry_path(cache_dir: Path, key: str) -> Path:
    """``<cache_dir>/<key[:2]>/<key>.safetensors``: two-level fan-out keeps folders small."""
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


#: Reserved tensor names that carry an entry's fingerprint and checksum as UTF-8 bytes (see the module
#: docstring); callers may not use them and never see them. Introducing them did not bump
#: CACHE_FORMAT_VERSION on purpose: an older entry lacks them and is refused and rewritten under its
#: own name, while a new version would change every key and leave the old files behind as orphans.
FINGERPRINT_TENSOR = "__fingerprint__"
CHECKSUM_TENSOR = "__checksum__"
RESERVED_TENSOR_NAMES = frozenset({FINGERPRINT_TENSOR, CHECKSUM_TENSOR})


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order.

    safetensors itself catches truncation (its header must cover the file exactly) but not a
    flipped or zeroed byte inside the data; this checksum does.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


#: The two bytes every gzip stream starts with.
_GZIP_MAGIC = b"\x1f\x8b"
#: gzip level for compressed entries. Levels 1 to 9 gave sizes within 4% of each other on a
#: T5-shaped embedding and on random latents (documentation/DATASETS.md), so the cheapest is used.
_GZIP_LEVEL = 1


def write_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], compress: bool = False) -> None:
    """Write ``tensors`` with ``metadata`` (plus a checksum) to ``path`` atomically; gzip the
    file when ``compress``.

    ``metadata`` must hold the entry's ``"fingerprint"``; it and the checksum are stored both as
    reserved tensors (what readers check) and as safetensors metadata (for people and file tools).

    Raises:
        ValueError: ``metadata`` has no fingerprint, or a tensor uses a reserved name.
        CacheWriteError: the disk refused the write; the temporary file is removed and the
            previous entry under ``path`` (if any) is untouched.
    """
    path = Path(path)
    stored, full_metadata = _pack_entry(tensors, metadata)
    temp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_path = _make_temp_file(path)
        if compress:
            data = safetensors.torch.save(stored, metadata=full_metadata)
            temp_path.write_bytes(gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0))
        else:
            safetensors.torch.save_file(stored, os.fspath(temp_path), metadata=full_metadata)
        os.replace(temp_path, path)
    except OSError as exc:
        _remove_quietly(temp_path)
        raise CacheWriteError(
            f"cannot write cache entry {path}: {exc}; free disk space or point cache_dir at a writable "
            f"folder with room, then run again (entries already written are kept)"
        ) from exc
    except BaseException:
        _remove_quietly(temp_path)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (used for small JSON indexes beside the entries).

    Raises:
        CacheWriteError: as :func:`write_entry`.
    """
    path = Path(path)
    temp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_path = _make_temp_file(path)
        temp_path.write_text(text, encoding="utf-8")
        os.replace(temp_path, path)
    except OSError as exc:
        _remove_quietly(temp_path)
        raise CacheWriteError(
            f"cannot write {path}: {exc}; free disk space or point cache_dir at a writable folder"
        ) from exc
    except BaseException:
        _remove_quietly(temp_path)
        raise


def read_entry(path: Path, expected_fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The tensors stored at ``path``, or None when the caller must rebuild the entry.

    None (with a debug log saying why) when the file is missing, unreadable, not valid
    safetensors (e.g. truncated), built for another fingerprint or in the older format without
    reserved tensors, or fails its checksum. Entries are small, so the file is read whole and
    checked by :func:`decode_entry`, the same code that checks entries fetched from object storage:
    a local and a remote reader can never disagree on what a valid entry is.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        logger.debug("cache entry %s is missing; building it", path)
        return None
    except OSError as exc:
        logger.debug("cache entry %s is unreadable (%s: %s); rebuilding", path, type(exc).__name__, exc)
        return None
    return decode_entry(data, expected_fingerprint, str(path))


class TensorMemory:
    """Cached tensors kept in RAM after their first read, up to a byte budget.

    Small datasets then cost no disk I/O per training step; past the budget entries are simply
    read from disk each time, so a huge dataset degrades to disk speed instead of running out of
    memory. One instance is shared by all caches of a run so the budget is global.
    """

    def __init__(self, budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: dict[str, dict[str, torch.Tensor]] = {}
        # The batch prefetch thread and the main thread (eval batches) may fill it at once.
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors remembered under ``key``, if any."""
        return self._entries.get(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Remember ``tensors`` unless that would exceed the budget; True when kept."""
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        with self._lock:
            if key in self._entries:
                return True
            if self.used_bytes + size > self.budget_bytes:
                return False
            self._entries[key] = tensors
            self.used_bytes += size
        return True

    def drop(self, key: str) -> None:
        """Forget ``key`` (its entry was deleted or replaced)."""
        with self._lock:
            tensors = self._entries.pop(key, None)
            if tensors is not None:
                self.used_bytes -= sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())

    def __len__(self) -> int:
        return len(self._entries)


def load_entry(memory: "TensorMemory", cache_dir: "Path | LocalEntries | BackendEntries", key: str,
               what: str) -> dict[str, torch.Tensor]:
    """An entry's tensors, from RAM when already there, else from storage (then kept in RAM).

    ``cache_dir`` is a local cache folder or an entry store; ``what`` describes the entry for the
    error message (e.g. "latents of photo.png").
    """
    tensors = memory.get(key)
    if tensors is not None:
        return tensors
    entries = cache_dir if isinstance(cache_dir, (LocalEntries, BackendEntries)) else LocalEntries(cache_dir)
    tensors = entries.read(key)
    if tensors is None:
        raise CacheReadError(f"cache entry {entries.location(key)} ({what}) is missing or corrupt; "
                             "restart training and it will be rebuilt")
    memory.put(key, tensors)
    return tensors


def encode_entry(tensors: dict[str, torch.Tensor], metadata: dict[str, str], compress: bool = False) -> bytes:
    """The bytes :func:`write_entry` would write (reserved tensors and metadata included, gzipped
    if ``compress``)."""
    stored, full_metadata = _pack_entry(tensors, metadata)
    data = safetensors.torch.save(stored, metadata=full_metadata)
    return gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0) if compress else data


def decode_entry(data: bytes, expected_fingerprint: str, where: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors in ``data`` (an entry's bytes, plain or gzipped), or None when stale,
    truncated or corrupt; ``where`` names the entry in the debug log.

    safetensors parses the whole entry; the fingerprint and checksum are then taken out of the
    reserved tensors, so the returned dict holds only the tensors the entry was written with. A
    stale entry is decoded in full before it is refused: entries are small and a stale one is about
    to be re-encoded, which costs far more.
    """
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:  # a truncated or damaged compressed entry
            _log_unreadable(where, exc)
            return None
    try:
        tensors = safetensors.torch.load(bytes(data))
        stored_fingerprint = _pop_text(tensors, FINGERPRINT_TENSOR)
        stored_checksum = _pop_text(tensors, CHECKSUM_TENSOR)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, ValueError (bad reserved tensor)...
        _log_unreadable(where, exc)
        return None
    if stored_fingerprint != expected_fingerprint:
        logger.debug("cache entry %s is stale (fingerprint %s, expected %s); rebuilding", where,
                     stored_fingerprint if stored_fingerprint is not None else "none: written in an older entry format",
                     expected_fingerprint)
        return None
    if stored_checksum != tensor_checksum(tensors):
        logger.debug("cache entry %s fails its checksum; rebuilding", where)
        return None
    return tensors


def _pack_entry(tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (caller's tensors plus the reserved fingerprint and checksum tensors) and
    the safetensors metadata (caller's metadata plus the checksum).

    The checksum covers the caller's tensors only, so a reader recomputes it over exactly what it
    hands back.

    Raises:
        ValueError: ``metadata`` lacks a fingerprint (such an entry could never be read back), or a
            tensor uses a reserved name.
    """
    clashing = sorted(RESERVED_TENSOR_NAMES.intersection(tensors))
    if clashing:
        raise ValueError(f"cache entry tensors may not be named {', '.join(clashing)}: those names are reserved for "
                         "the entry's fingerprint and checksum; rename the tensors")
    if "fingerprint" not in metadata:
        raise ValueError("cache entry metadata has no 'fingerprint'; pass the entry's key as metadata['fingerprint'] "
                         "so readers can tell a current entry from a stale one")
    prepared = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    full_metadata = {**{str(k): str(v) for k, v in metadata.items()}, "checksum": tensor_checksum(prepared)}
    stored = {**prepared,
              FINGERPRINT_TENSOR: _text_tensor(full_metadata["fingerprint"]),
              CHECKSUM_TENSOR: _text_tensor(full_metadata["checksum"])}
    return stored, full_metadata


def _text_tensor(text: str) -> torch.Tensor:
    """``text`` as a 1-D uint8 tensor of its UTF-8 bytes (how reserved values travel in an entry)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _pop_text(tensors: dict[str, torch.Tensor], name: str) -> str | None:
    """Remove the reserved tensor ``name`` from ``tensors`` and return its text; None when absent
    (an entry written before reserved tensors existed).

    Raises:
        ValueError: the tensor is not 1-D uint8 UTF-8 text (a damaged or foreign entry).
    """
    tensor = tensors.pop(name, None)
    if tensor is None:
        return None
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"reserved tensor {name} is {tensor.dtype} with shape {tuple(tensor.shape)}, "
                         "expected 1-D uint8 text")
    return tensor.numpy().tobytes().decode("utf-8")


def _log_unreadable(where: str, exc: BaseException) -> None:
    """One wording for every damaged entry, so a log search finds them all."""
    logger.debug("cache entry %s is unreadable (%s: %s); rebuilding", where, type(exc).__name__, exc)


@dataclass(frozen=True)
class LocalEntries:
    """Entries in a local folder: ``<cache_dir>/<key[:2]>/<key>.safetensors`` (gzipped when
    ``compress``)."""

    cache_dir: Path
    compress: bool = False

    def location(self, key: str) -> Path:
        return entry_path(self.cache_dir, key)

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        return read_entry(entry_path(self.cache_dir, key), key)

    def write(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        write_entry(entry_path(self.cache_dir, key), tensors, metadata, compress=self.compress)

    def delete(self, key: str) -> None:
        """Remove an entry (missing is fine: the goal is that it is gone)."""
        entry_path(self.cache_dir, key).unlink(missing_ok=True)

    @property
    def remote(self) -> bool:
        return False

    def read_text(self, name: str) -> str | None:
        """A small file beside the entries (None when missing); ``OSError`` when unreadable."""
        try:
            return (Path(self.cache_dir) / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(Path(self.cache_dir) / name, text)


@dataclass(frozen=True)
class BackendEntries:
    """Entries stored through a storage backend (a bucket), with the local folder's layout.

    Writes are one ``write_bytes_atomic`` call (a single PUT for S3); reads are verified exactly
    as local ones, so a missing, truncated, stale or bit-flipped object is rebuilt.
    """

    backend: "Backend"
    compress: bool = False

    @property
    def remote(self) -> bool:
        return True

    def delete(self, key: str) -> None:
        self.backend.delete(self._key(key))

    def location(self, key: str) -> str:
        return str(self.backend.locate(self._key(key)))

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        try:
            data = self.backend.read_bytes(self._key(key))
        except FileNotFoundError:
            logger.debug("cache entry %s is missing; building it", self.location(key))
            return None
        return decode_entry(data, key, self.location(key))

    def write(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.backend.write_bytes_atomic(self._key(key), encode_entry(tensors, metadata, self.compress))

    def read_text(self, name: str) -> str | None:
        try:
            return self.backend.read_bytes(name).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.backend.write_bytes_atomic(name, text.encode("utf-8"))

    @staticmethod
    def _key(key: str) -> str:
        return f"{key[:2]}/{key}.safetensors"


def _make_temp_file(path: Path) -> Path:
    """A new, uniquely named hidden file beside ``path`` (same filesystem, so rename is atomic)."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def _remove_quietly(path: Path | None) -> None:
    """Delete a leftover temporary file; failing to delete must not hide the original error."""
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove temporary cache file %s: %s", path, exc)
