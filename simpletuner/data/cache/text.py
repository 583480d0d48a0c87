"""The text-embedding cache: one entry per distinct caption and text encoder.

Keys are the fingerprint of the caption text, the encoder (``model.fingerprint_parts()``) and the
cache format version, so the same caption in two datasets is encoded once, and changing the text
encoder rebuilds everything. The empty caption ``""`` is always cached because caption dropout
trains on it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from simpletuner.data.cache.store import (
    CacheReport,
    load_entry,
    TensorMemory,
    entry_path,
    fingerprint,
    read_entry,
    write_entry,
)

logger = logging.getLogger(__name__)

#: The caption caption dropout substitutes; always present in the cache.
EMPTY_CAPTION = ""


class TextEmbedCache:
    """Prompt embeddings (model tensors with the batch dimension removed), on disk and in RAM."""

    def __init__(self, cache_dir: str | Path, model, memory: TensorMemory | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.model = model
        self.memory = memory if memory is not None else TensorMemory()
        # Computed once: fingerprint_parts() is called per caption otherwise.
        self._model_parts = model.fingerprint_parts()
        self._keys: dict[str, str] = {}

    def key(self, caption: str) -> str:
        """The entry fingerprint of ``caption`` (memoised: captions repeat every step)."""
        key = self._keys.get(caption)
        if key is None:
            key = fingerprint(kind="text_embeds", caption=caption, model=self._model_parts)
            self._keys[caption] = key
        return key

    def ensure(self, captions: Iterable[str], batch_size: int, progress: bool = True) -> CacheReport:
        """Encode every distinct caption (and ``""``) that has no valid entry yet."""
        if batch_size < 1:
            raise ValueError(f"text embed batch size must be at least 1, got {batch_size}")
        report = CacheReport()
        pending: list[str] = []
        for caption in dict.fromkeys([EMPTY_CAPTION, *captions]):
            key = self.key(caption)
            cached = read_entry(entry_path(self.cache_dir, key), key)
            if cached is None:
                pending.append(caption)
            else:
                self.memory.put(key, cached)
                report.reused += 1
        with tqdm(total=len(pending), desc="caching text embeds", unit="prompt",
                  disable=not progress or not pending) as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                self._encode_chunk(chunk)
                report.built += len(chunk)
                bar.update(len(chunk))
        return report

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        """The cached tensors of ``caption``; from RAM when they fit the budget.

        Raises:
            CacheReadError: no valid entry exists (``ensure`` was not called for it, or it was
                corrupted since).
        """
        return load_entry(self.memory, self.cache_dir, self.key(caption), f"text embeds of {caption!r}")

    def _encode_chunk(self, captions: list[str]) -> None:
        """Encode one batch of captions and write one entry per caption."""
        outputs = self.model.encode_prompts(list(captions))
        for index, caption in enumerate(captions):
            key = self.key(caption)
            tensors = {name: value[index].detach().to("cpu").clone() for name, value in outputs.items()}
            write_entry(entry_path(self.cache_dir, key), tensors, {"fingerprint": key, "source": caption})
            self.memory.put(key, tensors)
