"""``folder_repeats``: kohya's folder convention, where ``<N>_<words>`` subfolders of a dataset
repeat N times and their images without a caption file are trained on ``<words>``.

A dataset entry with ``folder_repeats: true`` is replaced, when the dataset list is read, by one
dataset per such subfolder: the same settings, the subfolder as ``instance_data_dir``, ``repeats:
N - 1`` (our ``repeats`` counts extra passes; kohya's N counts every pass) and ``<words>`` as the
caption of images that have none. Every consumer of the list (validation, ``--dry-run``, the
memory planner, training) then sees the real datasets, each with its own buckets and cache, mixed
in proportion to images x passes as kohya's single dataset would be. Subfolders not named
``<N>_<words>``, and images directly in the folder, are left out, as kohya leaves them out.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

from simpletuner.data.schema import MAX_REPEATS, DatasetConfigError

if TYPE_CHECKING:
    from simpletuner.data.config import ImageDatasetConfig

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def repeat_folder(name: str) -> tuple[int, str] | None:
    """``(passes, words)`` for a folder named ``<N>_<words>``, else None."""
    match = _REPEAT_FOLDER.match(name)
    return (int(match.group(1)), match.group(2).strip()) if match else None


def folder_slug(name: str) -> str:
    """A folder name as a piece of a dataset id (ids name cache folders)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "folder"


def expand_folder_repeats(cfg: "ImageDatasetConfig", where: str) -> list["ImageDatasetConfig"]:
    """``[cfg]``, or with ``folder_repeats`` one dataset per ``<N>_<words>`` subfolder.

    Raises:
        DatasetConfigError: no such subfolder, or a count of 0 or above the repeats limit, naming
            the folder and what to rename.
    """
    if not cfg.folder_repeats or cfg.disabled:
        return [cfg]
    root = Path(str(cfg.instance_data_dir))
    children = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        parsed = repeat_folder(folder.name)
        if parsed is None:
            continue
        passes, words = parsed
        if not 1 <= passes <= MAX_REPEATS + 1:
            raise DatasetConfigError(f"{where}: folder_repeats: subfolder {folder.name!r} asks for {passes} passes; "
                                     f"name it with a number from 1 to {MAX_REPEATS + 1}")
        slug = folder_slug(folder.name)
        children.append(dataclasses.replace(
            cfg, id=f"{cfg.id}-{slug}", instance_data_dir=str(folder), repeats=passes - 1, folder_repeats=False,
            folder_prompt=words,
            cache_dir_vae=f"{cfg.cache_dir_vae.rstrip('/')}/{slug}" if cfg.cache_dir_vae else None,
            explicit_keys=cfg.explicit_keys | {"repeats"}))
    if not children:
        raise DatasetConfigError(f"{where}: folder_repeats is set but {str(root)!r} has no subfolder named "
                                 "`<N>_<words>` (e.g. `10_sks dog`: 10 passes, captioned \"sks dog\" where no .txt "
                                 "exists); rename the subfolders or remove folder_repeats")
    return children
