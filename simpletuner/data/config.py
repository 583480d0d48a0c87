"""The dataset list schema (``multidatabackend.json``): parse, validate, and fail early.

The file is a JSON list of objects, one per dataset. Image datasets say where the pictures are and how
they are captioned and sized; exactly one ``text_embeds`` entry says where prompt embeddings are
cached. Every mistake is reported before any model is loaded, with a message that names the file,
the dataset, the key, the value and the fix, because a typo found after a 20-minute model load is
the most expensive kind of typo.

This module must import without torch: it runs on the CLI's validation path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpletuner.options import ConfigError

CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt", "parquet", "huggingface")
#: ``pixel``: shorter edge in px; ``pixel_area``: edge of an equal-area square in px;
#: ``area``: megapixels (see :func:`simpletuner.data.buckets.target_size`).
RESOLUTION_TYPES = ("pixel", "pixel_area", "area")
SUPPORTED_BACKEND_TYPES = ("local", "aws", "parquet", "huggingface")
#: Where the list of images (and captions/sizes from a table) comes from; see ``metadata_backend``.
METADATA_BACKENDS = ("discovery", "parquet", "huggingface")
#: The metadata backend each storage type implies, and the ones it allows.
_METADATA_FOR_TYPE = {
    "local": ("discovery", "parquet"),
    "aws": ("discovery", "parquet"),
    "parquet": ("parquet",),
    "huggingface": ("huggingface",),
}
TEXT_EMBED_BACKEND_TYPES = ("local",)
#: ``image``: trained on; ``video``: trained on, clips of frames (:mod:`simpletuner.data.video`);
#: ``conditioning``: paired to image datasets by relative path (masks, control images), never sampled
#: alone; ``eval``: loaded and cached for evaluation, never trained on.
DATASET_TYPES = ("image", "video", "text_embeds", "conditioning", "eval")
#: Dataset types whose batches are trained on.
TRAINED_DATASET_TYPES = ("image", "video")
#: What a ``conditioning`` dataset holds; ``mask`` yields ``batch["mask"]``, the others
#: ``batch["conditioning_pixels"]`` (see :mod:`simpletuner.data.conditioning`).
CONDITIONING_TYPES = ("mask", "controlnet", "reference_strict", "reference_loose")
#: Start-up stages ``skip_file_discovery`` can skip (see :mod:`simpletuner.data.scan_cache`).
DISCOVERY_STAGES = ("aspect", "metadata", "vae", "text")


class DatasetConfigError(ConfigError):
    """A dataset list that cannot be used; the message says where the problem is and how to fix it."""


@dataclass(frozen=True)
class AwsSettings:
    """The ``aws_*`` keys of a dataset entry: where its bucket is and how to sign in.

    Credentials left out (None) come from the standard AWS environment. They are excluded from
    ``repr`` so that logging a config never prints them.

    Attributes (the dataset entry's keys carry an ``aws_`` prefix: ``aws_bucket_name``, ...):
        bucket_name: the bucket holding the images.
        data_prefix: the folder inside the bucket; empty means the whole bucket.
        region_name: the bucket's region, e.g. us-east-1; empty uses the AWS default.
        endpoint_url: the address of an S3-compatible server (MinIO, R2, ...); empty means Amazon S3.
        access_key_id / secret_access_key: credentials; leave them out to use the standard AWS
            environment variables or profile.
    """

    bucket_name: str
    data_prefix: str = ""
    region_name: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    max_pool_connections: int | None = None


@dataclass(frozen=True)
class TableSettings:
    """The ``parquet`` or ``huggingface`` object of a dataset entry: which columns mean what.

    Attributes:
        path: the parquet file (or folder of parquet files); unused for ``huggingface``, whose
            table is ``dataset_name``.
        filename_column: the column naming each image file, relative to ``instance_data_dir`` (or
            the bucket prefix); unused when ``image_column`` holds the images.
        caption_column / fallback_caption_column: the caption, and the column used when it is empty.
        width_column / height_column: image sizes, so that no image header has to be read.
        image_column: a column holding the encoded image bytes (or a Hugging Face ``Image``).
        identifier_includes_extension: the file name column is used exactly as written; otherwise
            a name without an image extension is matched against the files' stems.
        split: the split of a Hugging Face ``DatasetDict`` (``train`` by default).
    """

    path: str | None = None
    filename_column: str | None = None
    caption_column: str = "caption"
    fallback_caption_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    image_column: str | None = None
    identifier_includes_extension: bool = False
    split: str | None = None


@dataclass(frozen=True)
class VideoSettings:
    """The ``video`` object of a ``"dataset_type": "video"`` entry: which frames of each file are trained.

    Attributes:
        num_frames: frames per training clip; None until the global ``--framerate`` fills it
            (5 seconds' worth, see :func:`simpletuner.data.settings.resolve_dataset`).
        min_frames: files with fewer frames are left out; None means :attr:`span` (every kept
            file gives a full clip). A lower value keeps shorter files, trained as shorter clips.
        max_frames: files with more frames are left out; None means no limit.
        frame_interval: take every N-th frame (1 = consecutive frames).
    """

    num_frames: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    frame_interval: int = 1

    @property
    def span(self) -> int:
        """Source frames a full clip covers: ``(num_frames - 1) * frame_interval + 1``."""
        return (self.num_frames - 1) * self.frame_interval + 1


@dataclass(frozen=True)
class ImageDatasetConfig:
    """One image dataset from ``multidatabackend.json``.

    Attributes:
        id: unique name; used in cache paths and logs, so renaming it invalidates its caches.
        type: storage backend: ``local``, ``aws`` (a bucket), ``parquet`` (local files listed by a
            parquet table) or ``huggingface`` (a dataset saved on disk).
        instance_data_dir: folder holding the images (searched recursively). Relative paths are
            kept as written and resolved against the working directory by callers. None for
            datasets whose images are in a bucket or a table.
        caption_strategy: where captions come from: ``textfile`` (``<stem>.txt`` beside each
            image), ``filename`` (the file stem) or ``instanceprompt`` (one prompt for all).
        instance_prompt: the prompt used for every image; required for ``instanceprompt``.
        resolution: training resolution; None inherits the global ``--resolution``.
        resolution_type: ``pixel``, ``pixel_area`` or ``area``; None inherits the global setting.
        crop: train on a square centre crop instead of an aspect-preserving bucket.
        repeats: extra passes over this dataset per epoch (0 = each image seen once), used to
            balance a small dataset against a large one.
        cache_dir_vae: where VAE latents are cached; None means ``<global cache_dir>/vae/<id>``.
        disabled: keep the entry in the file but do not train on it.
        minimum_image_size: leave out images smaller than this (unit of ``resolution_type``).
        maximum_image_size: images larger than this are first shrunk to ``target_downsample_size``.
        target_downsample_size: the size very large images are shrunk to; set with the above.
        minimum_aspect_ratio / maximum_aspect_ratio: leave out images whose width/height is outside.
        max_upscale_threshold: leave out images that need more than this fraction of enlargement.
        crop_style: where a crop window sits: ``center``, ``corner`` (top-left) or ``random``.
        crop_aspect: aspect of cropped images: ``square``, ``preserve`` (the image's own), ``closest``
            (nearest of ``crop_aspect_buckets``) or ``random`` (one of them, chosen per image).
        crop_aspect_buckets: aspect ratios (width/height) for ``closest`` and ``random``.
        probability: relative weight when several datasets are mixed (0 disables drawing from it).
        max_num_samples: use at most this many images (a seeded random subset) from the dataset.
        start_step / end_step: the dataset is drawn only at optimizer steps in [start_step, end_step).
        metadata_backend: where the image list comes from: ``discovery`` (list the files),
            ``parquet`` or ``huggingface`` (a table that also gives captions and maybe sizes).
        aws: bucket settings of an ``aws`` dataset.
        parquet / huggingface: column settings of a table dataset.
        dataset_name: the folder of a Hugging Face dataset (``save_to_disk``, parquet or arrow files).
        dataset_type: ``image`` (trained on), ``video`` (clips of video files, trained on),
            ``conditioning`` (paired to image datasets) or ``eval``.
        prepend_instance_prompt / only_instance_prompt: put ``instance_prompt`` in front of every
            caption, or use it alone; None inherits the global flag.
        caption_filter_list: strings, regular expressions or ``s/find/replace/`` lines applied to
            every caption: a list, or the path of a text file (one per line) or JSON list.
        disable_multiline_split: keep a caption file's lines together as one caption instead of
            treating each line as a variant (one variant is picked per epoch).
        is_regularisation_data: batches of this dataset carry ``is_regularisation_data=True`` so a
            method can treat them as prior-preservation data.
        vae_cache_clear_each_epoch: delete this dataset's latents after each of its epochs and
            encode them again when next used (random crops are then re-drawn each epoch).
        hash_filenames: accepted for compatibility; cache file names are always content hashes.
        skip_file_discovery: start-up stages to skip (``aspect``, ``metadata``, ``vae``, ``text``);
            None inherits the global option.
        preserve_data_backend_cache: reuse the stored file listing instead of listing storage again.
        delete_unwanted_images / delete_problematic_images: delete images left out by the size
            rules / that cannot be decoded; None inherits the global flag.
        conditioning_data: ids of ``conditioning`` datasets paired to this one by relative path.
        conditioning_type: what a ``conditioning`` dataset holds (see :data:`CONDITIONING_TYPES`).
        video: frame settings of a ``video`` dataset (None for the other types).
        text_embeds: id of the ``text_embeds`` entry whose cache (and caption filters) this dataset
            uses; None means the default one.
        explicit_keys: the keys the entry set itself, so global options fill only the others (keys
            set inside the ``parquet`` object appear as ``parquet.<key>``).
    """

    id: str
    type: str
    instance_data_dir: str | None = None
    caption_strategy: str = "textfile"
    instance_prompt: str | None = None
    resolution: float | None = None
    resolution_type: str | None = None
    crop: bool = False
    repeats: int = 0
    cache_dir_vae: str | None = None
    disabled: bool = False
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    max_upscale_threshold: float | None = None
    crop_style: str = "center"
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] | None = None
    probability: float = 1.0
    max_num_samples: int | None = None
    start_step: int = 0
    end_step: int | None = None
    metadata_backend: str = "discovery"
    aws: AwsSettings | None = None
    parquet: TableSettings | None = None
    huggingface: TableSettings | None = None
    dataset_name: str | None = None
    dataset_type: str = "image"
    prepend_instance_prompt: bool | None = None
    only_instance_prompt: bool | None = None
    caption_filter_list: str | tuple[str, ...] | None = None
    disable_multiline_split: bool = False
    is_regularisation_data: bool = False
    vae_cache_clear_each_epoch: bool = False
    hash_filenames: bool = True
    skip_file_discovery: tuple[str, ...] | None = None
    preserve_data_backend_cache: bool | None = None
    delete_unwanted_images: bool | None = None
    delete_problematic_images: bool | None = None
    conditioning_data: tuple[str, ...] = ()
    conditioning_type: str | None = None
    video: VideoSettings | None = None
    text_embeds: str | None = None
    explicit_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def with_global_defaults(
        self, resolution: float, resolution_type: str, cache_dir: str | Path
    ) -> "ImageDatasetConfig":
        """A copy whose inheritable fields (resolution, resolution_type, cache_dir_vae) are filled.

        Kept out of parsing so that the dataset file can be validated without the training config.
        """
        return dataclasses.replace(
            self,
            resolution=self.resolution if self.resolution is not None else resolution,
            resolution_type=self.resolution_type if self.resolution_type is not None else resolution_type,
            cache_dir_vae=self.cache_dir_vae
            if self.cache_dir_vae is not None
            else os.path.join(os.fspath(cache_dir), "vae", self.id),
        )


@dataclass(frozen=True)
class TextEmbedDatasetConfig:
    """Where prompt embeddings are cached.

    Attributes:
        id: unique name among all datasets.
        cache_dir: folder for the cached embeddings (kept as written; resolved against the CWD);
            None means ``--cache_dir_text``, else ``<--cache_dir>/text``.
        caption_filter_list: a filter list applied to the captions of every image dataset (as
            SimpleTuner takes it on the text-embed entry); an image dataset's own list runs first.
        default: the entry used by image datasets; must be true for exactly one entry when
            several are listed.
    """

    id: str
    cache_dir: str | None
    default: bool = True
    caption_filter_list: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetPlan:
    """The validated dataset list.

    Attributes:
        images: every image dataset in file order, disabled ones included (so tools can show them).
        text_embeds: the default text-embedding cache.
        text_embed_entries: every ``text_embeds`` entry, by id (the default one included).
    """

    images: tuple[ImageDatasetConfig, ...]
    text_embeds: TextEmbedDatasetConfig
    text_embed_entries: dict[str, TextEmbedDatasetConfig] = field(default_factory=dict)

    @property
    def enabled_images(self) -> tuple[ImageDatasetConfig, ...]:
        """The image and video datasets that take part in training (conditioning and eval ones excluded)."""
        return tuple(cfg for cfg in self.images if not cfg.disabled and cfg.dataset_type in TRAINED_DATASET_TYPES)

    def text_embeds_for(self, cfg: ImageDatasetConfig) -> TextEmbedDatasetConfig:
        """The ``text_embeds`` entry a dataset uses: the one its ``text_embeds`` key names, else the default."""
        if cfg.text_embeds is None:
            return self.text_embeds
        return self.text_embed_entries.get(cfg.text_embeds, self.text_embeds)

    @property
    def conditioning(self) -> dict[str, ImageDatasetConfig]:
        """Enabled ``conditioning`` datasets by id."""
        return {cfg.id: cfg for cfg in self.images if not cfg.disabled and cfg.dataset_type == "conditioning"}

    @property
    def eval_datasets(self) -> tuple[ImageDatasetConfig, ...]:
        """Enabled ``eval`` datasets: cached like training data, never sampled for training."""
        return tuple(cfg for cfg in self.images if not cfg.disabled and cfg.dataset_type == "eval")


# --- key declarations: (expected kind, default) ------------------------------------------------
# Kinds: "str", "optional_str", "number", "int", "bool". ``dataset_type`` is accepted everywhere.

_REQUIRED = object()

_IMAGE_KEYS: dict[str, tuple[str, Any]] = {
    "id": ("str", _REQUIRED),
    "dataset_type": ("str", "image"),
    "type": ("str", _REQUIRED),
    "instance_data_dir": ("optional_str", None),  # required by local and parquet (see _check_storage)
    "caption_strategy": ("str", "textfile"),
    "instance_prompt": ("optional_str", None),
    "resolution": ("number", None),
    "resolution_type": ("optional_str", None),
    "crop": ("bool", False),
    "repeats": ("int", 0),
    "cache_dir_vae": ("optional_str", None),
    "disabled": ("bool", False),
    "minimum_image_size": ("number", None),
    "maximum_image_size": ("number", None),
    "target_downsample_size": ("number", None),
    "minimum_aspect_ratio": ("number", None),
    "maximum_aspect_ratio": ("number", None),
    "max_upscale_threshold": ("number", None),
    "crop_style": ("str", "center"),
    "crop_aspect": ("str", "square"),
    "crop_aspect_buckets": ("number_list", None),
    "probability": ("number", 1.0),
    "max_num_samples": ("optional_int", None),
    "start_step": ("int", 0),
    "end_step": ("optional_int", None),
    "metadata_backend": ("optional_str", None),
    "aws_bucket_name": ("optional_str", None),
    "aws_data_prefix": ("optional_str", None),
    "aws_region_name": ("optional_str", None),
    "aws_endpoint_url": ("optional_str", None),
    "aws_access_key_id": ("optional_str", None),
    "aws_secret_access_key": ("optional_str", None),
    "parquet": ("object", None),
    "huggingface": ("object", None),
    "dataset_name": ("optional_str", None),
    "prepend_instance_prompt": ("optional_bool", None),
    "only_instance_prompt": ("optional_bool", None),
    "caption_filter_list": ("filter_list", None),
    "disable_multiline_split": ("bool", False),
    "is_regularisation_data": ("bool", False),
    "vae_cache_clear_each_epoch": ("bool", False),
    "hash_filenames": ("bool", True),
    "skip_file_discovery": ("word_list", None),
    "preserve_data_backend_cache": ("optional_bool", None),
    "delete_unwanted_images": ("optional_bool", None),
    "delete_problematic_images": ("optional_bool", None),
    "conditioning_data": ("id_list", ()),
    "conditioning_type": ("optional_str", None),
    "video": ("object", None),
    "text_embeds": ("optional_str", None),
}

#: Other spellings SimpleTuner accepts, mapped to ours.
_IMAGE_KEY_ALIASES = {"is_regularization_data": "is_regularisation_data", "disable": "disabled"}

_AWS_KEYS = ("aws_bucket_name", "aws_data_prefix", "aws_region_name", "aws_endpoint_url",
             "aws_access_key_id", "aws_secret_access_key")

#: Keys of the ``parquet`` object (SimpleTuner's shape); ``path`` is the table file.
_PARQUET_KEYS: dict[str, tuple[str, Any]] = {
    "path": ("str", _REQUIRED),
    "filename_column": ("str", "filename"),
    "caption_column": ("str", "caption"),
    "fallback_caption_column": ("optional_str", None),
    "width_column": ("optional_str", None),
    "height_column": ("optional_str", None),
    "image_column": ("optional_str", None),
    "identifier_includes_extension": ("bool", False),
}

#: Keys of the ``huggingface`` object; the dataset folder is the top-level ``dataset_name``.
_HUGGINGFACE_KEYS: dict[str, tuple[str, Any]] = {
    "image_column": ("str", "image"),
    "caption_column": ("str", "caption"),
    "fallback_caption_column": ("optional_str", None),
    "width_column": ("optional_str", None),
    "height_column": ("optional_str", None),
    "split": ("optional_str", None),
}

#: Keys of the ``video`` object of a ``video`` dataset (SimpleTuner's shape); see :class:`VideoSettings`.
_VIDEO_KEYS: dict[str, tuple[str, Any]] = {
    "num_frames": ("optional_int", None),
    "min_frames": ("optional_int", None),
    "max_frames": ("optional_int", None),
    "frame_interval": ("int", 1),
}

CROP_STYLES = ("center", "corner", "random")
CROP_ASPECTS = ("square", "preserve", "closest", "random")

_TEXT_EMBED_KEYS: dict[str, tuple[str, Any]] = {
    "id": ("str", _REQUIRED),
    "dataset_type": ("str", "text_embeds"),
    "type": ("str", "local"),
    "cache_dir": ("optional_str", None),
    "default": ("bool", True),
    "disabled": ("bool", False),
    "caption_filter_list": ("filter_list", None),
}

_KIND_WORDS = {
    "str": "a string",
    "optional_str": "a string or null",
    "number": "a number",
    "int": "an integer",
    "bool": 'true/false (or the strings "true"/"false")',
    "number_list": "a list of positive numbers or null",
    "optional_int": "an integer or null",
    "object": "a JSON object or null",
    "optional_bool": 'true/false or null',
    "filter_list": "a list of strings, or the path of a text or JSON file",
    "word_list": "a list of words, or a string of words separated by commas or spaces",
    "id_list": "a dataset id or a list of dataset ids",
}


def dataset_key_schema(dataset_type: str = "image") -> dict[str, tuple[str, Any, bool]]:
    """Key -> (kind, default, required) of an ``image`` or ``text_embeds`` entry.

    For tools that write dataset lists (``simpletuner configure``), so that they coerce and default
    values from this schema instead of keeping a copy of it.
    """
    declared = _TEXT_EMBED_KEYS if dataset_type == "text_embeds" else _IMAGE_KEYS
    return {key: (_PLAIN_KINDS.get(kind, kind), None if default is _REQUIRED else default, default is _REQUIRED)
            for key, (kind, default) in declared.items()}


#: Kinds a tool can write as plain text (the parser accepts that form too): a yes/no, a filter file
#: path, words separated by spaces, one dataset id.
_PLAIN_KINDS = {"optional_bool": "bool", "filter_list": "optional_str", "word_list": "optional_str",
                "id_list": "optional_str"}


def load_dataset_plan(path: str | Path) -> DatasetPlan:
    """Read and validate a ``multidatabackend.json`` file.

    Raises:
        DatasetConfigError: the file is missing, not valid JSON (with line and column), or any
            entry breaks a rule of :func:`parse_dataset_plan`.
    """
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetConfigError(
            f"{source}: dataset list not found; create it (see multidatabackend.json.example) "
            f"or point --data_backend_config at the right file"
        ) from None
    except OSError as exc:
        raise DatasetConfigError(f"{source}: cannot read the dataset list: {exc}") from exc
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetConfigError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
            f"fix the syntax there (a trailing comma or a missing quote is the usual cause)"
        ) from None
    return parse_dataset_plan(entries, source=source)


def parse_dataset_plan(entries: list, source: str = "<memory>") -> DatasetPlan:
    """Validate an already-decoded dataset list.

    ``source`` names the origin in error messages (the file path when called by
    :func:`load_dataset_plan`).

    Raises:
        DatasetConfigError: see the module docstring; each message names file, dataset, key,
            value and the fix.
    """
    if not isinstance(entries, list):
        raise DatasetConfigError(
            f"{source}: the dataset list must be a JSON list of objects, got {type(entries).__name__}; "
            f"wrap the entries in [ ... ]"
        )
    images: list[ImageDatasetConfig] = []
    text_embeds: list[TextEmbedDatasetConfig] = []
    seen_ids: dict[str, int] = {}
    for index, entry in enumerate(entries):
        label = f"entry {index}"
        if not isinstance(entry, dict):
            raise DatasetConfigError(
                f"{source}: {label} must be a JSON object, got {type(entry).__name__} {entry!r}"
            )
        parsed = _parse_entry(entry, index, source)
        _check_unique_id(parsed.id, index, seen_ids, source)
        if isinstance(parsed, ImageDatasetConfig):
            images.append(parsed)
        else:
            text_embeds.append(parsed)
    _check_conditioning_links(images, source)
    _check_text_embeds_links(images, text_embeds, source)
    return DatasetPlan(images=tuple(images), text_embeds=_pick_default_text_embeds(text_embeds, images, source),
                       text_embed_entries={cfg.id: cfg for cfg in text_embeds})


# --- per-entry parsing -------------------------------------------------------------------------


def _parse_entry(entry: dict, index: int, source: str) -> ImageDatasetConfig | TextEmbedDatasetConfig:
    """Dispatch on ``dataset_type`` and parse one entry."""
    dataset_type = entry.get("dataset_type", "image")
    where = _where(source, entry, index)
    if dataset_type not in DATASET_TYPES:
        raise DatasetConfigError(
            f"{where}: key 'dataset_type' has value {dataset_type!r}; use one of {list(DATASET_TYPES)}"
        )
    if dataset_type == "text_embeds":
        return _parse_text_embeds(entry, where)
    return _parse_image(_unalias(entry, where), where)


def _unalias(entry: dict, where: str) -> dict:
    """Rename SimpleTuner's other spellings (``is_regularization_data``, ``disable``) to ours."""
    renamed = dict(entry)
    for alias, key in _IMAGE_KEY_ALIASES.items():
        if alias in renamed:
            if key in renamed:
                raise DatasetConfigError(f"{where}: keys {alias!r} and {key!r} mean the same thing; keep one")
            renamed[key] = renamed.pop(alias)
    return renamed


def _parse_image(entry: dict, where: str) -> ImageDatasetConfig:
    """Validate an image (or conditioning / eval) entry's keys, types and cross-field rules."""
    values = _typed_values(entry, _IMAGE_KEYS, where)
    table_keys = entry.get("parquet") if isinstance(entry.get("parquet"), dict) else {}
    values["explicit_keys"] = frozenset(entry) | {f"parquet.{key}" for key in table_keys}
    _check_dataset_role(where, values)
    _check_storage(where, entry, values)
    _check_video(where, values)
    if "caption_strategy" not in entry and values["metadata_backend"] != "discovery":
        values["caption_strategy"] = values["metadata_backend"]  # a table's own captions by default
    _check_choice(where, "caption_strategy", values["caption_strategy"], CAPTION_STRATEGIES)
    _check_caption_source(where, values)
    if values["resolution_type"] is not None:
        _check_choice(where, "resolution_type", values["resolution_type"], RESOLUTION_TYPES)
    if values["dataset_type"] != "conditioning":
        check_instance_prompt(where, values)
    if values["resolution"] is not None and values["resolution"] <= 0:
        raise DatasetConfigError(
            f"{where}: key 'resolution' has value {values['resolution']!r}; use a positive number "
            f"or remove the key to inherit --resolution"
        )
    if values["repeats"] < 0:
        raise DatasetConfigError(
            f"{where}: key 'repeats' has value {values['repeats']!r}; use 0 (seen once per epoch) or more"
        )
    if values["resolution"] is not None:
        values["resolution"] = float(values["resolution"])
    _check_geometry(where, values)
    _check_sampling(where, values)
    if not values["disabled"]:
        _check_paths_exist(where, values)
    return ImageDatasetConfig(**values)


def check_instance_prompt(where: str, values: dict[str, Any]) -> None:
    """``instanceprompt`` captions and ``only``/``prepend_instance_prompt`` need a non-empty prompt.

    Public because the global options (``--instance_prompt``, ``--only_instance_prompt``) are
    applied later (:mod:`simpletuner.data.settings`) and the rule must hold afterwards too.
    """
    if values["caption_strategy"] == "instanceprompt" and not (values["instance_prompt"] or "").strip():
        raise DatasetConfigError(
            f"{where}: key 'instance_prompt' has value {values['instance_prompt']!r}; "
            f"caption_strategy 'instanceprompt' needs a non-empty instance_prompt"
        )
    for key in ("only_instance_prompt", "prepend_instance_prompt"):
        if values.get(key) and not (values["instance_prompt"] or "").strip():
            raise DatasetConfigError(f"{where}: {key} is set but 'instance_prompt' is empty; add an instance_prompt "
                                     f"(in the entry or with --instance_prompt) or remove {key}")


def _check_dataset_role(where: str, values: dict[str, Any]) -> None:
    """Conditioning keys belong to their dataset types; discovery stages must be known words."""
    role = values["dataset_type"]
    if role == "conditioning":
        values["conditioning_type"] = values["conditioning_type"] or "controlnet"
        _check_choice(where, "conditioning_type", values["conditioning_type"], CONDITIONING_TYPES)
        if values["conditioning_data"]:
            raise DatasetConfigError(f"{where}: key 'conditioning_data' belongs on the image dataset that uses this "
                                     "conditioning dataset, not on the conditioning dataset itself")
    elif values["conditioning_type"] is not None:
        raise DatasetConfigError(f"{where}: key 'conditioning_type' only applies to \"dataset_type\": "
                                 "\"conditioning\"; remove it or change the dataset_type")
    if role in ("eval", "video") and values["conditioning_data"]:
        raise DatasetConfigError(f"{where}: key 'conditioning_data' is not supported on {role} datasets")
    if role == "conditioning" and values["text_embeds"] is not None:
        raise DatasetConfigError(f"{where}: key 'text_embeds' belongs on the image dataset that uses this "
                                 "conditioning dataset; a conditioning dataset has no captions")
    for stage in values["skip_file_discovery"] or ():
        _check_choice(where, "skip_file_discovery", stage, DISCOVERY_STAGES)


def _parse_text_embeds(entry: dict, where: str) -> TextEmbedDatasetConfig:
    """Validate a text_embeds entry; ``type`` and ``disabled`` are checked but not stored."""
    values = _typed_values(entry, _TEXT_EMBED_KEYS, where)
    _check_choice(where, "type", values["type"], TEXT_EMBED_BACKEND_TYPES,
                  "text embeddings are cached on the local disk so far")
    return TextEmbedDatasetConfig(id=values["id"], cache_dir=values["cache_dir"], default=values["default"],
                                  caption_filter_list=values["caption_filter_list"])


def _typed_values(entry: dict, declared: dict[str, tuple[str, Any]], where: str) -> dict[str, Any]:
    """Reject unknown keys, fill defaults, and coerce/check every declared key's type."""
    for key in entry:
        if key not in declared:
            if declared is _IMAGE_KEYS and key in _VIDEO_KEYS:
                raise DatasetConfigError(
                    f"{where}: unknown key {key!r}; video settings go inside the \"video\" object, e.g. "
                    f"\"video\": {{\"{key}\": ...}}")
            if declared is _IMAGE_KEYS and (key in _PARQUET_KEYS or key in _HUGGINGFACE_KEYS):
                raise DatasetConfigError(
                    f"{where}: unknown key {key!r}; table settings go inside the \"parquet\" or "
                    f"\"huggingface\" object, e.g. \"huggingface\": {{\"{key}\": ...}}")
            raise DatasetConfigError(f"{where}: unknown key {key!r}; {_suggest(key, declared)}")
    values: dict[str, Any] = {}
    for key, (kind, default) in declared.items():
        if key not in entry:
            if default is _REQUIRED:
                raise DatasetConfigError(f"{where}: required key {key!r} is missing; add it to the entry")
            values[key] = default
            continue
        values[key] = _coerce(where, key, entry[key], kind)
    return values


def _coerce(where: str, key: str, value: Any, kind: str) -> Any:
    """Return ``value`` as ``kind`` or raise naming key, value and expected type.

    Booleans also accept the strings "true"/"false" because hand-edited and generated configs
    often quote them. ``bool`` is rejected for numbers since ``True`` is an ``int`` in Python.
    """
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "optional_str":
        if value is None or isinstance(value, str):
            return value
    elif kind == "number":
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
    elif kind == "number_list":
        if value is None:
            return None
        if isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
        ):
            return tuple(float(v) for v in value)
    elif kind == "object":
        if value is None or isinstance(value, dict):
            return value
    elif kind == "optional_bool":
        if value is None:
            return None
        return _coerce(where, key, value, "bool")
    elif kind == "filter_list":
        if value is None or (isinstance(value, str) and value.strip()):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif kind == "word_list":
        if value is None:
            return None
        if isinstance(value, str):
            return tuple(word for word in value.replace(",", " ").split() if word)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(word for v in value for word in v.replace(",", " ").split() if word)
    elif kind == "id_list":
        if value is None:
            return ()
        if isinstance(value, str) and value.strip():
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            return tuple(value)
    elif kind == "optional_int":
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    raise DatasetConfigError(
        f"{where}: key {key!r} has value {value!r} ({type(value).__name__}); expected {_KIND_WORDS[kind]}"
    )


# --- checks ------------------------------------------------------------------------------------


def _check_sampling(where: str, values: dict[str, Any]) -> None:
    """Mixing weight, subset size and the active step window."""
    if values["probability"] is None or values["probability"] < 0:
        raise DatasetConfigError(
            f"{where}: key 'probability' has value {values['probability']!r}; use 0 or a positive weight"
        )
    if values["max_num_samples"] is not None and values["max_num_samples"] < 1:
        raise DatasetConfigError(
            f"{where}: key 'max_num_samples' has value {values['max_num_samples']!r}; use 1 or more, or remove it"
        )
    if values["start_step"] < 0:
        raise DatasetConfigError(f"{where}: key 'start_step' has value {values['start_step']!r}; use 0 or more")
    if values["end_step"] is not None and values["end_step"] <= values["start_step"]:
        raise DatasetConfigError(
            f"{where}: key 'end_step' ({values['end_step']!r}) must be greater than 'start_step' "
            f"({values['start_step']!r})"
        )


def _check_geometry(where: str, values: dict[str, Any]) -> None:
    """Size, aspect and crop keys: each must make sense alone and together."""
    _check_choice(where, "crop_style", values["crop_style"], CROP_STYLES)
    _check_choice(where, "crop_aspect", values["crop_aspect"], CROP_ASPECTS)
    for key in ("minimum_image_size", "maximum_image_size", "target_downsample_size",
                "minimum_aspect_ratio", "maximum_aspect_ratio"):
        if values[key] is not None and values[key] <= 0:
            raise DatasetConfigError(f"{where}: key {key!r} has value {values[key]!r}; use a positive number")
    if values["max_upscale_threshold"] is not None and values["max_upscale_threshold"] < 0:
        raise DatasetConfigError(
            f"{where}: key 'max_upscale_threshold' has value {values['max_upscale_threshold']!r}; use 0 or more "
            "(0.2 allows 20% enlargement)"
        )
    if (values["maximum_image_size"] is None) != (values["target_downsample_size"] is None):
        raise DatasetConfigError(
            f"{where}: keys 'maximum_image_size' and 'target_downsample_size' must be set together "
            f"(got {values['maximum_image_size']!r} and {values['target_downsample_size']!r})"
        )
    if values["maximum_image_size"] is not None and values["target_downsample_size"] > values["maximum_image_size"]:
        raise DatasetConfigError(
            f"{where}: key 'target_downsample_size' ({values['target_downsample_size']!r}) must not exceed "
            f"'maximum_image_size' ({values['maximum_image_size']!r})"
        )
    low, high = values["minimum_aspect_ratio"], values["maximum_aspect_ratio"]
    if low is not None and high is not None and low > high:
        raise DatasetConfigError(
            f"{where}: key 'minimum_aspect_ratio' ({low!r}) is larger than 'maximum_aspect_ratio' ({high!r})"
        )
    if values["crop_aspect"] in ("closest", "random") and not values["crop_aspect_buckets"]:
        raise DatasetConfigError(
            f"{where}: crop_aspect {values['crop_aspect']!r} needs 'crop_aspect_buckets', a list of aspect "
            "ratios such as [0.75, 1.0, 1.33]"
        )


def _check_storage(where: str, entry: dict, values: dict[str, Any]) -> None:
    """Storage type, metadata backend and their keys; replaces the flat ``aws_*`` keys and the
    ``parquet``/``huggingface`` objects in ``values`` by :class:`AwsSettings` / :class:`TableSettings`."""
    storage = values["type"]
    _check_choice(where, "type", storage, SUPPORTED_BACKEND_TYPES)
    allowed = _METADATA_FOR_TYPE[storage]
    metadata = values["metadata_backend"] or allowed[0]
    _check_choice(where, "metadata_backend", metadata, METADATA_BACKENDS)
    if metadata not in allowed:
        raise DatasetConfigError(
            f"{where}: key 'metadata_backend' has value {metadata!r}, which type {storage!r} does not take; "
            f"use one of {list(allowed)}")
    values["metadata_backend"] = metadata

    aws = {key: values.pop(key) for key in _AWS_KEYS}
    if storage == "aws":
        if not (aws["aws_bucket_name"] or "").strip():
            raise DatasetConfigError(f"{where}: type 'aws' needs key 'aws_bucket_name' (the bucket holding the images)")
        values["aws"] = AwsSettings(
            bucket_name=aws["aws_bucket_name"].strip(), data_prefix=(aws["aws_data_prefix"] or "").strip("/"),
            region_name=aws["aws_region_name"], endpoint_url=aws["aws_endpoint_url"],
            access_key_id=aws["aws_access_key_id"], secret_access_key=aws["aws_secret_access_key"])
    else:
        stray = [key for key in _AWS_KEYS if key in entry]
        if stray:
            raise DatasetConfigError(f"{where}: key {stray[0]!r} is only used with \"type\": \"aws\" "
                                     f"(this dataset has type {storage!r}); remove it or change the type")

    for name, declared in (("parquet", _PARQUET_KEYS), ("huggingface", _HUGGINGFACE_KEYS)):
        raw = values[name]
        if metadata != name:
            if raw is not None:
                raise DatasetConfigError(f"{where}: key {name!r} is only used with \"metadata_backend\": "
                                         f"\"{name}\" (or \"type\": \"{name}\"); remove it or set that")
            continue
        if raw is None and name == "parquet":
            raise DatasetConfigError(
                f"{where}: metadata_backend 'parquet' needs a \"parquet\" object, e.g. "
                '{"path": "captions.parquet", "filename_column": "file", "caption_column": "caption"}')
        table = _typed_values(raw or {}, declared, f"{where}: key {name!r}")
        if (table["width_column"] is None) != (table["height_column"] is None):
            raise DatasetConfigError(f"{where}: key {name!r}: set both 'width_column' and 'height_column', "
                                     "or neither")
        values[name] = TableSettings(**table)

    if metadata == "huggingface":
        if not (values["dataset_name"] or "").strip():
            raise DatasetConfigError(f"{where}: type 'huggingface' needs key 'dataset_name', the folder of a "
                                     "dataset saved with save_to_disk (or of its parquet/arrow files)")
    elif values["dataset_name"] is not None:
        raise DatasetConfigError(f"{where}: key 'dataset_name' is only used with \"type\": \"huggingface\"")

    needs_folder = storage == "local" or (storage == "parquet" and values["parquet"].image_column is None)
    if needs_folder and values["instance_data_dir"] is None:
        raise DatasetConfigError(f"{where}: required key 'instance_data_dir' is missing; add it to the entry")
    cache = values["cache_dir_vae"]
    if cache is not None and cache.startswith("s3://") and not cache[len("s3://"):].split("/")[0]:
        raise DatasetConfigError(f"{where}: key 'cache_dir_vae' has value {cache!r}; write s3://<bucket>/<prefix>")


def _check_caption_source(where: str, values: dict[str, Any]) -> None:
    """Table datasets default to their table's captions; table strategies need their table."""
    metadata, strategy = values["metadata_backend"], values["caption_strategy"]
    if strategy in ("parquet", "huggingface") and strategy != metadata:
        raise DatasetConfigError(
            f"{where}: key 'caption_strategy' has value {strategy!r}, which needs \"metadata_backend\": "
            f"\"{strategy}\" (or \"type\": \"{strategy}\") and a {strategy!r} object naming the caption column")
    if metadata == "huggingface" and strategy not in ("huggingface", "instanceprompt"):
        raise DatasetConfigError(
            f"{where}: key 'caption_strategy' has value {strategy!r}; a huggingface dataset takes captions "
            "from its caption column ('huggingface') or from 'instanceprompt'")


def _check_paths_exist(where: str, values: dict[str, Any]) -> None:
    """Local folders and table files must exist now (a bucket is checked when it is first read)."""
    if values["instance_data_dir"] is not None and values["type"] in ("local", "parquet"):
        _check_directory(where, values["instance_data_dir"])
    if values["type"] in ("local", "parquet") and values["parquet"] is not None:
        table = Path(values["parquet"].path)
        if not table.exists():
            raise DatasetConfigError(f"{where}: key 'parquet': 'path' has value {values['parquet'].path!r}, but "
                                     f"{table.resolve()} does not exist; fix the path or set \"disabled\": true")
    if values["dataset_name"] is not None and not Path(values["dataset_name"]).is_dir():
        raise DatasetConfigError(
            f"{where}: key 'dataset_name' has value {values['dataset_name']!r}, but {Path(values['dataset_name']).resolve()} "
            "is not a folder; give the folder of a dataset saved with save_to_disk (datasets are never downloaded "
            "from the hub)")


def _check_conditioning_links(images: list[ImageDatasetConfig], source: str) -> None:
    """Every id in ``conditioning_data`` names an enabled ``conditioning`` dataset of the file."""
    by_id = {cfg.id: cfg for cfg in images}
    for cfg in images:
        if cfg.disabled:
            continue
        for linked in cfg.conditioning_data:
            target = by_id.get(linked)
            if target is None or target.dataset_type != "conditioning":
                found = "is not in the file" if target is None else f"has dataset_type {target.dataset_type!r}"
                raise DatasetConfigError(
                    f"{source}: dataset {cfg.id!r}: key 'conditioning_data' names {linked!r}, which {found}; "
                    "name an entry with \"dataset_type\": \"conditioning\"")
            if target.disabled:
                raise DatasetConfigError(f"{source}: dataset {cfg.id!r}: conditioning dataset {linked!r} is disabled; "
                                         "enable it or remove it from 'conditioning_data'")


def _check_video(where: str, values: dict[str, Any]) -> None:
    """The ``video`` object belongs to video datasets, which are listed from files (local or a bucket);
    replaces it in ``values`` by :class:`VideoSettings`."""
    raw = values["video"]
    if values["dataset_type"] != "video":
        if raw is not None:
            raise DatasetConfigError(f"{where}: key 'video' is only used with \"dataset_type\": \"video\"; remove it "
                                     "or change the dataset_type")
        return
    if values["metadata_backend"] != "discovery":
        raise DatasetConfigError(f"{where}: video datasets are listed from their files (type 'local' or 'aws'); "
                                 f"metadata_backend {values['metadata_backend']!r} is not supported for videos yet")
    video = _typed_values(raw or {}, _VIDEO_KEYS, f"{where}: key 'video'")
    for key in _VIDEO_KEYS:
        if video[key] is not None and video[key] < 1:
            raise DatasetConfigError(f"{where}: key 'video': {key!r} has value {video[key]!r}; use 1 or more")
    low, high = video["min_frames"], video["max_frames"]
    if low is not None and high is not None and low > high:
        raise DatasetConfigError(f"{where}: key 'video': 'min_frames' ({low}) is larger than 'max_frames' ({high}), "
                                 "so every file would be left out")
    values["video"] = VideoSettings(**video)


def _check_text_embeds_links(images: list[ImageDatasetConfig], text_embeds: list[TextEmbedDatasetConfig],
                             source: str) -> None:
    """Every ``text_embeds`` key of a dataset names a ``text_embeds`` entry of the file."""
    known = [cfg.id for cfg in text_embeds]
    for cfg in images:
        if cfg.text_embeds is not None and cfg.text_embeds not in known:
            other = next((image for image in images if image.id == cfg.text_embeds), None)
            found = (f"which has dataset_type {other.dataset_type!r}" if other is not None
                     else "which is not in the file")
            raise DatasetConfigError(
                f"{source}: dataset {cfg.id!r}: key 'text_embeds' names {cfg.text_embeds!r}, {found}; use the id of "
                f"a \"dataset_type\": \"text_embeds\" entry ({known}) or remove the key to use the default one")


def _check_choice(where: str, key: str, value: str, choices: tuple[str, ...], note: str = "") -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        extra = f" ({note})" if note else ""
        raise DatasetConfigError(f"{where}: key {key!r} has value {value!r}; use one of {list(choices)}{extra}")


def _check_directory(where: str, directory: str) -> None:
    """The image folder must exist now: failing here beats failing after the model loads."""
    path = Path(directory)
    if not path.exists():
        raise DatasetConfigError(
            f"{where}: key 'instance_data_dir' has value {directory!r}, but {path.resolve()} does not exist; "
            f"fix the path or set \"disabled\": true"
        )
    if not path.is_dir():
        raise DatasetConfigError(
            f"{where}: key 'instance_data_dir' has value {directory!r}, but {path.resolve()} is not a "
            f"directory; point it at the folder holding the images"
        )


def _check_unique_id(dataset_id: str, index: int, seen: dict[str, int], source: str) -> None:
    """Ids name cache folders, so two datasets sharing one would overwrite each other's caches."""
    if dataset_id in seen:
        raise DatasetConfigError(
            f"{source}: dataset {dataset_id!r} (entry {index}): key 'id' has value {dataset_id!r}, "
            f"already used by entry {seen[dataset_id]}; give each dataset a unique id"
        )
    seen[dataset_id] = index


def _pick_default_text_embeds(
    text_embeds: list[TextEmbedDatasetConfig], images: list[ImageDatasetConfig], source: str
) -> TextEmbedDatasetConfig:
    """Require at least one enabled image dataset and exactly one default text-embed cache."""
    if not any(not cfg.disabled and cfg.dataset_type in TRAINED_DATASET_TYPES for cfg in images):
        raise DatasetConfigError(
            f"{source}: no enabled image dataset; add an entry with \"dataset_type\": \"image\" (or \"video\"), "
            f"or remove \"disabled\": true from one"
        )
    if not text_embeds:
        raise DatasetConfigError(
            f"{source}: no text_embeds entry; add "
            f'{{"id": "text-embeds", "dataset_type": "text_embeds", "type": "local", "cache_dir": "cache/text"}}'
        )
    if len(text_embeds) == 1:
        return text_embeds[0]
    defaults = [cfg for cfg in text_embeds if cfg.default]
    if len(defaults) != 1:
        ids = [cfg.id for cfg in defaults] if defaults else [cfg.id for cfg in text_embeds]
        raise DatasetConfigError(
            f"{source}: {len(text_embeds)} text_embeds entries and {len(defaults)} with key 'default' "
            f"true ({ids}); set \"default\": true on exactly one and \"default\": false on the others"
        )
    return defaults[0]


# --- message helpers ---------------------------------------------------------------------------


def _where(source: str, entry: dict, index: int) -> str:
    """``file: dataset 'id' (entry N)``, or just the index when the id is missing or not a string."""
    dataset_id = entry.get("id")
    if isinstance(dataset_id, str):
        return f"{source}: dataset {dataset_id!r} (entry {index})"
    return f"{source}: entry {index}"


def _suggest(key: str, known: dict[str, Any]) -> str:
    """'did you mean X?' with the closest known key, or the list of known keys."""
    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if matches:
        return f"did you mean {matches[0]!r}?"
    return f"known keys are {sorted(known)}"
