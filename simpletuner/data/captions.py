"""Caption strategies: where an image's training prompt comes from.

Each strategy is a small function chosen by name (``ImageDatasetConfig.caption_strategy``). They
return None instead of raising when there is no usable caption, so the metadata scan can skip the
image with a reason and keep going: one missing ``.txt`` should not abort a 10k-image scan.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from simpletuner.data.config import ImageDatasetConfig

# "photo (3)" -> "photo": the suffix file managers add to duplicates.
_DUPLICATE_SUFFIX = re.compile(r"\s*\(\d+\)$")
# "cat 0042" -> "cat": a trailing counter from a camera or an export tool.
_NUMBER_SUFFIX = re.compile(r"\s+\d+$")
_SPACES = re.compile(r"\s+")


def caption_file_for(image_path: Path) -> Path:
    """The sidecar caption file the ``textfile`` strategy reads: ``<stem>.txt`` beside the image."""
    return Path(image_path).with_suffix(".txt")


def caption_from_textfile(image_path: Path) -> str | None:
    """The first non-empty line of ``<stem>.txt``, stripped; None when missing or blank.

    Multi-line caption files (one caption per line, for caption variety) exist in the wild; until
    caption sampling is implemented we keep only the first line, so training is deterministic.
    """
    try:
        text = caption_file_for(image_path).read_text(encoding="utf-8-sig", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def caption_from_filename(image_path: Path) -> str | None:
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


def caption_for(image_path: Path, cfg: ImageDatasetConfig) -> str | None:
    """The caption for ``image_path`` under ``cfg.caption_strategy``; None when there is none.

    Raises:
        ValueError: an unknown strategy (config validation normally prevents this); lists valid ones.
    """
    strategies: dict[str, Callable[[], str | None]] = {
        "textfile": lambda: caption_from_textfile(image_path),
        "filename": lambda: caption_from_filename(image_path),
        "instanceprompt": lambda: caption_from_instance_prompt(cfg),
    }
    if cfg.caption_strategy not in strategies:
        raise ValueError(
            f"dataset {cfg.id!r}: unknown caption_strategy {cfg.caption_strategy!r}; "
            f"use one of {sorted(strategies)}"
        )
    return strategies[cfg.caption_strategy]()
