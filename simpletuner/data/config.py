"""The dataset list (``multidatabackend.json``): parse, validate, and fail early.

The file is a JSON list of objects, one per dataset. Image datasets say where the pictures are and how
they are captioned and sized; exactly one ``text_embeds`` entry says where prompt embeddings are
cached. Every mistake is reported before any model is loaded, with a message that names the file,
the dataset, the key, the value and the fix, because a typo found after a 20-minute model load is
the most expensive kind of typo.

The keys themselves (kind, default, range, which dataset types take them, help) are declared once,
in :mod:`simpletuner.data.schema`; this module turns an entry into the typed settings below and
checks the rules that span several keys or the file system.

This module must import without torch: it runs on the CLI's validation path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpletuner.data import schema
from simpletuner.data.schema import (  # noqa: F401  (re-exported: the rest of the code imports them from here)
    CAPTION_STRATEGIES,
    CONDITIONING_TYPES,
    CROP_ASPECTS,
    CROP_STYLES,
    DATASET_TYPES,
    DISCOVERY_STAGES,
    METADATA_BACKENDS,
    METADATA_FOR_TYPE,
    RESOLUTION_TYPES,
    SUPPORTED_BACKEND_TYPES,
    TEXT_EMBED_BACKEND_TYPES,
    TRAINED_DATASET_TYPES,
    DatasetConfigError,
    default_of,
    shown,
)


@dataclass(frozen=True)
class AwsSettings:
    """The ``aws_*`` keys of a dataset entry (without the prefix): where its bucket is and how to sign in.

    Credentials left out (None) come from the standard AWS environment. They are excluded from
    ``repr`` so that logging a config never prints them. ``max_pool_connections`` comes from the
    global ``--aws_max_pool_connections``.
    """

    bucket_name: str
    data_prefix: str = default_of("aws_data_prefix")
    region_name: str | None = default_of("aws_region_name")
    endpoint_url: str | None = default_of("aws_endpoint_url")
    access_key_id: str | None = field(default=default_of("aws_access_key_id"), repr=False)
    secret_access_key: str | None = field(default=default_of("aws_secret_access_key"), repr=False)
    max_pool_connections: int | None = None


@dataclass(frozen=True)
class TableSettings:
    """The ``parquet`` or ``huggingface`` object of a dataset entry: which columns mean what.

    The parser fills every field from the object, with the defaults of its own section of the
    schema (they differ: ``image_column`` defaults to ``image`` for huggingface and to none for
    parquet). The defaults here only say "not set". ``path`` is unused for huggingface, whose table
    is the entry's ``dataset_name``; ``split`` is unused for parquet.
    """

    path: str | None = None
    filename_column: str | None = None
    caption_column: str | None = None
    fallback_caption_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    image_column: str | None = None
    identifier_includes_extension: bool = False
    split: str | None = None

    @classmethod
    def defaults_for(cls, section: str) -> "TableSettings":
        """The settings of an empty ``section`` object (``huggingface``: the image and caption columns)."""
        return cls(**schema.defaults(section=section))


@dataclass(frozen=True)
class VideoSettings:
    """The ``video`` object of a ``"dataset_type": "video"`` entry: which frames of each file are trained.

    ``num_frames`` stays None until the global ``--framerate`` fills it (see
    :func:`simpletuner.data.settings.resolve_dataset`); ``min_frames`` None means :attr:`span`.
    """

    num_frames: int | None = default_of("num_frames", "video", "video")
    min_frames: int | None = default_of("min_frames", "video", "video")
    max_frames: int | None = default_of("max_frames", "video", "video")
    frame_interval: int = default_of("frame_interval", "video", "video")

    @property
    def span(self) -> int:
        """Source frames a full clip covers: ``(num_frames - 1) * frame_interval + 1``."""
        return (self.num_frames - 1) * self.frame_interval + 1


@dataclass(frozen=True)
class ImageDatasetConfig:
    """One image (or video, conditioning, eval) dataset from ``multidatabackend.json``.

    Each field holds the parsed value of the entry key of the same name; their kinds, defaults and
    meaning are in :data:`simpletuner.data.schema.DATASET_KEYS`. Keys a dataset type does not take
    hold their "not set" value here (``conditioning_type`` None outside conditioning datasets,
    ``video`` None outside video datasets). The other fields:

    Attributes:
        aws: bucket settings of an ``aws`` dataset (its ``aws_*`` keys).
        parquet / huggingface: column settings of a table dataset.
        video: frame settings of a ``video`` dataset.
        metadata_backend: left out, the one ``type`` implies (``discovery`` for local and aws).
        explicit_keys: the keys the entry set itself, so global options fill only the others (keys
            set inside the ``parquet`` object appear as ``parquet.<key>``).
    """

    id: str
    type: str
    instance_data_dir: str | None = default_of("instance_data_dir")
    caption_strategy: str = default_of("caption_strategy")
    instance_prompt: str | None = default_of("instance_prompt")
    resolution: float | None = default_of("resolution")
    resolution_type: str | None = default_of("resolution_type")
    crop: bool = default_of("crop")
    repeats: int = default_of("repeats")
    cache_dir_vae: str | None = default_of("cache_dir_vae")
    disabled: bool = default_of("disabled")
    minimum_image_size: float | None = default_of("minimum_image_size")
    maximum_image_size: float | None = default_of("maximum_image_size")
    target_downsample_size: float | None = default_of("target_downsample_size")
    minimum_aspect_ratio: float | None = default_of("minimum_aspect_ratio")
    maximum_aspect_ratio: float | None = default_of("maximum_aspect_ratio")
    max_upscale_threshold: float | None = default_of("max_upscale_threshold")
    crop_style: str = default_of("crop_style")
    crop_aspect: str = default_of("crop_aspect")
    crop_aspect_buckets: tuple[float, ...] | None = default_of("crop_aspect_buckets")
    probability: float = default_of("probability")
    max_num_samples: int | None = default_of("max_num_samples")
    start_step: int = default_of("start_step")
    end_step: int | None = default_of("end_step")
    metadata_backend: str | None = default_of("metadata_backend")
    aws: AwsSettings | None = None
    parquet: TableSettings | None = None
    huggingface: TableSettings | None = None
    dataset_name: str | None = default_of("dataset_name")
    dataset_type: str = default_of("dataset_type")
    prepend_instance_prompt: bool | None = default_of("prepend_instance_prompt")
    only_instance_prompt: bool | None = default_of("only_instance_prompt")
    caption_filter_list: str | tuple[str, ...] | None = default_of("caption_filter_list")
    disable_multiline_split: bool = default_of("disable_multiline_split")
    #: ``caption_shuffle``, parsed (simpletuner.data.caption_variants.CaptionShuffle), or None
    caption_shuffle: Any = default_of("caption_shuffle")
    random_flip: bool = default_of("random_flip")
    folder_repeats: bool = default_of("folder_repeats")
    #: set on the datasets ``folder_repeats`` makes: the folder's words, the caption of images without one
    folder_prompt: str | None = None
    is_regularisation_data: bool = default_of("is_regularisation_data")
    regularisation_target: str = default_of("regularisation_target")
    vae_cache_clear_each_epoch: bool = default_of("vae_cache_clear_each_epoch")
    hash_filenames: bool = default_of("hash_filenames")
    skip_file_discovery: tuple[str, ...] | None = default_of("skip_file_discovery")
    preserve_data_backend_cache: bool | None = default_of("preserve_data_backend_cache")
    delete_unwanted_images: bool | None = default_of("delete_unwanted_images")
    delete_problematic_images: bool | None = default_of("delete_problematic_images")
    conditioning_data: tuple[str, ...] = default_of("conditioning_data")
    conditioning_type: str | None = None
    video: VideoSettings | None = None
    text_embeds: str | None = default_of("text_embeds")
    explicit_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.metadata_backend is None:  # one rule for parsed and hand-built settings
            implied = METADATA_FOR_TYPE.get(self.type, METADATA_BACKENDS)[0]
            object.__setattr__(self, "metadata_backend", implied)

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
    """Where prompt embeddings are cached: a ``text_embeds`` entry (keys in the schema).

    ``cache_dir`` None means ``--cache_dir_text``, else ``<--cache_dir>/text``; ``caption_filter_list``
    applies to the captions of every dataset using the entry, after the dataset's own list.
    """

    id: str
    cache_dir: str | None = default_of("cache_dir", "text_embeds")
    default: bool = default_of("default", "text_embeds")
    caption_filter_list: str | tuple[str, ...] | None = default_of("caption_filter_list", "text_embeds")


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


#: Kinds a tool can write as plain text (the parser accepts that form too): a yes/no, a number, a
#: filter file path, words separated by spaces, one dataset id.
_PLAIN_KINDS = {"optional_bool": "bool", "float": "number", "filter_list": "optional_str",
                "word_list": "optional_str", "id_list": "optional_str"}


def dataset_key_schema(dataset_type: str = "image") -> dict[str, tuple[str, Any, bool]]:
    """Key -> (kind, default, required) of an entry of ``dataset_type``, from the schema table.

    For tools that write dataset lists by value kind rather than by :class:`~simpletuner.data.schema.DatasetKey`.
    """
    return {name: (_PLAIN_KINDS.get(key.kind, key.kind), None if key.required else key.default, key.required)
            for name, key in schema.keys_for(dataset_type).items()}


# --- reading the file ------------------------------------------------------------------------------


def load_dataset_plan(path: str | Path) -> DatasetPlan:
    """Read and validate a ``multidatabackend.json`` file.

    Raises:
        DatasetConfigError: the file is missing, not UTF-8, not valid JSON (with line and column),
            or any entry breaks a rule of :func:`parse_dataset_plan`.
    """
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetConfigError(
            f"{source}: dataset list not found; create it (see multidatabackend.json.example) "
            f"or point --data_backend_config at the right file"
        ) from None
    except UnicodeDecodeError as exc:
        raise DatasetConfigError(f"{source}: the dataset list is not UTF-8 text (byte {exc.start} cannot be "
                                 "decoded); save it as UTF-8") from None
    except (OSError, ValueError) as exc:
        raise DatasetConfigError(f"{source}: cannot read the dataset list: {exc}") from None
    return parse_dataset_plan(_decode_json(text, source), source=source)


def _decode_json(text: str, source: str) -> Any:
    """The decoded file; syntax errors with line and column, and the inputs ``json`` cannot take
    (nesting deeper than Python's stack, integers of thousands of digits) as clean errors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetConfigError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
            f"fix the syntax there (a trailing comma or a missing quote is the usual cause)"
        ) from None
    except RecursionError:
        raise DatasetConfigError(f"{source}: the JSON is nested too deeply to read; a dataset list is a list of "
                                 "flat objects") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise DatasetConfigError(f"{source}: invalid JSON: {exc}") from None


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
        if not isinstance(entry, dict):
            raise DatasetConfigError(
                f"{source}: entry {index} must be a JSON object, got {type(entry).__name__} {shown(entry)}"
            )
        parsed = _parse_entry(entry, index, source)
        _check_unique_id(parsed.id, index, seen_ids, source)
        if isinstance(parsed, ImageDatasetConfig):
            from simpletuner.data.folder_repeats import expand_folder_repeats

            for dataset in expand_folder_repeats(parsed, _where(source, entry, index)):
                if dataset is not parsed:
                    _check_unique_id(dataset.id, index, seen_ids, source)
                images.append(dataset)
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
    if not isinstance(dataset_type, str) or dataset_type not in DATASET_TYPES:
        raise DatasetConfigError(
            f"{where}: key 'dataset_type' has value {shown(dataset_type)}; use one of {list(DATASET_TYPES)}"
        )
    entry = schema.unalias(entry, dataset_type, where)
    values = schema.read_entry(entry, dataset_type, where)
    _check_id(where, values["id"])
    if dataset_type == "text_embeds":
        return TextEmbedDatasetConfig(id=values["id"], cache_dir=values["cache_dir"], default=values["default"],
                                      caption_filter_list=values["caption_filter_list"])
    return _parse_image(entry, values, where)


def _parse_image(entry: dict, values: dict[str, Any], where: str) -> ImageDatasetConfig:
    """The cross-key rules of an image (or video, conditioning, eval) entry whose keys are read."""
    table_keys = entry.get("parquet") if isinstance(entry.get("parquet"), dict) else {}
    values["explicit_keys"] = frozenset(entry) | {f"parquet.{key}" for key in table_keys}
    _check_storage(where, entry, values)
    _check_video(where, values)
    if "caption_strategy" not in entry and values["metadata_backend"] != "discovery":
        values["caption_strategy"] = values["metadata_backend"]  # a table's own captions by default
    _check_caption_source(where, values)
    if values["dataset_type"] != "conditioning":
        check_instance_prompt(where, values)
    if values["resolution"] is not None:
        values["resolution"] = float(values["resolution"])
    _check_geometry(where, values)
    _check_sampling(where, values)
    _check_regularisation(where, values)
    if values.get("caption_shuffle") is not None:
        from simpletuner.data.caption_variants import parse_caption_shuffle

        values["caption_shuffle"] = parse_caption_shuffle(values["caption_shuffle"], where)
    _check_random_flip(where, values)
    if values.get("folder_repeats") and (values["conditioning_data"] or "repeats" in entry
                                         or values["metadata_backend"] != "discovery"):
        raise DatasetConfigError(f"{where}: folder_repeats takes the repeats from the subfolder names and lists the "
                                 "files itself; remove `repeats`, `conditioning_data` or the table metadata_backend")
    if not values["disabled"]:
        _check_paths_exist(where, values)
    return ImageDatasetConfig(**values)


def _check_random_flip(where: str, values: dict[str, Any]) -> None:
    """``random_flip`` keeps one flipped copy of each crop; combinations that would pair it with
    unflipped data (masks, control images) or re-draw crops it was made from are refused."""
    if not values.get("random_flip"):
        return
    if values.get("conditioning_data"):
        raise DatasetConfigError(f"{where}: random_flip cannot be combined with conditioning_data: the paired "
                                 "masks or control images are not flipped with the image; remove one of them")
    if values.get("vae_cache_clear_each_epoch"):
        raise DatasetConfigError(f"{where}: random_flip cannot be combined with vae_cache_clear_each_epoch (the "
                                 "flipped latents are not re-cropped each epoch); remove one of them")


def check_instance_prompt(where: str, values: dict[str, Any]) -> None:
    """``instanceprompt`` captions and ``only``/``prepend_instance_prompt`` need a non-empty prompt.

    Public because the global options (``--instance_prompt``, ``--only_instance_prompt``) are
    applied later (:mod:`simpletuner.data.settings`) and the rule must hold afterwards too.
    """
    if values["caption_strategy"] == "instanceprompt" and not (values["instance_prompt"] or "").strip():
        raise DatasetConfigError(
            f"{where}: key 'instance_prompt' has value {shown(values['instance_prompt'])}; "
            f"caption_strategy 'instanceprompt' needs a non-empty instance_prompt"
        )
    for key in ("only_instance_prompt", "prepend_instance_prompt"):
        if values.get(key) and not (values["instance_prompt"] or "").strip():
            raise DatasetConfigError(f"{where}: {key} is set but 'instance_prompt' is empty; add an instance_prompt "
                                     f"(in the entry or with --instance_prompt) or remove {key}")


# --- checks ------------------------------------------------------------------------------------


def _check_id(where: str, dataset_id: str) -> None:
    """Ids name cache folders (``<cache_dir>/vae/<id>``): an empty one would be the parent of every
    other dataset's cache, and ``..`` or an absolute path would leave the cache folder."""
    parts = re.split(r"[\\/]", dataset_id)
    if not dataset_id.strip() or "\x00" in dataset_id or dataset_id.startswith(("/", "\\")) or ".." in parts:
        raise DatasetConfigError(
            f"{where}: key 'id' has value {shown(dataset_id)}; ids name cache folders, so use a non-empty name "
            "without '..' parts, a leading slash or NUL characters")


def _check_sampling(where: str, values: dict[str, Any]) -> None:
    """The active step window (each key's own range is in the schema)."""
    if values["end_step"] is not None and values["end_step"] <= values["start_step"]:
        raise DatasetConfigError(
            f"{where}: key 'end_step' ({values['end_step']!r}) must be greater than 'start_step' "
            f"({values['start_step']!r})"
        )


def _check_regularisation(where: str, values: dict[str, Any]) -> None:
    """A regularisation target only means something on a regularisation dataset."""
    if values["regularisation_target"] != "data" and not values["is_regularisation_data"]:
        raise DatasetConfigError(
            f"{where}: key 'regularisation_target' ({values['regularisation_target']!r}) only applies to a "
            "regularisation dataset; add \"is_regularisation_data\": true or remove the key"
        )


def _check_geometry(where: str, values: dict[str, Any]) -> None:
    """Size, aspect and crop keys that must make sense together (each one's range is in the schema)."""
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


#: The entry keys that become :class:`AwsSettings` fields (without their ``aws_`` prefix).
_AWS_KEYS = tuple(name for name, key in schema.keys_for("image").items() if key.backends == ("aws",))


def _check_storage(where: str, entry: dict, values: dict[str, Any]) -> None:
    """Storage type, metadata backend and the keys that belong to them; replaces the flat ``aws_*``
    keys and the ``parquet``/``huggingface`` objects in ``values`` by :class:`AwsSettings` /
    :class:`TableSettings`."""
    storage = values["type"]
    allowed = METADATA_FOR_TYPE[storage]
    metadata = values["metadata_backend"] or allowed[0]
    if metadata not in allowed:
        raise DatasetConfigError(
            f"{where}: key 'metadata_backend' has value {metadata!r}, which type {storage!r} does not take; "
            f"use one of {list(allowed)}")
    values["metadata_backend"] = metadata
    schema.check_backends(entry, storage, metadata, where)

    aws = {name[len("aws_"):]: values.pop(name) for name in _AWS_KEYS}
    if storage == "aws":
        if not (aws["bucket_name"] or "").strip():
            raise DatasetConfigError(f"{where}: type 'aws' needs key 'aws_bucket_name' (the bucket holding the images)")
        values["aws"] = AwsSettings(**{**aws, "bucket_name": aws["bucket_name"].strip(),
                                       "data_prefix": (aws["data_prefix"] or "").strip("/")})

    for name in ("parquet", "huggingface"):
        if metadata != name:
            continue
        if values[name] is None and name == "parquet":
            raise DatasetConfigError(
                f"{where}: metadata_backend 'parquet' needs a \"parquet\" object, e.g. "
                '{"path": "captions.parquet", "filename_column": "file", "caption_column": "caption"}')
        table = schema.read_entry(values[name] or {}, values["dataset_type"], f"{where}: key {name!r}", section=name)
        if (table["width_column"] is None) != (table["height_column"] is None):
            raise DatasetConfigError(f"{where}: key {name!r}: set both 'width_column' and 'height_column', "
                                     "or neither")
        values[name] = TableSettings(**table)

    if metadata == "huggingface" and not (values["dataset_name"] or "").strip():
        raise DatasetConfigError(f"{where}: type 'huggingface' needs key 'dataset_name', the folder of a "
                                 "dataset saved with save_to_disk (or of its parquet/arrow files)")
    needs_folder = storage == "local" or (storage == "parquet" and values["parquet"].image_column is None)
    if needs_folder and values["instance_data_dir"] is None:
        raise DatasetConfigError(f"{where}: required key 'instance_data_dir' is missing; add it to the entry")
    cache = values["cache_dir_vae"]
    if cache is not None and cache.startswith("s3://") and not cache[len("s3://"):].split("/")[0]:
        raise DatasetConfigError(f"{where}: key 'cache_dir_vae' has value {shown(cache)}; write s3://<bucket>/<prefix>")


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
        table = values["parquet"].path
        if _lookup(table) not in ("file", "folder"):
            raise DatasetConfigError(f"{where}: key 'parquet': 'path' has value {shown(table)}, but "
                                     f"{_resolved(table)} {_missing_words(table)}; fix the path or set "
                                     "\"disabled\": true")
    name = values["dataset_name"]
    if name is not None and _lookup(name) != "folder":
        raise DatasetConfigError(
            f"{where}: key 'dataset_name' has value {shown(name)}, but {_resolved(name)} is not a folder; give the "
            "folder of a dataset saved with save_to_disk (datasets are never downloaded from the hub)")


def _check_directory(where: str, directory: str) -> None:
    """The image folder must exist now: failing here beats failing after the model loads."""
    found = _lookup(directory)
    if found == "file":
        raise DatasetConfigError(
            f"{where}: key 'instance_data_dir' has value {shown(directory)}, but {_resolved(directory)} is not a "
            f"directory; point it at the folder holding the images"
        )
    if found != "folder":
        raise DatasetConfigError(
            f"{where}: key 'instance_data_dir' has value {shown(directory)}, but {_resolved(directory)} "
            f"{_missing_words(directory)}; fix the path or set \"disabled\": true"
        )


def _lookup(path: str) -> str:
    """``folder``, ``file``, ``missing``, or ``unusable`` for text the OS cannot look up (a NUL
    character, a name too long, characters the file system cannot encode)."""
    try:
        if "\x00" in path:
            return "unusable"
        os.fsencode(path)  # a lone surrogate cannot be a file name
        candidate = Path(path)
        if candidate.is_dir():
            return "folder"
        return "file" if candidate.exists() else "missing"
    except (OSError, ValueError):  # UnicodeEncodeError is a ValueError
        return "unusable"


def _missing_words(path: str) -> str:
    return "does not exist" if _lookup(path) == "missing" else "is not a path this system can open"


def _resolved(path: str) -> str:
    """The absolute path a relative one means, for messages: as is when short and printable, else
    quoted with its odd characters escaped and cut short (a message must print on any terminal)."""
    if _lookup(path) == "unusable":
        return shown(path)
    try:
        text = str(Path(path).resolve())
    except (OSError, ValueError):
        text = path
    return text if len(text) <= 300 and text.isprintable() else shown(text)


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
                    f"{source}: dataset {shown(cfg.id)}: key 'conditioning_data' names {shown(linked)}, which {found}; "
                    "name an entry with \"dataset_type\": \"conditioning\"")
            if target.disabled:
                raise DatasetConfigError(f"{source}: dataset {shown(cfg.id)}: conditioning dataset {shown(linked)} is "
                                         "disabled; enable it or remove it from 'conditioning_data'")


def _check_video(where: str, values: dict[str, Any]) -> None:
    """Video datasets are listed from their files (local or a bucket); replaces the ``video``
    object in ``values`` by :class:`VideoSettings`."""
    if values["dataset_type"] != "video":
        return
    if values["metadata_backend"] != "discovery":
        raise DatasetConfigError(f"{where}: video datasets are listed from their files (type 'local' or 'aws'); "
                                 f"metadata_backend {values['metadata_backend']!r} is not supported for videos yet")
    video = schema.read_entry(values["video"] or {}, "video", f"{where}: key 'video'", section="video")
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
                f"{source}: dataset {shown(cfg.id)}: key 'text_embeds' names {shown(cfg.text_embeds)}, {found}; use "
                f"the id of a \"dataset_type\": \"text_embeds\" entry ({shown(known)}) or remove the key to use the "
                "default one")


def _check_unique_id(dataset_id: str, index: int, seen: dict[str, int], source: str) -> None:
    """Ids name cache folders, so two datasets sharing one would overwrite each other's caches."""
    if dataset_id in seen:
        raise DatasetConfigError(
            f"{source}: dataset {shown(dataset_id)} (entry {index}): key 'id' has value {shown(dataset_id)}, "
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
            f"true ({shown(ids)}); set \"default\": true on exactly one and \"default\": false on the others"
        )
    return defaults[0]


def _where(source: str, entry: dict, index: int) -> str:
    """``file: dataset 'id' (entry N)``, or just the index when the id is missing or not a string."""
    dataset_id = entry.get("id")
    if isinstance(dataset_id, str):
        return f"{source}: dataset {shown(dataset_id)} (entry {index})"
    return f"{source}: entry {index}"
