"""Storage backends: where a dataset's files live, addressed by *key*.

A key is a POSIX path relative to the backend's root (``"sub/cat.png"``). The metadata scan, the
caption reader, the image decoder and the latent cache all go through the same small interface,
so one code path serves every backend:

* ``local`` (:mod:`.local`): a folder on disk.
* ``aws`` (:mod:`.aws`): a bucket (and key prefix) on S3 or any S3-protocol server.
* ``parquet`` (:mod:`.parquet`) and ``huggingface`` (:mod:`.huggingface`) are *metadata sources*:
  a table says which images exist, their captions and optionally their sizes. The image bytes come
  from files (local or bucket) named by a column, or from a column of the table itself.

Third-party libraries (boto3, pyarrow, datasets) are imported inside the backend modules' functions,
so importing this package costs nothing and ``simpletuner --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from simpletuner.options import ConfigError

if TYPE_CHECKING:
    from simpletuner.data.config import ImageDatasetConfig


class StorageError(ConfigError):
    """Storage that cannot be used (unreachable endpoint, missing bucket, refused credentials).

    The message names the bucket/endpoint or folder and the fix; it never contains a secret.
    """


@runtime_checkable
class Backend(Protocol):
    """What the data pipeline needs from a storage backend."""

    def list_files(self, extensions: tuple[str, ...]) -> list[str]:
        """Keys of every file whose lower-cased name ends with one of ``extensions``, sorted.

        Files inside hidden folders (a path part starting with ``.``) are left out.
        """

    def read_bytes(self, key: str) -> bytes:
        """The whole content of ``key``. Raises FileNotFoundError when it does not exist."""

    def read_head(self, key: str, length: int) -> bytes:
        """At most the first ``length`` bytes of ``key`` (fewer only when the file is shorter)."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    def stat(self, key: str) -> dict | None:
        """A small dict that changes whenever the content does (size plus mtime or ETag), or None
        when the backend has no cheap way to tell (the content is then hashed every run)."""

    def write_bytes_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` with ``data`` so that readers see the old or the new content, never half."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (OSError when the storage is read-only). Only cache maintenance and the
        opt-in ``delete_*_images`` options delete anything."""

    def locate(self, key: str) -> Path | str:
        """Where ``key`` is, for logs and records: a local path, ``s3://bucket/key``, ``table[row]``."""

    def local_path(self, key: str) -> Path | None:
        """The local file of ``key`` when there is one (lets PIL and hashing stream from disk)."""

    def describe(self) -> str:
        """The backend's root for summaries: a folder, ``s3://bucket/prefix``, a table file."""


@dataclass(frozen=True)
class SourceItem:
    """One image a metadata source lists.

    Attributes:
        key: the image's key in the dataset's image backend.
        caption: the caption from a table (None: use the caption strategy, or none was found).
        size: (width, height) from a table; None means read it from the image header.
        caption_reason: why ``caption`` is None for a table source (the skip reason).
        error: set when the row cannot be used at all (e.g. its file does not exist): the reason.
    """

    key: str
    caption: str | None = None
    size: tuple[int, int] | None = None
    caption_reason: str | None = None
    error: str | None = None


@dataclass
class DatasetSource:
    """Where one dataset's images come from.

    Attributes:
        images: the backend the image bytes (and ``textfile`` captions) are read from.
        items: the images listed by a table source; None means list ``images`` itself.
        description: where the dataset is, for summaries (a folder, ``s3://bucket/prefix``, ...).
    """

    images: Backend
    items: list[SourceItem] | None
    description: str


def storage_backend(cfg: "ImageDatasetConfig") -> Backend:
    """The file storage of a dataset: its bucket for ``aws``, else its ``instance_data_dir``."""
    from simpletuner.data.backends.local import LocalBackend

    if cfg.type == "aws":
        from simpletuner.data.backends.aws import S3Backend

        return S3Backend.from_settings(cfg.aws)
    return LocalBackend(Path(cfg.instance_data_dir or "."))


def open_dataset(cfg: "ImageDatasetConfig") -> DatasetSource:
    """The image backend and (for table sources) the listed images of ``cfg``."""
    if cfg.metadata_backend == "huggingface":
        from simpletuner.data.backends.huggingface import open_huggingface

        return open_huggingface(cfg)
    storage = storage_backend(cfg)
    if cfg.metadata_backend == "parquet":
        from simpletuner.data.backends.parquet import open_parquet

        return open_parquet(cfg, storage)
    return DatasetSource(images=storage, items=None, description=storage.describe())


def cache_backend(cache_dir: str, cfg: "ImageDatasetConfig | None" = None) -> Backend:
    """The backend of an ``s3://bucket/prefix`` cache folder.

    The connection settings (endpoint, region, credentials) are the dataset's own when it is an
    ``aws`` dataset, so a bucket on a private S3 server needs no second set; otherwise they come
    from the standard AWS environment.
    """
    from simpletuner.data.backends.aws import S3Backend, parse_s3_url

    bucket, prefix = parse_s3_url(cache_dir)
    settings = cfg.aws if cfg is not None and cfg.type == "aws" else None
    return S3Backend.from_settings(settings, bucket=bucket, prefix=prefix)


def is_remote_cache(cache_dir: str | Path | None) -> bool:
    """Whether a cache folder is a bucket URL (``s3://...``) rather than a local folder."""
    return isinstance(cache_dir, str) and cache_dir.startswith("s3://")
