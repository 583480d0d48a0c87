"""Shuffled caption variants (``caption_shuffle``), the cache-friendly form of kohya's
``shuffle_caption`` + ``keep_tokens`` and OneTrainer's tag shuffling.

Those tools shuffle a caption's tags every time an image is drawn, which only works when the text
encoder runs every step. Here prompt embeddings are cached, so a dataset with ``caption_shuffle``
turns each caption into a fixed set of variants instead: the first ``keep_tokens`` tags stay in
place (a trigger word, a class), the rest are shuffled, ``variants`` times. Each variant is an
ordinary caption variant: it is encoded into the text cache under its own text (so each has its
own entry), and the trainer picks one per epoch per image as it does for multi-line caption files
(:func:`simpletuner.data.caption_rules.caption_for_epoch`). The shuffles depend only on the
caption and ``seed``, so a restart or another machine builds the same variants.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping

from simpletuner.data.schema import DatasetConfigError, shown

#: Most variants per caption: each one costs a text-encoder pass and a cache entry.
MAX_VARIANTS = 64


@dataclass(frozen=True)
class CaptionShuffle:
    """The parsed ``caption_shuffle`` object of a dataset entry.

    Attributes:
        variants: how many shuffled versions of each caption are cached (the caption as written is
            not one of them unless a shuffle happens to give it).
        keep_tokens: leading tags that never move.
        separator: what separates tags; variants are joined with it plus one space.
        seed: changes which shuffles are drawn.
    """

    variants: int = 4
    keep_tokens: int = 0
    separator: str = ","
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, for cache fingerprints."""
        return {"variants": self.variants, "keep_tokens": self.keep_tokens, "separator": self.separator,
                "seed": self.seed}


_FIELDS = {"variants": (int, 1, MAX_VARIANTS), "keep_tokens": (int, 0, 10_000), "separator": (str, None, None),
           "seed": (int, 0, 2**63 - 1)}


def parse_caption_shuffle(value: Mapping[str, Any] | None, where: str) -> CaptionShuffle | None:
    """``caption_shuffle`` from a dataset entry; None when unset.

    Raises:
        DatasetConfigError: an unknown key, or a value of the wrong kind or out of range, naming
            the key and what it accepts.
    """
    if value is None:
        return None
    parsed: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in _FIELDS:
            raise DatasetConfigError(f"{where}: caption_shuffle has unknown key {shown(key)}; it takes "
                                     f"{sorted(_FIELDS)}")
        kind, low, high = _FIELDS[key]
        if kind is int and (isinstance(raw, bool) or not isinstance(raw, int) or raw < low or raw > high):
            raise DatasetConfigError(f"{where}: caption_shuffle key {key!r} has value {shown(raw)}; use a whole "
                                     f"number from {low} to {high}")
        if kind is str and (not isinstance(raw, str) or not raw.strip()):
            raise DatasetConfigError(f"{where}: caption_shuffle key {key!r} has value {shown(raw)}; use a "
                                     "non-blank string such as \",\"")
        parsed[key] = raw
    return CaptionShuffle(**parsed)


def split_tags(caption: str, separator: str) -> list[str]:
    """The caption's tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def shuffled_variants(caption: str, shuffle: CaptionShuffle) -> tuple[str, ...]:
    """Up to ``shuffle.variants`` distinct versions of ``caption`` with the tags after the first
    ``keep_tokens`` shuffled; fewer when the caption has fewer orders, the caption itself when
    nothing can move."""
    tags = split_tags(caption, shuffle.separator)
    kept, moving = tags[:shuffle.keep_tokens], tags[shuffle.keep_tokens:]
    joiner = _joiner(shuffle.separator)
    if len(moving) < 2:
        return (joiner.join(tags),)
    generator = random.Random(f"caption-shuffle:{shuffle.seed}:{caption}")
    variants: dict[str, None] = {}
    for _ in range(shuffle.variants * 8):  # a few extra draws for short captions with repeated orders
        order = moving[:]
        generator.shuffle(order)
        variants[joiner.join(kept + order)] = None
        if len(variants) == shuffle.variants:
            break
    return tuple(variants)


def _joiner(separator: str) -> str:
    """How tags are joined again: ``", "`` for commas and semicolons, ``" | "`` for a bar, a space for
    whitespace."""
    mark = separator.strip()
    if not mark:
        return " "
    return f"{mark} " if mark in (",", ";") else f" {mark} "


def expand_captions(captions: tuple[str, ...], shuffle: CaptionShuffle | None) -> tuple[str, ...]:
    """Every caption replaced by its shuffled variants (order kept, duplicates removed)."""
    if shuffle is None:
        return captions
    return tuple(dict.fromkeys(variant for caption in captions for variant in shuffled_variants(caption, shuffle)))
