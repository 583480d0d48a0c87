"""From the dataset plan to batches of cached tensors: what the trainer consumes.

:func:`build_training_data` (in :mod:`simpletuner.data.build`) runs the whole data path once at
start-up (scan, buckets, latent and text caches, sampler) and returns a :class:`TrainingData` whose
:meth:`TrainingData.next_batch` only looks tensors up and stacks them. The trainer never sees PIL or
raw text (``DESIGN.md``), and its per-step overhead is benchmarked against a bare PyTorch loop, so
nothing expensive happens per step: after start-up every tensor of a small dataset already sits in
RAM. The exceptions are opt-in: on-demand or disabled latent caches encode when a batch needs it,
and ``--dataloader_prefetch`` moves that work to a background thread (:mod:`simpletuner.data.prefetch`).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from simpletuner.data.buckets import bucket_alignment  # noqa: F401 - re-exported for callers and tests
from simpletuner.data.buckets import bucket_label
from simpletuner.data.cache.store import CacheReport
from simpletuner.data.cache.text import EMPTY_CAPTION, TextEmbedCache
from simpletuner.data.cache.vae import VaeCache
from simpletuner.data.caption_rules import caption_for_epoch
from simpletuner.data.conditioning import ConditioningSet, conditioning_batch
from simpletuner.data.image_info import image_size_info, size_conditioning_batch
from simpletuner.data.metadata import ImageRecord
from simpletuner.data.mixing import DatasetMixer, Draw
from simpletuner.data.prefetch import BatchPrefetcher
from simpletuner.options import ConfigError

logger = logging.getLogger(__name__)

Size = tuple[int, int]

#: Skip reasons shown per dataset by :meth:`TrainingData.describe`; the rest are counted.
_REASONS_SHOWN = 3
#: Words that sort a skip reason into a category for the start-up table (first match wins).
_REASON_KINDS = (("too large", "too large"), ("caption", "no caption"), ("conditioning", "no conditioning"),
                 ("missing", "missing"), ("smaller than minimum", "too small"), ("aspect ratio", "aspect ratio"),
                 ("upscaling", "upscale limit"), ("too short", "too short"), ("too long", "too long"),
                 ("cannot", "unreadable"), ("decode", "unreadable"))


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
        latents_deferred: missing entries left for on-demand encoding.
        latents_recreated / latents_moved: stale entries deleted (recreate) / images kept at their
            cached size (sync).
        repeats: the repeats used (after ``--allow_dataset_oversubscription``).
        repeats_raised_from: the configured repeats when oversubscription raised them.
        deleted: files deleted from storage (``delete_unwanted_images`` / ``delete_problematic_images``).
        role: ``image``, ``video`` or ``eval``.
        is_regularisation: the dataset's batches are marked as regularisation data.
        conditioning: ids of the paired conditioning datasets.
        features: per cached image feature (e.g. a regularizer's teacher tokens), by batch key:
            (entries reused, entries built).
    """

    id: str
    found: int
    skipped: list[tuple[Path, str]]
    buckets: dict[Size, int]
    latents_built: int
    latents_reused: int
    latents_deferred: int = 0
    latents_recreated: int = 0
    latents_moved: int = 0
    repeats: int = 0
    repeats_raised_from: int | None = None
    deleted: list[str] = field(default_factory=list)
    role: str = "image"
    is_regularisation: bool = False
    conditioning: tuple[str, ...] = ()
    features: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(self.buckets.values())

    def skip_counts(self) -> Counter:
        """Skipped files per reason category (``unreadable``, ``no caption``, ``too small``, ...)."""
        return Counter(_reason_kind(reason) for _, reason in self.skipped)


def _keep(columns: dict[str, list], keep: list[bool]) -> dict[str, list]:
    """Each list of ``columns`` without the positions whose ``keep`` flag is False."""
    return {name: [value for value, wanted in zip(values, keep) if wanted] for name, values in columns.items()}


def _reason_kind(reason: str) -> str:
    lowered = reason.lower()
    return next((kind for word, kind in _REASON_KINDS if word in lowered), "other")


@dataclass
class DatasetRole:
    """How one dataset's batches are made beyond latents and captions.

    Attributes:
        is_regularisation: ``is_regularisation_data`` of the entry.
        conditioning: paired conditioning datasets, in ``conditioning_data`` order.
        clear_each_epoch: ``vae_cache_clear_each_epoch``.
        reanchor: the crop window of a record in an epoch (re-drawn when latents are cleared).
        records: every record of the dataset (to re-anchor them).
        features: caches of per-image features some regularizer reads (e.g. CREPA's DINOv2 tokens),
            by the batch key they go under; built like the latents, from the same crops.
        flipped: ``random_flip``: the latents of the mirrored crops; each image trains on them or
            on the plain ones by :func:`draws_flipped`.
    """

    is_regularisation: bool = False
    conditioning: list[ConditioningSet] = field(default_factory=list)
    clear_each_epoch: bool = False
    reanchor: Callable[[ImageRecord, int], tuple[float, float]] | None = None
    records: list[ImageRecord] = field(default_factory=list)
    features: dict[str, VaeCache] = field(default_factory=dict)
    flipped: VaeCache | None = None


def draws_flipped(seed: int, epoch: int, path: object) -> bool:
    """Whether an image trains on its mirrored latents in ``epoch``: a fair coin seeded by (seed,
    epoch, path), so resuming and prefetching draw the same side."""
    return random.Random(f"random-flip:{seed}:{epoch}:{path}").random() < 0.5


def _with_flips(latents: list, records: list[ImageRecord], size, flipped: VaeCache, seed: int, epoch: int
                ) -> tuple[list, list[bool]]:
    """``latents`` with the mirrored entries swapped in where :func:`draws_flipped` says so; a
    mirrored entry that cannot be loaded (None) drops the image like a plain one would."""
    sides = [draws_flipped(seed, epoch, record.path) for record in records]
    chosen = [index for index, side in enumerate(sides) if side and latents[index] is not None]
    if chosen:
        for index, tensors in zip(chosen, flipped.load_batch([records[index] for index in chosen], size)):
            latents[index] = tensors
    return latents, sides


@dataclass
class EvalDataset:
    """An ``eval`` dataset: cached like training data, never drawn for training.

    Attributes:
        id: the dataset id.
        buckets: records per bucket size, in scan order.
    """

    id: str
    buckets: dict[Size, list[ImageRecord]]

    def batches(self, batch_size: int) -> list[tuple[Size, list[ImageRecord]]]:
        """Every record once, bucket by bucket in size order, in batches of at most ``batch_size``."""
        return [(size, records[start:start + batch_size]) for size, records in self.buckets.items()
                for start in range(0, len(records), batch_size)]


@dataclass
class TrainingData:
    """Batches of cached tensors in the sampler's resumable order.

    Attributes:
        sampler: which dataset and bucket each batch comes from (its state is what a checkpoint saves).
        summaries: one per enabled image dataset (then one per eval dataset).
        text_report: what the text-embedding cache did.
        latent_caches: the latent cache of each dataset, by dataset id.
        text_cache: the text-embedding cache of the default ``text_embeds`` entry.
        text_caches: the text-embedding cache of each dataset whose ``text_embeds`` key names another entry.
        bucket_of: the bucket size each record is trained at.
        roles: regularisation flag, conditioning and epoch behaviour per training dataset.
        eval_datasets: the ``eval`` datasets by id (see :meth:`eval_batches`).
        seed: picks caption variants and random conditioning per (seed, epoch, image).
        conditioning_sampling: ``combined`` or ``random`` (``--conditioning_multidataset_sampling``).
    """

    sampler: DatasetMixer
    summaries: list[DatasetSummary]
    text_report: CacheReport
    latent_caches: dict[str, VaeCache] = field(default_factory=dict, repr=False)
    text_cache: TextEmbedCache | None = field(default=None, repr=False)
    text_caches: dict[str, TextEmbedCache] = field(default_factory=dict, repr=False)
    bucket_of: dict[ImageRecord, Size] = field(default_factory=dict, repr=False)
    batch_size: int = 1
    roles: dict[str, DatasetRole] = field(default_factory=dict, repr=False)
    eval_datasets: dict[str, EvalDataset] = field(default_factory=dict, repr=False)
    seed: int = 0
    conditioning_sampling: str = "combined"
    _empty_by_batch: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict, init=False,
                                                                             repr=False)
    _epochs: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _prefetcher: BatchPrefetcher | None = field(default=None, init=False, repr=False)

    # --- batches for the trainer -------------------------------------------------------------------

    def next_batch(self, step: int = 0) -> dict:
        """The next batch at optimizer step ``step``: stacked latents and prompt embeds of records
        that share one dataset and one bucket.

        Keys: ``latent_mean``/``latent_std`` [B, C, h, w], every text-cache tensor (e.g.
        ``prompt_embeds`` [B, L, D]), ``empty_prompt`` (the same text keys holding the ``""``
        embeds, batch B, for caption dropout; expanded views, so do not modify them in place),
        ``captions``, ``paths``, ``original_size`` / ``crop_top_left`` / ``target_size`` (LongTensors
        [B, 2], see :mod:`simpletuner.data.image_info`), ``dataset_id`` and ``is_regularisation_data`` (a bool: a batch
        never mixes datasets), plus the conditioning keys of :mod:`simpletuner.data.conditioning`
        for datasets with ``conditioning_data``. An image that turns out undecodable while
        training (on-demand caching) is dropped from its batch; a batch left empty is replaced
        by the next one. A video dataset's batch holds clip latents [B, C, F, h, w] (the family's
        encoder decides F, h, w), ``num_frames`` (the frames decoded per clip) and ``frame_rate``
        (float [B]: frames per second of each clip, after ``frame_interval``).
        """
        while True:
            if self._prefetcher is not None:
                batch = self._prefetcher.next(step)
            else:
                batch = self._load(self._draw(step))
            if batch is not None:
                return batch

    def skip_batch(self, step: int = 0) -> None:
        """Advance the batch order without loading anything (another process trains on that batch)."""
        if self._prefetcher is not None:
            self._prefetcher.next(step, keep=False)
        else:
            self._draw(step)

    def next_local_batch(self, step: int, rank: int, num_processes: int) -> dict:
        """This process's batch: every process walks the same order and keeps every N-th batch."""
        batch = None
        for index in range(num_processes):
            if index == rank:
                batch = self.next_batch(step)
            else:
                self.skip_batch(step)
        return batch

    def state_dict(self) -> dict:
        """The sampler position after the last batch handed out (never the read-ahead position);
        everything else is rebuilt from the caches on resume."""
        if self._prefetcher is not None:
            return self._prefetcher.state_dict()
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume the batch order exactly where the checkpoint left it."""
        self._epochs.clear()
        if self._prefetcher is not None:
            self._prefetcher.load_state_dict(state)
        else:
            self.sampler.load_state_dict(state)

    def enable_prefetch(self, depth: int, rank: int = 0, num_processes: int = 1) -> None:
        """Prepare up to ``depth`` batches on a background thread (same order, same resume points)."""
        self.close()
        self._prefetcher = BatchPrefetcher(self.sampler, self._load, self._on_draw, depth, rank, num_processes)

    def close(self) -> None:
        """Stop the prefetch thread, if any (the sampler stays at the last batch handed out)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # --- evaluation ----------------------------------------------------------------------------------

    def eval_batches(self, dataset_id: str | None = None, batch_size: int | None = None) -> Iterator[dict]:
        """Every image of an eval dataset (the only one when ``dataset_id`` is None) once, in a
        fixed order, as batches with the keys of :meth:`next_batch`."""
        if dataset_id is None:
            if len(self.eval_datasets) != 1:
                raise ValueError(f"name the eval dataset: {sorted(self.eval_datasets)}")
            dataset_id = next(iter(self.eval_datasets))
        dataset = self.eval_datasets[dataset_id]
        for _, records in dataset.batches(batch_size or self.batch_size):
            batch = self._load(Draw(dataset_id, records, 0))
            if batch is not None:
                yield batch

    # --- internals -----------------------------------------------------------------------------------

    def _draw(self, step: int) -> Draw:
        draw = self.sampler.next_draw(step)
        self._on_draw(draw)
        return draw

    def _on_draw(self, draw: Draw) -> None:
        """Per-dataset epoch changes: ``vae_cache_clear_each_epoch`` drops the latents then."""
        seen = self._epochs.get(draw.dataset_id)
        if seen == draw.epoch:
            return
        self._epochs[draw.dataset_id] = draw.epoch
        role = self.roles.get(draw.dataset_id)
        if role is not None and role.clear_each_epoch and (seen is not None or draw.epoch > 0):
            self.latent_caches[draw.dataset_id].start_epoch(draw.epoch, role.reanchor, role.records)
            for cache in role.features.values():  # the new crops need new features too
                cache.start_epoch(draw.epoch, role.reanchor, role.records)

    def _load(self, draw: Draw) -> dict | None:
        """Look up and stack the tensors of one draw (None if none of its images can be used)."""
        records = draw.records
        size = self.bucket_of[records[0]]
        cache = self.latent_caches[draw.dataset_id]
        latents = cache.load_batch(records, size)
        role = self.roles.get(draw.dataset_id) or DatasetRole()
        sides = None
        if role.flipped is not None:
            latents, sides = _with_flips(latents, records, size, role.flipped, self.seed, draw.epoch)
        kept = [index for index, tensors in enumerate(latents) if tensors is not None]
        features: dict[str, list] = {}
        for key, feature_cache in role.features.items():
            if kept:
                loaded = feature_cache.load_batch([records[index] for index in kept], size)
                features = _keep(features, [item is not None for item in loaded])
                features[key] = [item for item in loaded if item is not None]
                kept = [index for index, item in zip(kept, loaded) if item is not None]
        extra: dict = {}
        if role.conditioning and kept:
            chosen = [records[index] for index in kept]
            extra, dropped = conditioning_batch(role.conditioning, chosen, size, [cache.anchor_of(r) for r in chosen],
                                                self.conditioning_sampling, self.seed, draw.epoch)
            gone = set(dropped)
            features = _keep(features, [position not in gone for position in range(len(kept))])
            kept = [index for position, index in enumerate(kept) if position not in gone]
        if not kept:
            logger.warning("dataset %s: no usable image left in a batch of %d; taking the next batch",
                           draw.dataset_id, len(records))
            return None
        records = [records[index] for index in kept]
        latents = [latents[index] for index in kept]
        captions = [caption_for_epoch(r.caption_variants, r.caption, self.seed, draw.epoch, r.path) for r in records]
        text_cache = self.text_caches.get(draw.dataset_id, self.text_cache)
        texts = [text_cache.load(caption) for caption in captions]
        batch: dict = {name: torch.stack([entry[name] for entry in latents]) for name in latents[0]}
        batch.update({name: torch.stack([entry[name] for entry in texts]) for name in texts[0]})
        batch.update({key: torch.stack([entry["features"] for entry in entries]) for key, entries in features.items()})
        batch["empty_prompt"] = self._empty_prompt(len(records), text_cache)
        batch["captions"] = captions
        batch["paths"] = [str(r.path) for r in records]
        # SDXL micro-conditioning: original size, crop corner and target size of each image
        batch.update(size_conditioning_batch([image_size_info(r.width, r.height, size[:2], cache.anchor_of(r))
                                              for r in records]))
        if len(size) == 3:  # a video bucket (width, height, frames)
            batch["num_frames"] = size[2]
            batch["frame_rate"] = torch.tensor([cache.clip_frame_rate(r) for r in records], dtype=torch.float32)
        batch["dataset_id"] = draw.dataset_id
        batch["is_regularisation_data"] = role.is_regularisation
        if sides is not None:
            batch["flipped"] = [sides[index] for index in kept]
        batch.update(extra)
        return batch

    def _empty_prompt(self, batch_size: int, text_cache: TextEmbedCache | None = None) -> dict[str, torch.Tensor]:
        """The ``""`` embeds expanded to ``batch_size`` (views, built once per batch size and cache)."""
        text_cache = text_cache or self.text_cache
        empty = self._empty_by_batch.get((id(text_cache), batch_size))
        if empty is None:
            single = text_cache.load(EMPTY_CAPTION)
            empty = {name: t.unsqueeze(0).expand(batch_size, *t.shape) for name, t in single.items()}
            self._empty_by_batch[(id(text_cache), batch_size)] = empty
        return empty

    # --- start-up summary ----------------------------------------------------------------------------

    def describe(self) -> str:
        """Start-up summary: a table of every dataset (found, used, skipped, buckets, samples and
        batches per epoch), then per dataset the skip reasons, buckets and cache work."""
        lines = ["dataset | role | found | used | skipped | buckets | samples/epoch | batches/epoch"]
        for summary in self.summaries:
            sampler = self.sampler.samplers.get(summary.id)
            samples = summary.used * (1 + summary.repeats) if summary.role != "eval" else summary.used
            batches = sampler.batches_per_epoch() if sampler is not None else "-"
            role = "regularisation" if summary.is_regularisation else summary.role
            lines.append(f"{summary.id} | {role} | {summary.found} | {summary.used} | {len(summary.skipped)} | "
                         f"{len(summary.buckets)} | {samples} | {batches}")
        for summary in self.summaries:
            lines.extend(self._describe_dataset(summary))
        lines.append(f"text embeds: {self.text_report.reused} reused, {self.text_report.built} built")
        lines.append(f"batches per epoch: {self.sampler.batches_per_epoch()} "
                     f"(batch size {self.batch_size})")
        return "\n".join(lines)

    def _describe_dataset(self, summary: DatasetSummary) -> list[str]:
        counts = ", ".join(f"{kind} {count}" for kind, count in summary.skip_counts().most_common())
        lines = [f"dataset {summary.id}: {summary.found} found, {summary.used} used, {len(summary.skipped)} skipped"
                 + (f" ({counts})" if counts else "")]
        for path, reason in summary.skipped[:_REASONS_SHOWN]:
            lines.append(f"  skipped {path}: {reason}")
        if len(summary.skipped) > _REASONS_SHOWN:
            lines.append(f"  ... and {len(summary.skipped) - _REASONS_SHOWN} more skipped")
        for key in summary.deleted:
            lines.append(f"  deleted {key}")
        sizes = ", ".join(f"{bucket_label(size)}: {count}" for size, count in summary.buckets.items())
        lines.append(f"  buckets: {sizes or 'none'}")
        cache_line = f"  latents: {summary.latents_reused} reused, {summary.latents_built} built"
        for count, word in ((summary.latents_deferred, "encoded when first used"),
                            (summary.latents_recreated, "stale deleted (recreate)"),
                            (summary.latents_moved, "kept at their cached size (sync)")):
            if count:
                cache_line += f", {count} {word}"
        lines.append(cache_line)
        for key, (reused, built) in summary.features.items():
            lines.append(f"  {key}: {reused} reused, {built} built")
        if summary.conditioning:
            lines.append(f"  conditioning: {', '.join(summary.conditioning)} ({self.conditioning_sampling})")
        sampler = self.sampler.samplers.get(summary.id)
        if sampler is None:
            if summary.role == "eval":
                lines.append("  eval dataset: cached, never drawn for training")
            return lines
        schedule = self.sampler.schedules[summary.id]
        window = f", steps {schedule.start_step}..{schedule.end_step}" if schedule.end_step else (
            f", from step {schedule.start_step}" if schedule.start_step else "")
        raised = (f" (raised from {summary.repeats_raised_from} by --allow_dataset_oversubscription)"
                  if summary.repeats_raised_from is not None else "")
        lines.append(f"  repeats {summary.repeats}{raised}, samples per epoch {summary.used * (1 + summary.repeats)}, "
                     f"batches per epoch: {sampler.batches_per_epoch()}, draw weight {schedule.weight:g}{window}")
        if sampler.dropped_records():
            lines.append(f"  {sampler.dropped_records()} images unused: their bucket holds fewer than "
                         "batch size copies")
        return lines


def build_training_data(config, model, plan, show_progress: bool = True, num_processes: int = 1, rank: int = 0,
                        feature_encoders: tuple | list = ()) -> TrainingData:
    """Scan, bucket and cache every enabled dataset, cache all captions, build the sampler.

    See :func:`simpletuner.data.build.build_training_data` (kept importable from here).
    """
    from simpletuner.data.build import build_training_data as build

    return build(config, model, plan, show_progress=show_progress, num_processes=num_processes, rank=rank,
                 feature_encoders=feature_encoders)
