"""What happens to a caption after it is read: filters, the instance prompt, and per-epoch variants.

* ``caption_filter_list`` (an image dataset's key, or the ``text_embeds`` entry's, as SimpleTuner
  has it): a list, or a text file with one filter per line, or a JSON list. Each filter is a
  regular expression whose matches are removed (a line that is not a valid expression is removed
  literally), or ``s/find/replace/`` to replace the first match. Captioning models repeat
  boilerplate ("arafed", "this image shows"); removing it keeps the prompt about the picture.
* ``prepend_instance_prompt`` puts ``instance_prompt`` in front; ``only_instance_prompt`` replaces
  the caption by it (the caption file is then not even needed).
* A caption file with several non-empty lines holds several captions for one image. One is used
  per epoch, chosen by a generator seeded with (seed, epoch, path), so a run and its resume train
  on the same prompt; every variant is in the text cache.

Imports without torch.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from simpletuner.data.caption_variants import CaptionShuffle, expand_captions
from simpletuner.data.config import DatasetConfigError, ImageDatasetConfig

_SED = re.compile(r"^s/(.*)/(.*)/$")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class CaptionFilter:
    """One filter line: ``pattern`` matches are replaced by ``replacement`` (``count`` 0 = all)."""

    source: str
    pattern: re.Pattern
    replacement: str = ""
    count: int = 0

    def apply(self, caption: str) -> str:
        return self.pattern.sub(self.replacement, caption, count=self.count)


def parse_filter(line: str) -> CaptionFilter:
    """A filter from one line: ``s/find/replace/``, a regular expression, or (if it does not
    compile) a literal string."""
    sed = _SED.match(line)
    if sed:
        return CaptionFilter(line, _compile(sed.group(1)), sed.group(2), count=1)
    return CaptionFilter(line, _compile(line))


def _compile(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error:
        return re.compile(re.escape(text))


def load_filter_list(spec: str | tuple[str, ...] | list[str] | None, owner: str = "") -> tuple[CaptionFilter, ...]:
    """The filters of a ``caption_filter_list`` value: a list of lines, or a ``.json`` / text file path.

    Blank lines are ignored; other lines are kept exactly (a trailing space is part of the filter,
    so ``"arafed "`` leaves no double space behind).

    Raises:
        DatasetConfigError: the file is missing or a JSON file does not hold a list of strings.
    """
    if not spec:
        return ()
    if isinstance(spec, str):
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise DatasetConfigError(f"{owner}: key 'caption_filter_list' has value {spec!r}, but it cannot be read "
                                     f"({exc.strerror or exc}); give a list of filters or an existing file") from None
        if path.suffix.lower() == ".json":
            lines = json.loads(text)
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                raise DatasetConfigError(f"{owner}: caption_filter_list file {spec} must hold a JSON list of strings")
        else:
            lines = text.splitlines()
    else:
        lines = list(spec)
    return tuple(parse_filter(line) for line in lines if line.strip())


@dataclass(frozen=True)
class CaptionRules:
    """How a dataset's raw captions become training prompts.

    Attributes:
        filters: applied in order to every caption read from the data (not to the instance prompt).
        instance_prompt: the dataset's instance prompt (None when unset).
        prepend / only: ``prepend_instance_prompt`` / ``only_instance_prompt``.
        split_lines: each line of a caption file is a separate variant (``disable_multiline_split``
            turns this off and joins the lines into one caption).
        shuffle: ``caption_shuffle``: each prompt becomes its shuffled variants (caption_variants.py).
        fallback: the caption of an image without a caption file (the words of a ``folder_repeats``
            subfolder, as kohya uses them); None skips such images.
    """

    filters: tuple[CaptionFilter, ...] = ()
    instance_prompt: str | None = None
    prepend: bool = False
    only: bool = False
    split_lines: bool = True
    shuffle: CaptionShuffle | None = None
    fallback: str | None = None

    @classmethod
    def for_dataset(cls, cfg: ImageDatasetConfig, shared_filters: str | tuple[str, ...] | None = None
                    ) -> "CaptionRules":
        """The rules of ``cfg`` (globals already resolved); ``shared_filters`` is the text-embed
        entry's list, applied after the dataset's own. With the ``instanceprompt`` strategy the
        caption already is the instance prompt, so it is not prepended a second time."""
        owner = f"dataset {cfg.id!r}"
        filters = load_filter_list(cfg.caption_filter_list, owner) + load_filter_list(shared_filters, owner)
        prepend = bool(cfg.prepend_instance_prompt) and cfg.caption_strategy != "instanceprompt"
        return cls(filters=filters, instance_prompt=(cfg.instance_prompt or "").strip() or None, prepend=prepend,
                   only=bool(cfg.only_instance_prompt), split_lines=not cfg.disable_multiline_split,
                   shuffle=cfg.caption_shuffle, fallback=cfg.folder_prompt)

    def apply(self, caption: str) -> str | None:
        """The prompt for one raw caption; None when filtering leaves nothing."""
        for rule in self.filters:
            caption = rule.apply(caption)
        caption = _SPACES.sub(" ", caption).strip()
        if not caption:
            return None
        if self.prepend and self.instance_prompt:
            return f"{self.instance_prompt} {caption}"
        return caption

    def apply_all(self, captions: list[str]) -> tuple[str, ...]:
        """Every non-empty prompt from ``captions``, duplicates removed, order kept (each replaced by
        its shuffled variants with ``caption_shuffle``)."""
        prompts = tuple(dict.fromkeys(c for c in (self.apply(caption) for caption in captions) if c))
        return expand_captions(prompts, self.shuffle)


def caption_for_epoch(captions: tuple[str, ...], fallback: str, seed: int, epoch: int, path: object) -> str:
    """The variant trained on in ``epoch``: a pure function of (seed, epoch, path), so resuming
    mid-epoch and prefetching pick the same one."""
    if len(captions) <= 1:
        return captions[0] if captions else fallback
    return captions[random.Random(f"caption-variant:{seed}:{epoch}:{path}").randrange(len(captions))]
