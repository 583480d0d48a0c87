"""Start-up of the data path: every dataset scanned, bucketed and cached, the sampler built.

The steps for each dataset, in order: resolve the global options into its entry
(:mod:`simpletuner.data.settings`); scan it, or reuse its stored scan (:mod:`simpletuner.data.scan_cache`);
take the ``max_num_samples`` subset; place each image (size rules, crop, bucket); pair it with its
conditioning images; fill the latent cache; cache the conditioning crops. Then every caption variant
is cached, the per-dataset samplers are built (raising repeats of too-small datasets when
``--allow_dataset_oversubscription`` allows it) and mixed.

Files are deleted from a dataset's storage only here, and only with ``delete_unwanted_images``
(images the size rules leave out) or ``delete_problematic_images`` (images that cannot be decoded).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from simpletuner.data.backends import Backend, cache_backend, is_remote_cache, open_dataset, storage_backend
from simpletuner.data.buckets import bucket_alignment, bucket_label, pixel_edge
from simpletuner.data.cache.store import BackendEntries, CacheReport, LocalEntries, TensorMemory
from simpletuner.data.cache.text import TextEmbedCache
from simpletuner.data.cache.vae import VaeCache, VaeCacheOptions
from simpletuner.data.caption_rules import CaptionRules
from simpletuner.data.conditioning import ConditioningSet, list_conditioning_files
from simpletuner.data.config import DatasetConfigError, DatasetPlan, ImageDatasetConfig
from simpletuner.data.dataset import (
    DatasetRole,
    DatasetSummary,
    EvalDataset,
    NoTrainingDataError,
    TrainingData,
)
from simpletuner.data.geometry import buckets_of, crop_anchor
from simpletuner.data.metadata import ImageRecord
from simpletuner.data.mixing import DatasetMixer, DatasetSchedule, dataset_weight
from simpletuner.data.video import fit_clip_length, frame_count_rule, placement_function
from simpletuner.data.sampler import BucketBatchSampler
from simpletuner.data.scan_cache import ScanCache, scan_settings_fingerprint, scan_with_cache
from simpletuner.data.settings import (
    DataSettings,
    check_conditioning_sampling,
    discovery_stages,
    resolve_dataset,
    text_cache_dir,
)

logger = logging.getLogger(__name__)

Size = tuple[int, int]

#: Prompts encoded together while filling the text cache. No option sets it: text encoders are
#: small next to the UNet/transformer, and the cache is filled once.
TEXT_ENCODE_BATCH_SIZE = 16


@dataclass
class PreparedDataset:
    """One dataset after start-up: its buckets, cache, summary and batch behaviour."""

    cfg: ImageDatasetConfig
    buckets: dict[Size, list[ImageRecord]]
    summary: DatasetSummary
    cache: VaeCache
    role: DatasetRole = field(default_factory=DatasetRole)


def build_training_data(config, model, plan: DatasetPlan, show_progress: bool = True,
                        num_processes: int = 1, rank: int = 0, feature_encoders: tuple | list = ()) -> TrainingData:
    """Scan, bucket and cache every enabled dataset, cache all captions, build the sampler.

    ``num_processes`` and ``rank`` come from the caller's accelerator (the defaults are one process):
    each dataset must fill at least one batch per process, and only rank 0 writes the shared scan and
    content-index files. The data layer never reads them from the environment.

    ``feature_encoders`` are further per-image encoders (a regularizer's teacher, see
    :class:`~simpletuner.regularizers.vision_teacher.TeacherFeatures`): each offers ``batch_key``,
    ``cache_folder``, ``latent_fingerprint_parts()``, ``encode_images(pixels)`` returning
    ``{"features": ...}`` and ``release()``. Every training image dataset caches their outputs beside
    its latents, from the same crops, and its batches carry them under ``batch_key``. Video datasets
    do not (their batches lack the key, and the reader computes what it needs itself).

    Raises:
        NoTrainingDataError: no usable image is left, or a dataset cannot fill a batch per process.
        CacheWriteError: a cache entry could not be written (e.g. full disk).
        DatasetConfigError: a global option makes a dataset entry invalid.
    """
    settings = DataSettings.from_config(config, num_processes=num_processes, rank=rank)
    _check_video_support(plan, model, config)
    memory = TensorMemory()
    conditioning = _open_conditioning(plan, config, settings, memory)
    prepared: dict[str, PreparedDataset] = {}
    summaries: list[DatasetSummary] = []
    for raw_cfg in plan.enabled_images:
        cfg = resolve_dataset(raw_cfg, config)
        sets = [conditioning[name] for name in cfg.conditioning_data]
        shared_filters = plan.text_embeds_for(cfg).caption_filter_list
        if cfg.dataset_type == "video" and (raw_cfg.video is None or raw_cfg.video.num_frames is None):
            logger.warning("dataset %s: no num_frames in its \"video\" object; training clips of %d frames (5 seconds "
                           "at --framerate); set num_frames to use less memory", cfg.id, cfg.video.num_frames)
        if cfg.dataset_type == "video":
            cfg = fit_clip_length(cfg, model)  # a length the family's VAE encodes whole (Wan: 1 + 4k)
        dataset = _prepare_dataset(cfg, settings, model, memory, sets, shared_filters, show_progress,
                                   role=cfg.dataset_type,
                                   feature_encoders=feature_encoders if cfg.dataset_type != "video" else ())
        summaries.append(dataset.summary)
        if any(dataset.buckets.values()):
            prepared[cfg.id] = dataset
    for encoder in feature_encoders:
        encoder.release()  # everything is cached; a later miss (on-demand caching) loads it again
    if not prepared:
        raise NoTrainingDataError(_nothing_left_message(summaries))
    evals = {}
    for raw_cfg in plan.eval_datasets:
        cfg = resolve_dataset(raw_cfg, config)
        evals[cfg.id] = _prepare_dataset(cfg, settings, model, memory, [], plan.text_embeds_for(cfg).caption_filter_list,
                                         show_progress, role="eval")
        summaries.append(evals[cfg.id].summary)
    everything = list(prepared.values()) + list(evals.values())
    text_caches, text_report = _cache_captions(plan, everything, config, settings, model, memory, show_progress)
    logger.info("text embeds: %d reused, %d built", text_report.reused, text_report.built)
    text_cache = text_caches[plan.text_embeds.id]
    mixer = _build_mixer(prepared, settings)
    bucket_of = {record: size for dataset in everything for size, records in dataset.buckets.items()
                 for record in records}
    data = TrainingData(
        mixer, summaries, text_report,
        latent_caches={dataset.cfg.id: dataset.cache for dataset in everything},
        text_cache=text_cache, bucket_of=bucket_of, batch_size=settings.batch_size,
        text_caches={dataset.cfg.id: text_caches[plan.text_embeds_for(dataset.cfg).id] for dataset in everything
                     if plan.text_embeds_for(dataset.cfg).id != plan.text_embeds.id},
        roles={name: dataset.role for name, dataset in prepared.items()},
        eval_datasets={name: EvalDataset(name, dataset.buckets) for name, dataset in evals.items()},
        seed=settings.seed, conditioning_sampling=settings.conditioning_sampling,
    )
    if settings.prefetch_batches:
        data.enable_prefetch(settings.prefetch_batches, settings.rank, settings.num_processes)
    return data


def _check_video_support(plan: DatasetPlan, model, config) -> None:
    """Video datasets need a family whose ``encode_images`` takes clips (it sets ``encodes_video = True``);
    image datasets join a video family's training as one-frame clips only where it allows it."""
    videos = [cfg.id for cfg in plan.enabled_images if cfg.dataset_type == "video"]
    encodes_video = getattr(model, "encodes_video", False)
    if videos and not encodes_video:
        raise DatasetConfigError(
            f"dataset {videos[0]!r} has \"dataset_type\": \"video\", but model family "
            f"{config.model_family!r} encodes images only; train it with a video model family, "
            "or disable the dataset")
    stills = [cfg.id for cfg in (*plan.enabled_images, *plan.eval_datasets) if cfg.dataset_type != "video"]
    if stills and encodes_video and not model.trains_images_as_clips():
        raise DatasetConfigError(
            f"dataset {stills[0]!r} holds images, but model family {config.model_family!r} cannot train images as "
            "one-frame clips; use \"dataset_type\": \"video\" datasets only, or disable the dataset")


def _cache_captions(plan: DatasetPlan, datasets: list[PreparedDataset], config, settings: DataSettings, model,
                    memory: TensorMemory, show_progress: bool) -> tuple[dict[str, TextEmbedCache], CacheReport]:
    """Encode every caption variant into the cache of its dataset's ``text_embeds`` entry.

    Returns the caches by entry id (the default entry's always among them) and the summed report.
    """
    entries = {plan.text_embeds.id: plan.text_embeds}
    captions: dict[str, list[str]] = {plan.text_embeds.id: []}
    for dataset in datasets:
        entry = plan.text_embeds_for(dataset.cfg)
        entries[entry.id] = entry
        captions.setdefault(entry.id, []).extend(caption for records in dataset.buckets.values()
                                                 for record in records for caption in record.caption_variants)
    skip_text = "text" in discovery_stages(config.skip_file_discovery)
    caches: dict[str, TextEmbedCache] = {}
    total = CacheReport()
    for entry_id, wanted in captions.items():
        cache = TextEmbedCache(text_cache_dir(entries[entry_id], config), model, memory, compress=settings.compress)
        report = cache.ensure(wanted, TEXT_ENCODE_BATCH_SIZE, progress=show_progress, verify=not skip_text)
        total.reused += report.reused
        total.built += report.built
        caches[entry_id] = cache
    return caches, total


# --- one dataset -----------------------------------------------------------------------------------


def _entries_for(cache_dir: str, cfg: ImageDatasetConfig, compress: bool) -> LocalEntries | BackendEntries:
    """Where a dataset's latents (and stored scan) live: a local folder or a bucket."""
    if is_remote_cache(cache_dir):
        return BackendEntries(cache_backend(cache_dir, cfg), compress=compress)
    return LocalEntries(Path(cache_dir), compress=compress)


def _prepare_dataset(cfg: ImageDatasetConfig, settings: DataSettings, model, memory: TensorMemory,
                     conditioning: list[ConditioningSet], shared_filters, show_progress: bool,
                     role: str = "image", feature_encoders: tuple | list = ()) -> PreparedDataset:
    """Scan, place, pair and cache one dataset (whose inherited settings are already filled)."""
    source = open_dataset(cfg)
    backend = source.images
    rules = CaptionRules.for_dataset(cfg, shared_filters)
    entries = _entries_for(cfg.cache_dir_vae, cfg, settings.compress)
    scan_cache = ScanCache(entries, cfg.id, scan_settings_fingerprint(cfg, rules), settings.metadata_update_interval,
                           is_main_process=settings.is_main_process)
    scan = scan_with_cache(cfg, source, rules, scan_cache, override=settings.override_dataset_config,
                           ignore_missing=settings.ignore_missing_files, workers=settings.scan_workers,
                           log_each=settings.print_filenames)
    for path, reason in scan.skipped:
        logger.warning("dataset %s: skipping %s: %s", cfg.id, path, reason)
    deleted: list[str] = []
    if cfg.delete_problematic_images:
        deleted += _delete(backend, scan.unreadable, cfg.id, "cannot be read (delete_problematic_images)")
    records = _subset(scan.records, cfg, settings.seed)
    edge = pixel_edge(cfg.resolution, cfg.resolution_type)
    alignment = bucket_alignment(settings.aspect_bucket_alignment, model.pixels_per_token(), edge)
    placed, excluded = placement_function(cfg, frame_count_rule(model))(records, cfg, alignment,
                                                                        settings.aspect_bucket_rounding)
    for path, reason in excluded:
        logger.info("dataset %s: leaving out %s: %s", cfg.id, path, reason)
    if cfg.delete_unwanted_images:
        left_out = {path for path, _ in excluded}
        keys = [record.key for record in records if record.path in left_out and record.key is not None]
        deleted += _delete(backend, keys, cfg.id, "left out by the size rules (delete_unwanted_images)")
    unpaired: list[tuple[object, str]] = []
    for cond in conditioning:
        for record, reason in cond.pair(list(placed)):
            placed.pop(record, None)
            unpaired.append((record.path, reason))
            logger.warning("dataset %s: skipping %s: %s", cfg.id, record.path, reason)
    buckets = buckets_of(placed)
    cache = _latent_cache_type(cfg, settings)(cfg.cache_dir_vae, cfg.id, cfg.instance_data_dir, crop=cfg.crop, memory=memory,
                                    images=backend, entries=entries, options=_vae_options(settings))
    problems: list[str] = []
    if cfg.delete_problematic_images:
        cache.on_problem = partial(_delete_problem, backend, cfg.id, problems)
    anchors = {record.path: placement.anchor for record, placement in placed.items()}
    stages = set(cfg.skip_file_discovery or ())
    report = cache.ensure(buckets, model, settings.vae_batch_size, progress=show_progress, anchors=anchors,
                          verify="vae" not in stages)
    buckets = _without(buckets, {path for path, _ in report.skipped})
    buckets = _moved(buckets, report.moved)
    flipped, flip_skipped = None, []
    if cfg.random_flip:
        placed_at = {record.path: cache.anchor_of(record) for records in buckets.values() for record in records}
        flipped, flip_skipped = _cache_flipped(cfg, settings, model, memory, backend, buckets, placed_at,
                                               show_progress, verify="vae" not in stages,
                                               feature_encoders=feature_encoders)
        buckets = _without(buckets, {path for path, _ in flip_skipped})
    cond_failures = _cache_conditioning(conditioning, buckets, cache, settings, show_progress)
    buckets = _without(buckets, {path for path, _ in cond_failures})
    logger.info("dataset %s: latents: %d reused, %d built", cfg.id, report.reused, report.built)
    features, feature_reports = {}, {}
    for encoder in feature_encoders:
        features[encoder.batch_key], feature_report = _cache_features(encoder, cfg, settings, memory, backend, buckets,
                                                                      anchors, show_progress, verify="vae" not in stages)
        buckets = _without(buckets, {path for path, _ in feature_report.skipped})
        feature_reports[encoder.batch_key] = feature_report
    summary = DatasetSummary(
        id=cfg.id,
        found=len(scan.records) + len(scan.skipped),
        skipped=list(scan.skipped) + excluded + unpaired + list(report.skipped) + flip_skipped + cond_failures
        + [item for feature_report in feature_reports.values() for item in feature_report.skipped],
        buckets={size: len(records) for size, records in buckets.items()},
        latents_built=report.built, latents_reused=report.reused, latents_deferred=report.deferred,
        latents_recreated=report.recreated, latents_moved=len(report.moved), repeats=cfg.repeats,
        deleted=deleted + problems, role=role, is_regularisation=cfg.is_regularisation_data,
        conditioning=tuple(cond.id for cond in conditioning),
        features={key: (item.reused, item.built) for key, item in feature_reports.items()},
    )
    dataset_role = DatasetRole(
        is_regularisation=cfg.is_regularisation_data, conditioning=list(conditioning),
        clear_each_epoch=cfg.vae_cache_clear_each_epoch,
        reanchor=lambda record, epoch: crop_anchor(record, cfg, epoch),
        records=[record for records in buckets.values() for record in records], features=features, flipped=flipped)
    return PreparedDataset(cfg, buckets, summary, cache, dataset_role)


def _cache_flipped(cfg: ImageDatasetConfig, settings: DataSettings, model, memory: TensorMemory, backend: Backend,
                   buckets: dict[Size, list[ImageRecord]], anchors: dict, show_progress: bool, verify: bool,
                   feature_encoders: tuple | list) -> tuple[VaeCache, list]:
    """``random_flip``: the latents of every crop mirrored, in ``<cache_dir_vae>/flipped`` (its own
    content index, so the plain cache's size bookkeeping is untouched). Returns the cache and the
    images it could not encode."""
    if feature_encoders:
        raise DatasetConfigError(f"dataset {cfg.id!r}: random_flip cannot be used with a regularizer that caches "
                                 "teacher features per image (they are taken from the unflipped crops); turn one off")
    folder = f"{cfg.cache_dir_vae.rstrip('/')}/flipped"
    cache = VaeCache(folder, cfg.id, cfg.instance_data_dir, crop=cfg.crop, memory=memory, images=backend,
                     entries=_entries_for(folder, cfg, settings.compress), options=_vae_options(settings),
                     label="flipped latents", flip=True)
    report = cache.ensure(buckets, model, settings.vae_batch_size, progress=show_progress, anchors=anchors,
                          verify=verify)
    logger.info("dataset %s: flipped latents: %d reused, %d built", cfg.id, report.reused, report.built)
    return cache, list(report.skipped)


def _cache_features(encoder, cfg: ImageDatasetConfig, settings: DataSettings, memory: TensorMemory, backend: Backend,
                    buckets: dict[Size, list[ImageRecord]], anchors: dict, show_progress: bool, verify: bool
                    ) -> tuple[VaeCache, CacheReport]:
    """Cache one per-image encoder's outputs for a dataset, in ``<cache_dir_vae>/<encoder.cache_folder>``,
    with the crops and cache mode of its latents."""
    folder = f"{cfg.cache_dir_vae.rstrip('/')}/{encoder.cache_folder}"
    cache = VaeCache(folder, cfg.id, cfg.instance_data_dir, crop=cfg.crop, memory=memory, images=backend,
                     entries=_entries_for(folder, cfg, settings.compress), options=_vae_options(settings),
                     label=encoder.batch_key.split(":")[0].replace("_", " "))
    report = cache.ensure(buckets, encoder, settings.vae_batch_size, progress=show_progress, anchors=anchors,
                          verify=verify)
    logger.info("dataset %s: %s: %d reused, %d built", cfg.id, encoder.batch_key, report.reused, report.built)
    return cache, report


def _latent_cache_type(cfg: ImageDatasetConfig, settings: DataSettings):
    """:class:`VaeCache` for images; for videos a cache of clips taking every ``frame_interval``-th frame."""
    if cfg.dataset_type != "video":
        return VaeCache
    from simpletuner.data.cache.video import VideoVaeCache

    return partial(VideoVaeCache, frame_interval=cfg.video.frame_interval, framerate=settings.framerate)


def _vae_options(settings: DataSettings) -> VaeCacheOptions:
    return VaeCacheOptions(mode=settings.vae_mode, scan_behaviour=settings.scan_behaviour, workers=settings.workers,
                           read_ahead=settings.read_ahead, process_ahead=settings.process_ahead,
                           write_batch_size=settings.write_batch_size, log_each=settings.print_filenames,
                           is_main_process=settings.is_main_process)


def _cache_conditioning(conditioning: list[ConditioningSet], buckets: dict[Size, list[ImageRecord]], cache: VaeCache,
                        settings: DataSettings, show_progress: bool) -> list[tuple[object, str]]:
    """Cache each record's conditioning crops now (unless caching is on demand or disabled)."""
    if settings.vae_mode != "upfront":
        return []
    jobs = [(record, size, cache.anchor_of(record)) for size, records in buckets.items() for record in records]
    failures = []
    for cond in conditioning:
        for record, reason in cond.ensure(jobs, show_progress):
            logger.warning("dataset %s: skipping %s: %s", cond.id, record.path, reason)
            failures.append((record.path, reason))
    return failures


def _open_conditioning(plan: DatasetPlan, config, settings: DataSettings, memory: TensorMemory
                       ) -> dict[str, ConditioningSet]:
    """The conditioning datasets some enabled image dataset pairs with, listed once each."""
    wanted = {name for cfg in plan.enabled_images for name in cfg.conditioning_data}
    sets = {}
    for name, raw in plan.conditioning.items():
        if name not in wanted:
            continue
        cfg = resolve_dataset(raw, config)
        images = storage_backend(cfg)
        sets[name] = ConditioningSet(cfg, images, list_conditioning_files(images),
                                     _entries_for(cfg.cache_dir_vae, cfg, settings.compress), memory,
                                     workers=settings.workers, write=settings.vae_mode != "disable",
                                     is_main_process=settings.is_main_process)
    check_conditioning_sampling(plan, settings.conditioning_sampling)
    return sets


def _delete(backend: Backend, keys: list[str], dataset_id: str, why: str) -> list[str]:
    """Delete ``keys`` from ``backend`` (the opt-in ``delete_*_images`` options); returns what went."""
    gone = []
    for key in keys:
        try:
            backend.delete(key)
        except OSError as exc:
            logger.warning("dataset %s: cannot delete %s: %s", dataset_id, backend.locate(key), exc)
            continue
        logger.warning("dataset %s: deleted %s: %s", dataset_id, backend.locate(key), why)
        gone.append(str(backend.locate(key)))
    return gone


def _delete_problem(backend: Backend, dataset_id: str, deleted: list[str], record: ImageRecord, reason: str) -> None:
    if record.key is not None:
        deleted += _delete(backend, [record.key], dataset_id, "cannot be decoded (delete_problematic_images)")


def _subset(records: list[ImageRecord], cfg: ImageDatasetConfig, seed: int) -> list[ImageRecord]:
    """At most ``max_num_samples`` records: a seeded random subset, kept in scan order."""
    if cfg.max_num_samples is None or len(records) <= cfg.max_num_samples:
        return records
    chosen = set(random.Random(f"max-num-samples:{seed}:{cfg.id}").sample(range(len(records)), cfg.max_num_samples))
    logger.info("dataset %s: using %d of %d images (max_num_samples)", cfg.id, cfg.max_num_samples, len(records))
    return [record for index, record in enumerate(records) if index in chosen]


def _without(buckets: dict[Size, list[ImageRecord]], paths: set) -> dict[Size, list[ImageRecord]]:
    """``buckets`` minus records whose file is in ``paths``; buckets left empty are removed."""
    if not paths:
        return buckets
    kept = {size: [r for r in records if r.path not in paths] for size, records in buckets.items()}
    return {size: records for size, records in kept.items() if records}


def _moved(buckets: dict[Size, list[ImageRecord]], moved: dict) -> dict[Size, list[ImageRecord]]:
    """``vae_cache_scan_behaviour sync``: records re-bucketed to the size they were cached at."""
    if not moved:
        return buckets
    regrouped: dict[Size, list[ImageRecord]] = {}
    for size, records in buckets.items():
        for record in records:
            regrouped.setdefault(tuple(moved.get(record, size)), []).append(record)
    return {size: regrouped[size] for size in sorted(regrouped)}


# --- sampling ----------------------------------------------------------------------------------------


def _batches_with(buckets: dict[Size, list[ImageRecord]], repeats: int, batch: int, keep_small: bool) -> int:
    """Batches per epoch a dataset gives with ``repeats`` (as :class:`BucketBatchSampler` counts)."""
    total = 0
    for records in buckets.values():
        copies = len(records) * (1 + repeats)
        total += 1 if keep_small and 0 < copies < batch else copies // batch
    return total


def minimum_repeats(buckets: dict[Size, list[ImageRecord]], repeats: int, batch: int, needed: int,
                    keep_small: bool = False) -> int:
    """The smallest repeats >= ``repeats`` giving at least ``needed`` batches per epoch.

    Computed by bisection between ``repeats`` and a count that surely suffices (the largest bucket
    alone fills ``needed`` batches), so it takes a few dozen evaluations even for an absurd
    ``--train_batch_size`` such as 10**40, where adding one repeat at a time would never finish.
    The batch count only grows with the repeats, which is what makes bisection exact.

    Raises:
        ValueError: ``buckets`` holds no image, so no number of repeats gives a batch.
    """
    if _batches_with(buckets, repeats, batch, keep_small) >= needed:
        return repeats
    largest = max((len(records) for records in buckets.values()), default=0)
    if largest == 0:
        raise ValueError("no image in any bucket: no number of repeats gives a batch")
    # largest * (1 + enough) >= needed * batch: the largest bucket alone gives the batches needed
    enough = max(repeats + 1, -(-needed * batch // largest) - 1)
    too_few = repeats
    while enough - too_few > 1:
        middle = (too_few + enough) // 2
        if _batches_with(buckets, middle, batch, keep_small) >= needed:
            enough = middle
        else:
            too_few = middle
    return enough


def _build_mixer(prepared: dict[str, PreparedDataset], settings: DataSettings) -> DatasetMixer:
    """One seeded bucket sampler per dataset and the draw schedule that mixes them.

    Each dataset must give at least one batch per process per epoch (``train_batch_size x
    processes`` samples). ``--allow_dataset_oversubscription`` raises the repeats of a dataset that
    does not, unless its entry sets ``repeats`` itself.
    """
    samplers: dict[str, BucketBatchSampler] = {}
    schedules: dict[str, DatasetSchedule] = {}
    batch, needed = settings.batch_size, settings.num_processes
    for name, dataset in prepared.items():
        cfg, buckets = dataset.cfg, dataset.buckets
        repeats = cfg.repeats
        have = _batches_with(buckets, repeats, batch, settings.keep_small_buckets)
        if have < needed:
            if settings.allow_oversubscription and "repeats" not in cfg.explicit_keys:
                repeats = minimum_repeats(buckets, repeats, batch, needed, settings.keep_small_buckets)
                logger.warning("dataset %s: %d images give %d batch(es) of %d per epoch, fewer than the %d process(es) "
                               "need; repeats raised from %d to %d (--allow_dataset_oversubscription)", name,
                               sum(map(len, buckets.values())), have, batch, needed, cfg.repeats, repeats)
                dataset.summary.repeats_raised_from = cfg.repeats
                dataset.summary.repeats = repeats
            else:
                raise NoTrainingDataError(_too_small_message(name, buckets, cfg, settings, have))
        samplers[name] = BucketBatchSampler(buckets, batch, seed=settings.seed, repeats={name: repeats},
                                            keep_small_buckets=settings.keep_small_buckets)
        images = sum(len(records) for records in buckets.values())
        schedules[name] = DatasetSchedule(
            weight=dataset_weight(settings.data_backend_sampling, cfg.probability, images, repeats),
            start_step=cfg.start_step, end_step=cfg.end_step,
        )
    return DatasetMixer(samplers, schedules, seed=settings.seed)


def _too_small_message(name: str, buckets: dict[Size, list[ImageRecord]], cfg: ImageDatasetConfig,
                       settings: DataSettings, have: int) -> str:
    """Why a dataset cannot fill its batches, with the repeats that would fix it."""
    sizes = ", ".join(f"{bucket_label(size)}: {len(records)} images" for size, records in buckets.items())
    fix = minimum_repeats(buckets, cfg.repeats, settings.batch_size, settings.num_processes,
                          settings.keep_small_buckets)
    if "repeats" in cfg.explicit_keys:
        how = f"set \"repeats\": {fix} in its entry (--allow_dataset_oversubscription leaves repeats set by hand alone)"
    else:
        how = f"set \"repeats\": {fix} in its entry or --allow_dataset_oversubscription"
    if have == 0:
        return (f"dataset {name}: `--train_batch_size {settings.batch_size}` is larger than every aspect bucket "
                f"({sizes}), so no batch can be formed; lower --train_batch_size, add images, {how}, or "
                "set --disable_bucket_pruning")
    return (f"dataset {name}: {sum(map(len, buckets.values()))} images x (1 + repeats {cfg.repeats}) give {have} "
            f"batch(es) of {settings.batch_size} per epoch, but {settings.num_processes} processes need one each "
            f"(train_batch_size x processes = {settings.batch_size * settings.num_processes} samples); {how}")


def _nothing_left_message(summaries: list[DatasetSummary]) -> str:
    """Name every dataset with its counts and first skip reason, so the fix is obvious."""
    parts = []
    for summary in summaries:
        first = f"; first reason: {summary.skipped[0][0]}: {summary.skipped[0][1]}" if summary.skipped else ""
        parts.append(f"{summary.id}: {summary.found} found, {len(summary.skipped)} skipped{first}")
    return ("no usable images in any enabled dataset (" + "; ".join(parts) + "); "
            "check instance_data_dir, image files and captions")
