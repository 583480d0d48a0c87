"""``--validation_dataset_file``: FastVideo's validation prompt file (spec 001), read without torch so
the config rules can check it before a model loads.

The file is JSON: a list of entries, or an object whose ``"data"`` key holds that list (the two forms
FastVideo writes). Each entry is an object with

* ``caption`` (required): the prompt;
* ``image_path``: the picture an image-to-video model starts from, relative to the file's folder
  (or absolute);
* ``num_inference_steps``, ``width``, ``height``, ``num_frames``: this entry's sampling steps, size
  and clip length, replacing ``--validation_num_inference_steps``, ``--validation_resolution`` and
  ``--validation_num_video_frames`` for it alone.

``video_path`` (FastVideo's video-to-video input) may be present but must be empty: simpletuner does
not sample video-to-video. Any other key is refused, so a misspelt one is never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: Keys an entry may hold, besides the required ``caption``.
OPTIONAL_KEYS = ("image_path", "num_inference_steps", "width", "height", "num_frames")
#: FastVideo's video-to-video input: accepted only when empty (null or "").
EMPTY_ONLY_KEYS = ("video_path",)
#: Pixel edges must be multiples of this (what every family's VAE and the mp4 encoder accept).
EDGE_MULTIPLE = 8


@dataclass(frozen=True)
class ValidationEntry:
    """One prompt of the file, with the settings it overrides (None: the option's value)."""

    caption: str
    image_path: Path | None = None
    num_inference_steps: int | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        """``(width, height)`` when the entry names both, else None."""
        return None if self.width is None else (self.width, self.height)


def load_validation_dataset(path: str | Path) -> list[ValidationEntry]:
    """The entries of ``path``; ValueError with the file, the entry and the reason when one is wrong."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{str(path)!r} must hold a non-empty JSON list of entries such as "
                         '{"caption": "a cat walks", "image_path": "cat.png"} (or an object with that list under '
                         '"data")')
    return [_entry(item, index, file) for index, item in enumerate(data)]


def _entry(item, index: int, file: Path) -> ValidationEntry:
    where = f"entry {index} of {str(file)!r}"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be a JSON object with a \"caption\"; got {type(item).__name__}")
    unknown = sorted(set(item) - {"caption", *OPTIONAL_KEYS, *EMPTY_ONLY_KEYS})
    if unknown:
        raise ValueError(f"{where} has the unknown key {unknown[0]!r}; an entry may hold caption, "
                         f"{', '.join(OPTIONAL_KEYS)}")
    for key in EMPTY_ONLY_KEYS:
        if item.get(key) not in (None, ""):
            raise ValueError(f"{where} sets {key!r} = {item[key]!r}: video-to-video validation is not supported; "
                             "remove the key or set it to null")
    caption = item.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where} needs a \"caption\": a non-empty string (the prompt)")
    numbers = {key: _positive_int(item.get(key), key, where) for key in ("num_inference_steps", "width", "height",
                                                                           "num_frames")}
    if (numbers["width"] is None) != (numbers["height"] is None):
        raise ValueError(f"{where} gives only one of \"width\" and \"height\"; give both or neither")
    for key in ("width", "height"):
        if numbers[key] is not None and numbers[key] % EDGE_MULTIPLE:
            raise ValueError(f"{where}: {key} = {numbers[key]} must be a multiple of {EDGE_MULTIPLE}")
    return ValidationEntry(caption=caption, image_path=_image_path(item.get("image_path"), where, file), **numbers)


def _positive_int(value, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} = {value!r} must be a whole number of at least 1")
    return value


def _image_path(value, where: str, file: Path) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: image_path = {value!r} must be a path (a string)")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = file.parent / path
    if not path.is_file():
        raise ValueError(f"{where}: image_path {value!r} does not exist (looked for {str(path)!r}; relative paths "
                         "start at the file's folder)")
    return path
