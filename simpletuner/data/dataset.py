"""From the dataset plan to batches of cached tensors: what the trainer consumes.

:func:`build_training_data` runs the whole data path once at start-up (scan, buckets, latent and
text caches, sampler) and returns a :class:`TrainingData` whose :meth:`TrainingData.next_batch`
only looks tensors up and stacks them. The trainer never sees PIL or raw text (``DESIGN.md``), and
its per-step overhead is benchmarked against a bare PyTorch loop, so nothing expensive happens per
step: after start-up every tensor of a small dataset already sits in RAM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from simpletuner.data.buckets import assign_buckets, bucket_alignment, merge_buckets, pixel_edge
from simpletuner.data.cache.store import CacheReport, TensorMemory
from simpletuner.data.cache.text import EMPTY_CAPTION, TextEmbedCache
from simpletuner.data.cache.vae import VaeCache
from simpletuner.data.config import DatasetPlan, ImageDatasetConfig
from simpletuner.data.metadata import ImageRecord, scan_image_dataset
from simpletuner.data.sampler import BucketBatchSampler
from simpletuner.options import ConfigError

logger = logging.getLogger(__name__)

Size = tuple[int, int]

#: Prompts encoded together while filling the text cache. No option sets it: text encoders are
#: small next to the UNet/transformer, and the cache is filled once.
TEXT_ENCODE_BATCH_SIZE = 16
#: Skip reasons shown per dataset by :meth:`TrainingData.describe`; the rest are counted.
_REASONS_SHOWN = 3


class NoTrainingDataError(ConfigError):
    """Nothing is left to train on after scanning and caching; the message says what was skipped."""


@dataclass
class DatasetSummary:
    """What happened to one dataset at start-up, for the summary and for tests.

    Attributes:
        id: the dataset id.
        found: image files found by the scan (usable or not).
        skipped: files left out (unreadable header, no caption, undecodable pixels), with reasons.
        buckets: images per bucket size (width, height) after skipping.
        latents_built: latent entries encoded now.
        latents_reused: latent entries found valid on disk.
    """

    id: str
    found: int
    skipped: list[tuple[Path, str]]
    buckets: dict[Size, int]
    latents_built: int
    latents_reused: int


@dataclass
class TrainingData:
    """Batches of cached tensors in the sampler's resumable order.

    Attributes:
        sampler: the bucketed batch order (its state is what a checkpoint saves).
        summaries: one per enabled image dataset.
        text_report: what the text-embedding cache did.
        latent_caches: the latent cache of each dataset, by dataset id.
        text_cache: the shared text-embedding cache.
        bucket_of: the bucket size each record is trained at.
    """

    sampler: BucketBatchSampler
    summaries: list[DatasetSummary]
    text_report: CacheReport
    latent_caches: dict[str, VaeCache] = field(default_factory=dict, repr=False)
    text_cache: TextEmbedCache | None = field(default=None, repr=False)
    bucket_of: dict[ImageRecord, Size] = field(default_factory=dict, repr=False)
    _batches: Iterator[list[ImageRecord]] | None = field(default=None, init=False, repr=False)
    _empty_by_batch: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def next_batch(self) -> dict:
        """The next batch: stacked latents and prompt embeds of records that share one bucket.

        Keys: ``latent_mean``/``latent_std`` [B, C, h, w], every text-cache tensor (e.g.
        ``prompt_embeds`` [B, L, D]), ``empty_prompt`` (the same text keys holding the ``""``
        embeds, batch B, for caption dropout; expanded views, so do not modify them in place),
        ``captions`` and ``paths``.
        """
        if self._batches is None:
            self._batches = iter(self.sampler)
        records = next(self._batches)
        latents = [self.latent_caches[r.dataset_id].load(r, self.bucket_of[r]) for r in records]
        texts = [self.text_cache.load(r.caption) for r in records]
        batch: dict = {name: torch.stack([entry[name] for entry in latents]) for name in latents[0]}
        batch.update({name: torch.stack([entry[name] for entry in texts]) for name in texts[0]})
        batch["empty_prompt"] = self._empty_prompt(len(records))
        batch["captions"] = [r.caption for r in records]
        batch["paths"] = [str(r.path) for r in records]
        return batch

    def skip_batch(self) -> None:
        """Advance the batch order without loading anything (another process trains on that batch)."""
        if self._batches is None:
            self._batches = iter(self.sampler)
        next(self._batches)

    def state_dict(self) -> dict:
        """The sampler position; everything else is rebuilt from the caches on resume."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume the batch order; the live iterator is dropped because it holds the old epoch plan."""
        self.sampler.load_state_dict(state)
        self._batches = None

    def describe(self) -> str:
        """Multi-line start-up summary: per dataset what was found, skipped, bucketed and cached."""
        lines: list[str] = []
        for summary in self.summaries:
            used = sum(summary.buckets.values())
            lines.append(f"dataset {summary.id}: {summary.found} found, {used} used, "
                         f"{len(summary.skipped)} skipped")
            for path, reason in summary.skipped[:_REASONS_SHOWN]:
                lines.append(f"  skipped {path}: {reason}")
            if len(summary.skipped) > _REASONS_SHOWN:
                lines.append(f"  ... and {len(summary.skipped) - _REASONS_SHOWN} more skipped")
            sizes = ", ".join(f"{w}x{h}: {count}" for (w, h), count in summary.buckets.items())
            lines.append(f"  buckets: {sizes or 'none'}")
            lines.append(f"  latents: {summary.latents_reused} reused, {summary.latents_built} built")
        lines.append(f"text embeds: {self.text_report.reused} reused, {self.text_report.built} built")
        dropped = self.sampler.dropped_records()
        lines.append(f"batches per epoch: {self.sampler.batches_per_epoch()} "
                     f"(batch size {self.sampler.batch_size})")
        if dropped:
            lines.append(f"  {dropped} images unused: their bucket holds fewer than batch size copies")
        return "\n".join(lines)

    def _empty_prompt(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The ``""`` embeds expanded to ``batch_size`` (views, built once per batch size)."""
        empty = self._empty_by_batch.get(batch_size)
        if empty is None:
            single = self.text_cache.load(EMPTY_CAPTION)
            empty = {name: t.unsqueeze(0).expand(batch_size, *t.shape) for name, t in single.items()}
            self._empty_by_batch[batch_size] = empty
        return empty


def build_training_data(config, model, plan: DatasetPlan, show_progress: bool = True) -> TrainingData:
    """Scan, bucket and cache every enabled image dataset, cache all captions, build the sampler.

    Raises:
        NoTrainingDataError: no usable image is left in any dataset.
        CacheWriteError: a cache entry could not be written (e.g. full disk).
    """
    memory = TensorMemory()
    summaries: list[DatasetSummary] = []
    bucket_maps: list[dict[Size, list[ImageRecord]]] = []
    latent_caches: dict[str, VaeCache] = {}
    repeats: dict[str, int] = {}
    for raw_cfg in plan.enabled_images:
        cfg = raw_cfg.with_global_defaults(config.resolution, config.resolution_type, config.cache_dir)
        buckets, summary, cache = _prepare_dataset(cfg, config, model, memory, show_progress)
        summaries.append(summary)
        bucket_maps.append(buckets)
        latent_caches[cfg.id] = cache
        repeats[cfg.id] = cfg.repeats
    merged = merge_buckets(*bucket_maps)
    if not any(merged.values()):
        raise NoTrainingDataError(_nothing_left_message(summaries))
    text_cache = TextEmbedCache(Path(plan.text_embeds.cache_dir), model, memory)
    captions = [record.caption for records in merged.values() for record in records]
    text_report = text_cache.ensure(captions, TEXT_ENCODE_BATCH_SIZE, progress=show_progress)
    logger.info("text embeds: %d reused, %d built", text_report.reused, text_report.built)
    try:
        sampler = BucketBatchSampler(merged, config.train_batch_size, seed=config.seed or 0, repeats=repeats)
    except ValueError:
        sizes = ", ".join(f"{w}x{h}: {len(records)} images" for (w, h), records in merged.items())
        raise NoTrainingDataError(
            f"`--train_batch_size {config.train_batch_size}` is larger than every aspect bucket ({sizes}), "
            "so no batch can be formed; lower --train_batch_size or add images"
        ) from None
    bucket_of = {record: size for size, records in merged.items() for record in records}
    return TrainingData(sampler, summaries, text_report, latent_caches, text_cache, bucket_of)


def _prepare_dataset(
    cfg: ImageDatasetConfig, config, model, memory: TensorMemory, show_progress: bool
) -> tuple[dict[Size, list[ImageRecord]], DatasetSummary, VaeCache]:
    """Scan, bucket and latent-cache one dataset (whose inherited settings are already filled)."""
    scan = scan_image_dataset(cfg)
    for path, reason in scan.skipped:
        logger.warning("dataset %s: skipping %s: %s", cfg.id, path, reason)
    edge = pixel_edge(cfg.resolution, cfg.resolution_type)
    alignment = bucket_alignment(config.aspect_bucket_alignment, model.vae_scale_factor(), edge)
    buckets = assign_buckets(scan.records, cfg.resolution, cfg.resolution_type, alignment, cfg.crop)
    cache = VaeCache(cfg.cache_dir_vae, cfg.id, cfg.instance_data_dir, crop=cfg.crop, memory=memory)
    report = cache.ensure(buckets, model, config.vae_batch_size, progress=show_progress)
    buckets = _without(buckets, {path for path, _ in report.skipped})
    logger.info("dataset %s: latents: %d reused, %d built", cfg.id, report.reused, report.built)
    summary = DatasetSummary(
        id=cfg.id,
        found=len(scan.records) + len(scan.skipped),
        skipped=list(scan.skipped) + list(report.skipped),
        buckets={size: len(records) for size, records in buckets.items()},
        latents_built=report.built,
        latents_reused=report.reused,
    )
    return buckets, summary, cache


def _without(buckets: dict[Size, list[ImageRecord]], paths: set[Path]) -> dict[Size, list[ImageRecord]]:
    """``buckets`` minus records whose file is in ``paths``; buckets left empty are removed."""
    if not paths:
        return buckets
    kept = {size: [r for r in records if r.path not in paths] for size, records in buckets.items()}
    return {size: records for size, records in kept.items() if records}


def _nothing_left_message(summaries: list[DatasetSummary]) -> str:
    """Name every dataset with its counts and first skip reason, so the fix is obvious."""
    parts = []
    for summary in summaries:
        first = f"; first reason: {summary.skipped[0][0]}: {summary.skipped[0][1]}" if summary.skipped else ""
        parts.append(f"{summary.id}: {summary.found} found, {len(summary.skipped)} skipped{first}")
    return ("no usable images in any enabled dataset (" + "; ".join(parts) + "); "
            "check instance_data_dir, image files and captions")
