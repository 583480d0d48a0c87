"""Caption strategies: where an image's training prompt comes from.

Each strategy is a small function chosen by name (``ImageDatasetConfig.caption_strategy``). They
return None instead of raising when there is no usable caption, so the metadata scan can skip the
image with a reason and keep going: one missing ``.txt`` should not abort a 10k-image scan.

Caption files are read as UTF-8 (a BOM is fine; UTF-16 with a BOM too). A file that is not valid
UTF-8 is still used, decoded as Windows-1252 (or Latin-1 for the few bytes cp1252 leaves
undefined), with one warning naming the file: such files come from older Windows tools, and
skipping the image would lose a good training pair over an accent. Nothing is rewritten on disk.

Given a storage backend (:mod:`simpletuner.data.backends`), ``image_path`` is the image's key in it
and the sidecar is read through the backend (a bucket, for example); without one it is a local path.
The ``parquet`` and ``huggingface`` strategies take captions from a table's columns; the metadata
scan reads those, so they never reach :func:`caption_for`.
"""

from __future__ import annotations

import codecs
import logging
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable

from simpletuner.data.config import ImageDatasetConfig

if TYPE_CHECKING:
    from simpletuner.data.backends import Backend

# "photo (3)" -> "photo": the suffix file managers add to duplicates.
_DUPLICATE_SUFFIX = re.compile(r"\s*\(\d+\)$")
# "cat 0042" -> "cat": a trailing counter from a camera or an export tool.
_NUMBER_SUFFIX = re.compile(r"\s+\d+$")
_SPACES = re.compile(r"\s+")

logger = logging.getLogger(__name__)


def caption_file_for(image_path: Path) -> Path:
    """The sidecar caption file the ``textfile`` strategy reads: ``<stem>.txt`` beside the image."""
    return Path(image_path).with_suffix(".txt")


def caption_key_for(image_key: str) -> str:
    """The sidecar's key in a backend: ``<stem>.txt`` beside the image's key."""
    return PurePosixPath(image_key).with_suffix(".txt").as_posix()


def caption_from_textfile(image_path: Path | str, backend: "Backend | None" = None) -> str | None:
    """The first non-empty line of ``<stem>.txt``, stripped; None when missing or blank."""
    lines = caption_lines_from_textfile(image_path, backend)
    return lines[0] if lines else None


def caption_lines_from_textfile(image_path: Path | str, backend: "Backend | None" = None) -> list[str] | None:
    """Every non-empty line of ``<stem>.txt``, stripped (each is a caption variant); None when
    the file is missing, an empty list when it is blank."""
    try:
        if backend is None:
            sidecar = caption_file_for(image_path)
            text = decode_caption_bytes(sidecar.read_bytes(), sidecar)
        else:
            key = caption_key_for(str(image_path))
            if not backend.exists(key):
                return None
            text = decode_caption_bytes(backend.read_bytes(key), backend.locate(key))
    except (FileNotFoundError, IsADirectoryError):
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def decode_caption_bytes(data: bytes, source: Path | str) -> str:
    """Text of a caption file: UTF-8 (BOM optional) or BOM-marked UTF-16, else a legacy codepage.

    The legacy fallback logs one warning naming ``source``, so the user can re-save it as UTF-8;
    the words are kept because a caption with one odd accent is still a good caption.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass  # a BOM-like start that is not UTF-16 after all: try the byte encodings
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    try:
        text, encoding = data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # cp1252 leaves 5 bytes undefined; latin-1 maps every byte
        text, encoding = data.decode("latin-1"), "latin-1"
    logger.warning("caption file %s is not valid UTF-8 (byte 0x%02x at offset %d); decoded as %s; "
                   "re-save it as UTF-8 to silence this", source, data[first_bad], first_bad, encoding)
    return text


def caption_from_filename(image_path: Path | str) -> str | None:
    """The file stem with ``_``/``-`` as spaces and counters (``" (2)"``, ``"_0042"``) dropped.

    A stem that is only a counter ("0001.png") yields None: an empty prompt would teach nothing.
    """
    words = _SPACES.sub(" ", Path(image_path).stem.replace("_", " ").replace("-", " ")).strip()
    previous = None
    while previous != words:  # "cat_01 (2)" needs both suffixes removed
        previous = words
        words = _NUMBER_SUFFIX.sub("", _DUPLICATE_SUFFIX.sub("", words)).strip()
    if words.isdigit():
        return None
    return words or None


def caption_from_instance_prompt(cfg: ImageDatasetConfig) -> str | None:
    """The dataset's single ``instance_prompt`` (config validation guarantees it is set)."""
    prompt = (cfg.instance_prompt or "").strip()
    return prompt or None


def caption_variants_for(image_path: Path | str, cfg: ImageDatasetConfig, backend: "Backend | None" = None,
                         split_lines: bool = True) -> list[str] | None:
    """All raw captions of ``image_path``: a caption file's lines (joined into one when
    ``split_lines`` is False), or the single caption of the other strategies; None when none."""
    if cfg.caption_strategy != "textfile":
        caption = caption_for(image_path, cfg, backend)
        return None if caption is None else [caption]
    lines = caption_lines_from_textfile(image_path, backend)
    if not lines:
        return None
    return lines if split_lines else [" ".join(lines)]


def caption_for(image_path: Path | str, cfg: ImageDatasetConfig, backend: "Backend | None" = None) -> str | None:
    """The caption for ``image_path`` under ``cfg.caption_strategy``; None when there is none.

    ``image_path`` is a local path, or the image's key in ``backend`` when one is given.

    Raises:
        ValueError: an unknown strategy (config validation normally prevents this); lists valid ones.
    """
    strategies: dict[str, Callable[[], str | None]] = {
        "textfile": lambda: caption_from_textfile(image_path, backend),
        "filename": lambda: caption_from_filename(image_path),
        "instanceprompt": lambda: caption_from_instance_prompt(cfg),
    }
    if cfg.caption_strategy not in strategies:
        raise ValueError(
            f"dataset {cfg.id!r}: unknown caption_strategy {cfg.caption_strategy!r}; "
            f"use one of {sorted(strategies)}"
        )
    return strategies[cfg.caption_strategy]()
