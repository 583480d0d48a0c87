"""Parquet metadata source: a table lists the images with their captions and, optionally, sizes.

The ``parquet`` object of a dataset entry names the columns (SimpleTuner's shape)::

    "parquet": {"path": "captions.parquet", "filename_column": "file", "caption_column": "caption",
                "fallback_caption_column": "tags", "width_column": "width", "height_column": "height"}

* Each row's image is the file named by ``filename_column``, relative to ``instance_data_dir`` (or
  to ``aws_data_prefix`` in the bucket of an ``aws`` dataset). A name without an image extension is
  matched against the files' stems (``"0042"`` finds ``0042.jpg``) unless
  ``identifier_includes_extension`` is true. Alternatively ``image_column`` holds the encoded
  images in the table itself.
* The caption is ``caption_column``; when that cell is empty, ``fallback_caption_column``.
* With ``width_column`` and ``height_column`` no image is opened during the scan at all.

``path`` is a local file or folder of parquet files, or, for an ``aws`` dataset, a key in the bucket.
Only the named columns are read. pyarrow is imported here, on first use.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from simpletuner.data.backends import Backend, DatasetSource, SourceItem
from simpletuner.options import ConfigError

if TYPE_CHECKING:
    from simpletuner.data.config import ImageDatasetConfig, TableSettings


class TableImages:
    """Images stored in a table column, as a read-only backend; keys name rows.

    ``cell(row)`` returns the row's image: encoded bytes, a ``{"bytes": ..., "path": ...}`` dict
    (Hugging Face's ``Image`` feature), or a file path, resolved against ``base_dir``.
    """

    def __init__(self, name: str, rows: dict[str, int], cell: Callable[[int], Any], base_dir: Path | None) -> None:
        self.name = name
        self.rows = rows
        self.cell = cell
        self.base_dir = base_dir

    def describe(self) -> str:
        return self.name

    def locate(self, key: str) -> str:
        return f"{self.name}[{key}]"

    def local_path(self, key: str) -> Path | None:
        value = self._cell(key)
        return self._path(value) if isinstance(value, str) else None

    def list_files(self, extensions: tuple[str, ...]) -> list[str]:
        return list(self.rows)

    def read_bytes(self, key: str) -> bytes:
        value = self._cell(key)
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str) and value:
            return self._path(value).read_bytes()
        raise FileNotFoundError(f"{self.locate(key)} holds no image")

    def read_head(self, key: str, length: int) -> bytes:
        return self.read_bytes(key)[:length]

    def exists(self, key: str) -> bool:
        return key in self.rows

    def stat(self, key: str) -> None:
        return None  # rows have no cheap change marker: their bytes are hashed (they are in RAM anyway)

    def write_bytes_atomic(self, key: str, data: bytes) -> None:
        raise OSError(f"{self.name} is read-only: the latent cache of a table dataset lives in cache_dir_vae")

    def delete(self, key: str) -> None:
        raise OSError(f"{self.name} is read-only: rows of a table are never deleted")

    def _cell(self, key: str) -> Any:
        if key not in self.rows:
            raise FileNotFoundError(f"{self.locate(key)} does not exist")
        return self.cell(self.rows[key])

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path


def open_parquet(cfg: "ImageDatasetConfig", storage: Backend) -> DatasetSource:
    """The images a parquet table lists, with their captions and (if given) sizes.

    Raises:
        ConfigError: the table cannot be read or lacks a named column (the message lists the columns).
    """
    settings = cfg.parquet
    in_table = settings.image_column is not None
    captions = cfg.caption_strategy == "parquet"  # other strategies need no caption column
    wanted = [settings.caption_column if captions else None, settings.fallback_caption_column if captions else None,
              settings.width_column, settings.height_column, settings.image_column]
    names, read = _open_table(cfg, storage, settings)
    if settings.filename_column in names or not in_table:
        wanted.append(settings.filename_column)
    wanted = [name for name in dict.fromkeys(wanted) if name and _require_column(cfg, names, name)]
    table = read(wanted)
    columns = {name: table.column(name).to_pylist() for name in wanted}
    rows = table.num_rows
    if in_table:
        names = columns.get(settings.filename_column) or [str(row) for row in range(rows)]
        keys = [str(name) if name is not None else str(row) for row, name in enumerate(names)]
        cells = columns[settings.image_column]
        base = Path(cfg.instance_data_dir) if cfg.instance_data_dir else None
        images: Backend = TableImages(_table_name(cfg), _unique_rows(keys), cells.__getitem__, base)
        resolved: list[str | None] = keys
    else:
        images = storage
        resolved = _resolve_files(columns[settings.filename_column], storage, settings)
    items = table_items(resolved, columns, settings, storage_name=images.describe())
    return DatasetSource(images=images, items=items, description=f"{_table_name(cfg)} ({images.describe()})")


def table_items(keys: list[str | None], columns: dict[str, list], settings: "TableSettings",
                storage_name: str) -> list[SourceItem]:
    """One :class:`SourceItem` per row: its key, caption (or why none) and size when given.

    ``keys[row]`` is None when the row's file was not found; such rows are reported, not dropped.
    A key listed twice keeps its first row.
    """
    captions = columns.get(settings.caption_column, [])
    fallbacks = columns.get(settings.fallback_caption_column) if settings.fallback_caption_column else None
    widths = columns.get(settings.width_column) if settings.width_column else None
    heights = columns.get(settings.height_column) if settings.height_column else None
    items: list[SourceItem] = []
    seen: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key is None:
            items.append(SourceItem(f"<row {row}>", error=f"row {row}: no image file for it in {storage_name}"))
            continue
        if key in seen:
            items.append(SourceItem(key, error=f"row {row} names the same image as row {seen[key]}; kept once"))
            continue
        seen[key] = row
        caption = caption_text(captions[row] if row < len(captions) else None)
        if caption is None and fallbacks is not None:
            caption = caption_text(fallbacks[row])
        reason = None
        if caption is None:
            reason = f"row {row}: empty caption in column {settings.caption_column!r}"
            if settings.fallback_caption_column:
                reason += f" and in fallback column {settings.fallback_caption_column!r}"
        size = None
        if widths is not None and heights is not None:
            size = _size(widths[row], heights[row])
        items.append(SourceItem(key, caption=caption, size=size, caption_reason=reason))
    return items


def caption_text(value: Any) -> str | None:
    """A cell as a caption: strings stripped, lists give their first non-empty entry, empty is None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return next((text for text in map(caption_text, value) if text), None)
    text = str(value).strip()
    return text or None


def _size(width: Any, height: Any) -> tuple[int, int] | None:
    """Positive integer sizes, or None (the header is read instead) for missing or bad cells."""
    try:
        size = int(width), int(height)
    except (TypeError, ValueError):
        return None
    return size if size[0] > 0 and size[1] > 0 else None


def _open_table(cfg: "ImageDatasetConfig", storage: Backend, settings: "TableSettings"):
    """(column names, ``read(columns) -> pyarrow.Table``) of the table, a local file or folder, or
    an object in the bucket of an ``aws`` dataset. Only the requested columns are decoded."""
    import pyarrow.dataset as pa_dataset
    import pyarrow.parquet as pq

    try:
        if cfg.type == "aws":
            handle = pq.ParquetFile(io.BytesIO(storage.read_bytes(settings.path)))
            return handle.schema_arrow.names, lambda columns: handle.read(columns=columns)
        table = pa_dataset.dataset(settings.path, format="parquet")
        return table.schema.names, lambda columns: table.to_table(columns=columns)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"dataset {cfg.id!r}: cannot read parquet table {settings.path!r}: {exc}") from None


def _require_column(cfg: "ImageDatasetConfig", names: list[str], name: str) -> bool:
    if name not in names:
        raise ConfigError(f"dataset {cfg.id!r}: parquet table {cfg.parquet.path!r} has no column {name!r}; "
                          f"its columns are {names}")
    return True


def _resolve_files(names: list, storage: Backend, settings: "TableSettings") -> list[str | None]:
    """Backend keys of the files named in the table; None where no file matches."""
    from simpletuner.data.metadata import IMAGE_EXTENSIONS

    root = getattr(storage, "root", None)
    by_stem: dict[str, str] | None = None
    keys: list[str | None] = []
    for name in names:
        if name is None or not str(name).strip():
            keys.append(None)
            continue
        value = str(name).strip().replace("\\", "/")
        if root is not None and os.path.isabs(value):
            relative = os.path.relpath(value, root)
            value = value if relative.startswith("..") else Path(relative).as_posix()
        if settings.identifier_includes_extension or value.lower().endswith(IMAGE_EXTENSIONS):
            keys.append(value)
            continue
        if by_stem is None:  # one listing, only when some name lacks its extension
            by_stem = {}
            for key in storage.list_files(IMAGE_EXTENSIONS):
                by_stem.setdefault(key.rsplit(".", 1)[0], key)
        keys.append(by_stem.get(value))
    return keys


def _unique_rows(keys: list[str]) -> dict[str, int]:
    rows: dict[str, int] = {}
    for row, key in enumerate(keys):
        rows.setdefault(key, row)
    return rows


def _table_name(cfg: "ImageDatasetConfig") -> str:
    return str(cfg.parquet.path)
