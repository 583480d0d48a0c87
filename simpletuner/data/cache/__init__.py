"""Fingerprinted, atomically written tensor caches: VAE latents and text embeddings."""

from simpletuner.data.cache.store import (
    CACHE_FORMAT_VERSION,
    DEFAULT_MEMORY_BUDGET_BYTES,
    CacheReadError,
    CacheReport,
    CacheWriteError,
    TensorMemory,
    entry_path,
    fingerprint,
    read_entry,
    write_entry,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "CacheReadError",
    "CacheReport",
    "CacheWriteError",
    "TensorMemory",
    "entry_path",
    "fingerprint",
    "read_entry",
    "write_entry",
]
