"""The text-embedding cache: one entry per distinct caption and text encoder.

Keys are the fingerprint of the caption text, the encoder (``model.fingerprint_parts()``) and the
cache format version, so the same caption in two datasets is encoded once, and changing the text
encoder rebuilds everything. The empty caption ``""`` is always cached because caption dropout
trains on it.

With ``skip_file_discovery: text`` nothing is read at start-up: an entry is read (and encoded if it
is missing) the first time a batch needs it. Entries are gzipped with ``--compress_disk_cache``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from simpletuner.data.cache.store import (
    CacheReadError,
    CacheReport,
    LocalEntries,
    TensorMemory,
    fingerprint,
)

logger = logging.getLogger(__name__)

#: The caption caption dropout substitutes; always present in the cache.
EMPTY_CAPTION = ""


class TextEmbedCache:
    """Prompt embeddings (model tensors with the batch dimension removed), on disk and in RAM."""

    def __init__(self, cache_dir: str | Path, model, memory: TensorMemory | None = None,
                 compress: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.entries = LocalEntries(self.cache_dir, compress=compress)
        self.model = model
        self.memory = memory if memory is not None else TensorMemory()
        self.on_demand = False
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

    def ensure(self, captions: Iterable[str], batch_size: int, progress: bool = True, verify: bool = True
               ) -> CacheReport:
        """Encode every distinct caption (and ``""``) that has no valid entry yet.

        ``verify=False`` (``skip_file_discovery: text``) only checks ``""``; the other captions are
        read, or encoded, when first loaded.
        """
        if batch_size < 1:
            raise ValueError(f"text embed batch size must be at least 1, got {batch_size}")
        report = CacheReport()
        pending: list[str] = []
        self.on_demand = not verify
        wanted = [EMPTY_CAPTION, *captions] if verify else [EMPTY_CAPTION]
        for caption in dict.fromkeys(wanted):
            key = self.key(caption)
            cached = self.entries.read(key)
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
        key = self.key(caption)
        tensors = self.memory.get(key)
        if tensors is not None:
            return tensors
        tensors = self.entries.read(key)
        if tensors is None:
            if not self.on_demand:
                raise CacheReadError(f"cache entry {self.entries.location(key)} (text embeds of {caption!r}) is "
                                     "missing or corrupt; restart training and it will be rebuilt")
            return self._encode_chunk([caption])[caption]
        self.memory.put(key, tensors)
        return tensors

    def _encode_chunk(self, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Encode one batch of captions and write one entry per caption."""
        outputs = self.model.encode_prompts(list(captions))
        encoded = {}
        for index, caption in enumerate(captions):
            key = self.key(caption)
            tensors = {name: value[index].detach().to("cpu").clone() for name, value in outputs.items()}
            self.entries.write(key, tensors, {"fingerprint": key, "source": caption})
            self.memory.put(key, tensors)
            encoded[caption] = tensors
        return encoded
