"""Hugging Face ``datasets`` metadata source, loaded from a local folder (never from the hub).

``dataset_name`` is a folder holding either a dataset written by ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``, whose ``split`` is used, ``train`` by default) or plain ``.parquet`` / ``.arrow``
files (a downloaded dataset repository, for example). The ``huggingface`` object names the columns:

* ``image_column`` (``image``): an ``Image`` feature, encoded bytes, or a file path (relative
  paths are resolved against ``instance_data_dir``, else against ``dataset_name``);
* ``caption_column`` (``caption``) and ``fallback_caption_column`` for empty captions;
* ``width_column`` / ``height_column``: sizes, so no image header is read during the scan.

Images are addressed by row number. Only the image column of a row is read when it is needed, so
a large Arrow dataset stays memory-mapped. ``datasets`` is imported here, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simpletuner.data.backends import DatasetSource
from simpletuner.data.backends.parquet import TableImages, table_items
from simpletuner.options import ConfigError

if TYPE_CHECKING:
    from simpletuner.data.config import ImageDatasetConfig

_DEFAULT_SPLIT = "train"


def open_huggingface(cfg: "ImageDatasetConfig") -> DatasetSource:
    """The rows of the dataset at ``cfg.dataset_name`` as images with captions (and sizes).

    Raises:
        ConfigError: the folder holds no dataset, the split or a named column is missing.
    """
    from simpletuner.data.config import TableSettings

    settings = cfg.huggingface or TableSettings.defaults_for("huggingface")
    image_column = settings.image_column
    dataset = load_local_dataset(cfg.id, cfg.dataset_name, settings.split)
    captions = cfg.caption_strategy == "huggingface"  # else instanceprompt: no caption column needed
    wanted = [image_column, settings.caption_column if captions else None,
              settings.fallback_caption_column if captions else None, settings.width_column, settings.height_column]
    for name in filter(None, wanted):
        if name not in dataset.column_names:
            raise ConfigError(f"dataset {cfg.id!r}: {cfg.dataset_name} has no column {name!r}; its columns are "
                              f"{dataset.column_names} (set the column names in the \"huggingface\" object)")
    images = _raw_images(dataset, image_column)
    metadata = dataset.select_columns(list(dict.fromkeys(filter(None, wanted[1:]))))[:]
    keys = [str(row) for row in range(len(dataset))]
    base = Path(cfg.instance_data_dir) if cfg.instance_data_dir else Path(cfg.dataset_name)
    backend = TableImages(str(cfg.dataset_name), {key: row for row, key in enumerate(keys)},
                          lambda row: images[row][image_column], base)
    items = table_items(list(keys), metadata, settings, storage_name=str(cfg.dataset_name))
    return DatasetSource(images=backend, items=items, description=f"{cfg.dataset_name} ({len(keys)} rows)")


def load_local_dataset(dataset_id: str, folder: str, split: str | None):
    """A ``datasets.Dataset`` from ``folder``: ``save_to_disk`` output, or parquet/arrow files."""
    import datasets

    root = Path(folder)
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            name = split or _DEFAULT_SPLIT
            if name not in loaded:
                raise ConfigError(f"dataset {dataset_id!r}: {folder} has no split {name!r}; its splits are "
                                  f"{list(loaded)} (set \"split\" in the \"huggingface\" object)")
            return loaded[name]
        return loaded
    files = _data_files(root, split)
    if not files:
        raise ConfigError(f"dataset {dataset_id!r}: {folder} holds no dataset (no dataset_dict.json or state.json "
                          "from save_to_disk, and no .parquet or .arrow files"
                          + (f" for split {split!r})" if split else ")"))
    if files[0].suffix == ".arrow":
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in files])
    import pyarrow.parquet as pq

    # In memory rather than through Dataset.from_parquet, which would write a copy into the HF cache.
    return datasets.Dataset(datasets.table.InMemoryTable(pq.read_table([str(p) for p in files])))


def _data_files(root: Path, split: str | None) -> list[Path]:
    """The parquet (or else arrow) files under ``root``, limited to ``split`` when files are split-named."""
    for suffix in (".parquet", ".arrow"):
        files = sorted(path for path in root.rglob(f"*{suffix}") if not path.name.startswith("."))
        if not files:
            continue
        name = split or _DEFAULT_SPLIT
        named = [path for path in files if path.name.startswith((f"{name}-", f"{name}.", f"{name}_"))
                 or name in path.relative_to(root).parts[:-1]]
        if named or split is not None:
            return named
        return files
    return []


def _raw_images(dataset, column: str):
    """The image column with ``Image`` features left encoded ({"bytes", "path"}), so rows are
    decoded by our own loader, with its checks, and not by ``datasets``."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset.select_columns([column])
