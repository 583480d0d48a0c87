"""Global data options: the defaults they give dataset entries, and the knobs of the data path.

Several ``--flags`` are defaults for keys a ``multidatabackend.json`` entry may also set
(``--instance_prompt``, ``--minimum_image_size``, ``--delete_unwanted_images``, ...): the entry wins
when it sets the key itself (``ImageDatasetConfig.explicit_keys``). :func:`resolve_dataset` applies
them, then re-checks the rules that span both sources, so a global that breaks a dataset fails with
a message naming the flag and the dataset. :class:`DataSettings` gathers the flags that act on the
whole data path (caches, threads, prefetch) from a TrainConfig (tests build one with
:func:`simpletuner.testing.config.make_config`), so the options table alone gives the defaults; the
process count and rank come from the caller, never from the environment. This module imports without
torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from simpletuner.data.config import (
    DISCOVERY_STAGES,
    DatasetConfigError,
    ImageDatasetConfig,
    TextEmbedDatasetConfig,
    VideoSettings,
    check_instance_prompt,
)

#: A video dataset without ``num_frames`` trains clips of this many seconds at ``--framerate``
#: (SimpleTuner's default; 150 frames at 30 fps, so set ``num_frames`` for less memory).
DEFAULT_CLIP_SECONDS = 5
#: ``--framerate`` when unset.
DEFAULT_FRAMERATE = 30


def default_num_frames(config) -> int:
    """``num_frames`` of a video dataset that leaves it out: :data:`DEFAULT_CLIP_SECONDS` at ``--framerate``."""
    return DEFAULT_CLIP_SECONDS * int(_unset_or(config.framerate, DEFAULT_FRAMERATE))

#: Global flags that default a dataset key of the same name when the entry leaves it out.
_INHERITED_KEYS = ("instance_prompt", "prepend_instance_prompt", "only_instance_prompt", "minimum_image_size",
                   "maximum_image_size", "target_downsample_size", "max_upscale_threshold",
                   "delete_unwanted_images", "delete_problematic_images", "preserve_data_backend_cache")
#: Global flags that name a column of a dataset's ``parquet`` object the entry leaves out.
_PARQUET_COLUMN_OPTIONS = {"parquet_caption_column": "caption_column", "parquet_filename_column": "filename_column"}
#: ``--caption_strategy`` spells one choice differently from the dataset key.
_GLOBAL_CAPTION_STRATEGY = {"instance_prompt": "instanceprompt"}


def _unset_or(value, fallback):
    """``value``, or ``fallback`` when the option is unset (None): for options the table leaves unset,
    what "unset" means for the data path is decided here (e.g. ``--framerate`` -> 30)."""
    return fallback if value is None else value


def discovery_stages(value) -> tuple[str, ...]:
    """``--skip_file_discovery`` words ("vae metadata", ["vae", "text"], "vae,aspect") as a tuple.

    Raises:
        DatasetConfigError: an unknown stage; lists the valid ones.
    """
    if not value:
        return ()
    parts = [value] if isinstance(value, str) else list(value)
    words = tuple(word for part in parts for word in str(part).replace(",", " ").split() if word)
    for word in words:
        if word not in DISCOVERY_STAGES:
            raise DatasetConfigError(f"`--skip_file_discovery` has stage {word!r}; use any of {list(DISCOVERY_STAGES)}")
    return words


def resolve_dataset(cfg: ImageDatasetConfig, config) -> ImageDatasetConfig:
    """``cfg`` with every inheritable key filled from the global options of ``config``.

    Resolution, resolution type and cache folder come from :meth:`ImageDatasetConfig.with_global_defaults`
    (``--cache_dir_vae`` puts a dataset's latents in ``<cache_dir_vae>/<id>``); the keys in
    :data:`_INHERITED_KEYS`, ``--caption_strategy`` and ``--skip_file_discovery`` fill what the entry
    left out; ``--aws_max_pool_connections`` sizes the bucket's connection pool.

    Raises:
        DatasetConfigError: a global option makes the dataset invalid (names both).
    """
    changes: dict = {}
    explicit = cfg.explicit_keys
    global_vae_dir = config.cache_dir_vae
    if cfg.cache_dir_vae is None and global_vae_dir:
        changes["cache_dir_vae"] = os.path.join(global_vae_dir, cfg.id)
    for key in _INHERITED_KEYS:
        value = getattr(config, key)
        if key not in explicit and value is not None and getattr(cfg, key) is None:
            changes[key] = value
    strategy = config.caption_strategy
    if strategy and "caption_strategy" not in explicit and cfg.metadata_backend == "discovery":
        changes["caption_strategy"] = _GLOBAL_CAPTION_STRATEGY.get(strategy, strategy)
    if cfg.skip_file_discovery is None:
        changes["skip_file_discovery"] = discovery_stages(config.skip_file_discovery)
    pool = config.aws_max_pool_connections
    if pool and cfg.aws is not None:
        changes["aws"] = dataclasses.replace(cfg.aws, max_pool_connections=int(pool))
    if cfg.parquet is not None:
        columns = {column: getattr(config, option) for option, column in _PARQUET_COLUMN_OPTIONS.items()
                   if getattr(config, option) and f"parquet.{column}" not in explicit}
        if columns:
            changes["parquet"] = dataclasses.replace(cfg.parquet, **columns)
    if cfg.dataset_type == "video" and (cfg.video is None or cfg.video.num_frames is None):
        changes["video"] = dataclasses.replace(cfg.video or VideoSettings(), num_frames=default_num_frames(config))
    resolved = dataclasses.replace(cfg, **changes) if changes else cfg
    resolved = resolved.with_global_defaults(config.resolution, config.resolution_type, config.cache_dir)
    _check_resolved(resolved, changes)
    return resolved


def _check_resolved(cfg: ImageDatasetConfig, inherited: dict) -> None:
    """Rules that involve values inherited from global flags, checked on the merged result."""
    where = f"dataset {cfg.id!r} (with the global options)"
    if cfg.dataset_type != "conditioning":
        if cfg.caption_strategy == "parquet" and cfg.metadata_backend != "parquet":
            raise DatasetConfigError(f"{where}: `--caption_strategy parquet` needs \"metadata_backend\": \"parquet\"; "
                                     "set caption_strategy in the entry")
        check_instance_prompt(where, dataclasses.asdict(cfg))
    if (cfg.maximum_image_size is None) != (cfg.target_downsample_size is None):
        raise DatasetConfigError(f"{where}: maximum_image_size and target_downsample_size must be set together "
                                 f"(got {cfg.maximum_image_size!r} and {cfg.target_downsample_size!r}); set both "
                                 "(flags or entry keys) or neither")
    if cfg.maximum_image_size is not None and cfg.target_downsample_size > cfg.maximum_image_size:
        raise DatasetConfigError(f"{where}: target_downsample_size ({cfg.target_downsample_size!r}) must not exceed "
                                 f"maximum_image_size ({cfg.maximum_image_size!r})")
    for key in ("minimum_image_size", "max_upscale_threshold"):
        value = getattr(cfg, key)
        if key in inherited and value < 0:
            raise DatasetConfigError(f"`--{key}` = {value} must not be negative")


def text_cache_dir(entry: TextEmbedDatasetConfig, config) -> Path:
    """The text-embedding folder: the entry's ``cache_dir``, else ``--cache_dir_text``, else
    ``<--cache_dir>/text``."""
    if entry.cache_dir:
        return Path(entry.cache_dir)
    if config.cache_dir_text:
        return Path(config.cache_dir_text)
    return Path(config.cache_dir) / "text"


@dataclass(frozen=True)
class DataSettings:
    """The global knobs of the data path, resolved once.

    Attributes:
        seed: shuffles, subsets, caption variants and crops (``--seed``, 0 when unset).
        batch_size / num_processes: a dataset must fill ``batch_size x num_processes`` samples.
        rank: this process's index among ``num_processes`` (rank 0 writes the shared files).
        vae_batch_size: images per VAE call while caching.
        compress: gzip cache entries (``--compress_disk_cache``).
        scan_behaviour: ``recreate`` or ``sync`` for latents cached at another bucket size.
        vae_mode: ``upfront`` (cache at start-up), ``ondemand`` (at first use) or ``disable``.
        prefetch_batches: batches prepared ahead by a background thread (0 = off).
        print_filenames: log every file as it is scanned and encoded.
        read_ahead / process_ahead / workers / write_batch_size / scan_workers: I/O parallelism
            (see :mod:`simpletuner.data.parallel`).
        metadata_update_interval: seconds between saves of a partial scan (None: at the end only).
        override_dataset_config / ignore_missing_files: see :mod:`simpletuner.data.scan_cache`.
        aspect_bucket_rounding: decimals aspect ratios are rounded to before bucketing.
        keep_small_buckets: ``--disable_bucket_pruning``.
        allow_oversubscription: raise repeats of too-small datasets instead of failing.
        conditioning_sampling: ``combined`` or ``random`` with several conditioning datasets.
        framerate: frames per second assumed for video files that declare none (``--framerate``).
    """

    seed: int = 0
    batch_size: int = 1
    num_processes: int = 1
    rank: int = 0
    vae_batch_size: int = 4
    compress: bool = False
    scan_behaviour: str = "recreate"
    vae_mode: str = "upfront"
    prefetch_batches: int = 0
    print_filenames: bool = False
    read_ahead: int = 8
    process_ahead: int = 8
    workers: int = 1
    write_batch_size: int = 64
    scan_workers: int = 1
    metadata_update_interval: float | None = None
    override_dataset_config: bool = False
    ignore_missing_files: bool = False
    aspect_bucket_rounding: int | None = None
    keep_small_buckets: bool = False
    allow_oversubscription: bool = False
    conditioning_sampling: str = "combined"
    data_backend_sampling: str = "auto-weighting"
    aspect_bucket_alignment: int = 64
    framerate: float | None = None

    @property
    def is_main_process(self) -> bool:
        """Rank 0 writes the files every process shares (stored scans, content indexes)."""
        return self.rank == 0

    @classmethod
    def from_config(cls, config, num_processes: int = 1, rank: int = 0) -> "DataSettings":
        """The settings of ``config`` for process ``rank`` of ``num_processes``.

        The caller (the trainer, from its accelerator) passes the process count and rank; the defaults
        are a single process, so tools and tests need not know about launchers.
        """
        vae_batch = int(config.vae_batch_size)
        workers = config.max_workers or min(4, os.cpu_count() or 1)
        mode = "disable" if config.vae_cache_disable else ("ondemand" if config.vae_cache_ondemand else "upfront")
        return cls(
            seed=int(_unset_or(config.seed, 0)),
            batch_size=int(config.train_batch_size),
            num_processes=num_processes,
            rank=rank,
            vae_batch_size=vae_batch,
            compress=bool(config.compress_disk_cache),
            scan_behaviour=config.vae_cache_scan_behaviour,
            vae_mode=mode,
            prefetch_batches=int(config.dataloader_prefetch_qlen) if config.dataloader_prefetch else 0,
            print_filenames=bool(config.print_filenames),
            read_ahead=int(_unset_or(config.read_batch_size, 2 * vae_batch)),
            process_ahead=int(_unset_or(config.image_processing_batch_size, 2 * vae_batch)),
            workers=int(workers),
            write_batch_size=int(config.write_batch_size),
            scan_workers=int(config.aspect_bucket_worker_count),
            metadata_update_interval=config.metadata_update_interval,
            override_dataset_config=bool(config.override_dataset_config),
            ignore_missing_files=bool(config.ignore_missing_files),
            aspect_bucket_rounding=config.aspect_bucket_rounding,
            keep_small_buckets=bool(config.disable_bucket_pruning),
            allow_oversubscription=bool(config.allow_dataset_oversubscription),
            conditioning_sampling=_unset_or(config.conditioning_multidataset_sampling, "combined"),
            data_backend_sampling=config.data_backend_sampling,
            aspect_bucket_alignment=int(config.aspect_bucket_alignment),
            framerate=config.framerate,
        )


#: Global data options that must be at least 1 when set.
_POSITIVE_OPTIONS = ("framerate", "dataloader_prefetch_qlen", "read_batch_size", "write_batch_size", "max_workers",
                     "image_processing_batch_size", "aws_max_pool_connections", "aspect_bucket_worker_count")


def check_global_data_options(config, plan=None) -> None:
    """Ranges of the global data options, and every dataset of ``plan`` with them applied, so a
    bad combination fails at validation, before any model loads.

    Raises:
        DatasetConfigError: names the option (and the dataset) and the fix.
    """
    for name in _POSITIVE_OPTIONS:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise DatasetConfigError(f"`--{name}` = {value} must be at least 1")
    for name in ("metadata_update_interval", "minimum_image_size", "max_upscale_threshold"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise DatasetConfigError(f"`--{name}` = {value} must not be negative")
    discovery_stages(config.skip_file_discovery)
    if plan is not None:
        for cfg in plan.images:
            if not cfg.disabled:
                resolve_dataset(cfg, config)
        check_conditioning_sampling(plan, config.conditioning_multidataset_sampling)
        from simpletuner.methods.prior_preservation import check_regularisation_targets

        check_regularisation_targets(config, plan)
        from simpletuner.options.controlnet_rules import check_controlnet_datasets

        check_controlnet_datasets(config, plan)  # --controlnet: every trained dataset has control images


def check_conditioning_sampling(plan, sampling: str | None) -> None:
    """``random`` gives each sample one conditioning image, so one batch may only stack one type.

    Raises:
        DatasetConfigError: an image dataset pairs conditioning datasets of different types.
    """
    if sampling != "random":
        return
    conditioning = plan.conditioning
    for cfg in plan.enabled_images:
        kinds = {conditioning[name].conditioning_type for name in cfg.conditioning_data if name in conditioning}
        if len(kinds) > 1:
            raise DatasetConfigError(
                f"dataset {cfg.id!r}: `--conditioning_multidataset_sampling random` picks one conditioning image per "
                f"sample, so its conditioning datasets must share one conditioning_type (got {sorted(kinds)}); use "
                "`combined` or pair datasets of one type")
