"""From the dataset plan to batches of cached tensors: what the trainer consumes.

:func:`build_training_data` runs the whole data path once at start-up (scan, buckets, latent and
text caches, sampler) and returns a :class:`TrainingData` whose :meth:`TrainingData.next_batch`
only looks tensors up and stacks them. The trainer never sees PIL or raw text (``DESIGN.md``), and
its per-step overhead is benchmarked against a bare PyTorch loop, so nothing expensive happens per
step: after start-up every tensor of a small dataset already sits in RAM.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path


import torch

from simpletuner.data.backends import cache_backend, is_remote_cache, open_dataset
from simpletuner.data.buckets import bucket_alignment, pixel_edge
from simpletuner.data.cache.store import BackendEntries, CacheReport, TensorMemory
from simpletuner.data.cache.text import EMPTY_CAPTION, TextEmbedCache
from simpletuner.data.cache.vae import VaeCache
from simpletuner.data.config import DatasetPlan, ImageDatasetConfig
from simpletuner.data.geometry import buckets_of, place_images
from simpletuner.data.metadata import ImageRecord, scan_image_dataset
from simpletuner.data.mixing import DatasetMixer, DatasetSchedule, dataset_weight
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
        sampler: which dataset and bucket each batch comes from (its state is what a checkpoint saves).
        summaries: one per enabled image dataset.
        text_report: what the text-embedding cache did.
        latent_caches: the latent cache of each dataset, by dataset id.
        text_cache: the shared text-embedding cache.
        bucket_of: the bucket size each record is trained at.
    """

    sampler: DatasetMixer
    summaries: list[DatasetSummary]
    text_report: CacheReport
    latent_caches: dict[str, VaeCache] = field(default_factory=dict, repr=False)
    text_cache: TextEmbedCache | None = field(default=None, repr=False)
    bucket_of: dict[ImageRecord, Size] = field(default_factory=dict, repr=False)
    batch_size: int = 1
    _empty_by_batch: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def next_batch(self, step: int = 0) -> dict:
        """The next batch at optimizer step ``step``: stacked latents and prompt embeds of records
        that share one dataset and one bucket.

        Keys: ``latent_mean``/``latent_std`` [B, C, h, w], every text-cache tensor (e.g.
        ``prompt_embeds`` [B, L, D]), ``empty_prompt`` (the same text keys holding the ``""``
        embeds, batch B, for caption dropout; expanded views, so do not modify them in place),
        ``captions`` and ``paths``.
        """
        records = self.sampler.next_batch(step)
        latents = [self.latent_caches[r.dataset_id].load(r, self.bucket_of[r]) for r in records]
        texts = [self.text_cache.load(r.caption) for r in records]
        batch: dict = {name: torch.stack([entry[name] for entry in latents]) for name in latents[0]}
        batch.update({name: torch.stack([entry[name] for entry in texts]) for name in texts[0]})
        batch["empty_prompt"] = self._empty_prompt(len(records))
        batch["captions"] = [r.caption for r in records]
        batch["paths"] = [str(r.path) for r in records]
        return batch

    def skip_batch(self, step: int = 0) -> None:
        """Advance the batch order without loading anything (another process trains on that batch)."""
        self.sampler.next_batch(step)

    def state_dict(self) -> dict:
        """The sampler position; everything else is rebuilt from the caches on resume."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume the batch order exactly where the checkpoint left it."""
        self.sampler.load_state_dict(state)

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
            sampler = self.sampler.samplers[summary.id]
            schedule = self.sampler.schedules[summary.id]
            window = f", steps {schedule.start_step}..{schedule.end_step}" if schedule.end_step else (
                f", from step {schedule.start_step}" if schedule.start_step else "")
            lines.append(f"  batches per epoch: {sampler.batches_per_epoch()}, draw weight {schedule.weight:g}{window}")
            if sampler.dropped_records():
                lines.append(f"  {sampler.dropped_records()} images unused: their bucket holds fewer than "
                             "batch size copies")
        lines.append(f"text embeds: {self.text_report.reused} reused, {self.text_report.built} built")
        lines.append(f"batches per epoch: {self.sampler.batches_per_epoch()} "
                     f"(batch size {self.batch_size})")
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
    per_dataset: dict[str, dict[Size, list[ImageRecord]]] = {}
    configs: dict[str, ImageDatasetConfig] = {}
    latent_caches: dict[str, VaeCache] = {}
    for raw_cfg in plan.enabled_images:
        cfg = raw_cfg.with_global_defaults(config.resolution, config.resolution_type, config.cache_dir)
        buckets, summary, cache = _prepare_dataset(cfg, config, model, memory, show_progress)
        summaries.append(summary)
        latent_caches[cfg.id] = cache
        if any(buckets.values()):
            per_dataset[cfg.id] = buckets
            configs[cfg.id] = cfg
    if not per_dataset:
        raise NoTrainingDataError(_nothing_left_message(summaries))
    text_cache = TextEmbedCache(Path(plan.text_embeds.cache_dir), model, memory)
    captions = [record.caption for buckets in per_dataset.values() for records in buckets.values() for record in records]
    text_report = text_cache.ensure(captions, TEXT_ENCODE_BATCH_SIZE, progress=show_progress)
    logger.info("text embeds: %d reused, %d built", text_report.reused, text_report.built)
    mixer = _build_mixer(per_dataset, configs, config)
    bucket_of = {record: size for buckets in per_dataset.values() for size, records in buckets.items()
                 for record in records}
    return TrainingData(mixer, summaries, text_report, latent_caches, text_cache, bucket_of,
                        batch_size=config.train_batch_size)


def _build_mixer(per_dataset: dict[str, dict[Size, list[ImageRecord]]], configs: dict[str, ImageDatasetConfig],
                 config) -> DatasetMixer:
    """One seeded bucket sampler per dataset and the draw schedule that mixes them."""
    seed = config.seed or 0
    samplers: dict[str, BucketBatchSampler] = {}
    schedules: dict[str, DatasetSchedule] = {}
    for name, buckets in per_dataset.items():
        cfg = configs[name]
        try:
            samplers[name] = BucketBatchSampler(buckets, config.train_batch_size, seed=seed,
                                                repeats={name: cfg.repeats})
        except ValueError:
            sizes = ", ".join(f"{w}x{h}: {len(records)} images" for (w, h), records in buckets.items())
            raise NoTrainingDataError(
                f"dataset {name}: `--train_batch_size {config.train_batch_size}` is larger than every aspect "
                f"bucket ({sizes}), so no batch can be formed; lower --train_batch_size or add images"
            ) from None
        images = sum(len(records) for records in buckets.values())
        schedules[name] = DatasetSchedule(
            weight=dataset_weight(config.data_backend_sampling, cfg.probability, images, cfg.repeats),
            start_step=cfg.start_step, end_step=cfg.end_step,
        )
    return DatasetMixer(samplers, schedules, seed=seed)


def _prepare_dataset(
    cfg: ImageDatasetConfig, config, model, memory: TensorMemory, show_progress: bool
) -> tuple[dict[Size, list[ImageRecord]], DatasetSummary, VaeCache]:
    """Scan, bucket and latent-cache one dataset (whose inherited settings are already filled)."""
    source = open_dataset(cfg)
    scan = scan_image_dataset(cfg, source)
    records = _subset(scan.records, cfg, config.seed or 0)
    for path, reason in scan.skipped:
        logger.warning("dataset %s: skipping %s: %s", cfg.id, path, reason)
    edge = pixel_edge(cfg.resolution, cfg.resolution_type)
    alignment = bucket_alignment(config.aspect_bucket_alignment, model.vae_scale_factor(), edge)
    placed, excluded = place_images(records, cfg, alignment)
    for path, reason in excluded:
        logger.info("dataset %s: leaving out %s: %s", cfg.id, path, reason)
    buckets = buckets_of(placed)
    entries = BackendEntries(cache_backend(cfg.cache_dir_vae, cfg)) if is_remote_cache(cfg.cache_dir_vae) else None
    cache = VaeCache(cfg.cache_dir_vae, cfg.id, cfg.instance_data_dir, crop=cfg.crop, memory=memory,
                     images=source.images, entries=entries)
    anchors = {record.path: placement.anchor for record, placement in placed.items()}
    report = cache.ensure(buckets, model, config.vae_batch_size, progress=show_progress, anchors=anchors)
    buckets = _without(buckets, {path for path, _ in report.skipped})
    logger.info("dataset %s: latents: %d reused, %d built", cfg.id, report.reused, report.built)
    summary = DatasetSummary(
        id=cfg.id,
        found=len(scan.records) + len(scan.skipped),
        skipped=list(scan.skipped) + excluded + list(report.skipped),
        buckets={size: len(records) for size, records in buckets.items()},
        latents_built=report.built,
        latents_reused=report.reused,
    )
    return buckets, summary, cache


def _subset(records: list[ImageRecord], cfg: ImageDatasetConfig, seed: int) -> list[ImageRecord]:
    """At most ``max_num_samples`` records: a seeded random subset, kept in scan order."""
    if cfg.max_num_samples is None or len(records) <= cfg.max_num_samples:
        return records
    chosen = set(random.Random(f"max-num-samples:{seed}:{cfg.id}").sample(range(len(records)), cfg.max_num_samples))
    logger.info("dataset %s: using %d of %d images (max_num_samples)", cfg.id, cfg.max_num_samples, len(records))
    return [record for index, record in enumerate(records) if index in chosen]


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
