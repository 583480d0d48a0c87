"""The keys of a ``multidatabackend.json`` entry, declared once.

Every key a dataset entry (or its ``parquet`` / ``huggingface`` / ``video`` object) accepts is one
:class:`DatasetKey` in :data:`DATASET_KEYS`: its value kind, default, help, the dataset types and
storage backends that take it, its choices and its range. Everything else is derived from this
table: parsing and type coercion (:meth:`DatasetKey.parse`), the unknown-key and wrong-dataset-type
errors (:func:`read_entry`), the defaults of the parsed settings classes in
:mod:`simpletuner.data.config`, the wizard's dataset questions, and the key tables of
``documentation/DATASETS.md`` (:mod:`simpletuner.data.schema_docs`). Rules that span several keys
(``end_step`` after ``start_step``, a folder that must exist) stay in :mod:`simpletuner.data.config`.

This module imports without torch: it runs on the CLI's validation path and in the wizard.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from simpletuner.options import ConfigError
from simpletuner.options.messages import show_value


class DatasetConfigError(ConfigError):
    """A dataset list that cannot be used; the message says where the problem is and how to fix it."""


# --- choices ---------------------------------------------------------------------------------------

#: ``regularisation_target``: what a regularisation dataset is trained towards (methods/prior_preservation.py).
REGULARISATION_TARGETS = ("data", "base_model")

#: ``image``: trained on; ``video``: trained on, clips of frames (:mod:`simpletuner.data.video`);
#: ``conditioning``: paired to image datasets by relative path (masks, control images), never sampled
#: alone; ``eval``: loaded and cached for evaluation, never trained on; ``text_embeds``: where prompt
#: embeddings are cached.
DATASET_TYPES = ("image", "video", "text_embeds", "conditioning", "eval")
#: Dataset types whose entries describe files to load (everything but ``text_embeds``).
IMAGE_LIKE_TYPES = ("image", "video", "conditioning", "eval")
#: Dataset types whose batches are trained on.
TRAINED_DATASET_TYPES = ("image", "video")
SUPPORTED_BACKEND_TYPES = ("local", "aws", "parquet", "huggingface")
TEXT_EMBED_BACKEND_TYPES = ("local",)
#: Where the list of images (and captions/sizes from a table) comes from; see ``metadata_backend``.
METADATA_BACKENDS = ("discovery", "parquet", "huggingface")
#: The metadata backends each storage type allows; the first is the one it implies.
METADATA_FOR_TYPE = {
    "local": ("discovery", "parquet"),
    "aws": ("discovery", "parquet"),
    "parquet": ("parquet",),
    "huggingface": ("huggingface",),
}
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt", "parquet", "huggingface")
#: ``pixel``: shorter edge in px; ``pixel_area``: edge of an equal-area square in px;
#: ``area``: megapixels (see :func:`simpletuner.data.buckets.target_size`).
RESOLUTION_TYPES = ("pixel", "pixel_area", "area")
CROP_STYLES = ("center", "corner", "random")
CROP_ASPECTS = ("square", "preserve", "closest", "random")
#: What a ``conditioning`` dataset holds; ``mask`` yields ``batch["mask"]``, the others
#: ``batch["conditioning_pixels"]`` (see :mod:`simpletuner.data.conditioning`).
CONDITIONING_TYPES = ("mask", "controlnet", "reference_strict", "reference_loose")
#: Start-up stages ``skip_file_discovery`` can skip (see :mod:`simpletuner.data.scan_cache`).
DISCOVERY_STAGES = ("aspect", "metadata", "vae", "text")
#: The objects nested in an entry, each with keys of its own.
SECTIONS = ("", "parquet", "huggingface", "video")

#: Whole numbers must fit in 64 bits: larger ones cannot be stored in checkpoints or tensors.
INT_LIMIT = 2**63 - 1
#: Largest resolution and image size accepted (pixels; megapixels for ``area``), as for ``--resolution``:
#: far above any model, and about the longest side an image file can have.
MAX_EDGE = 65536
MAX_ASPECT_RATIO = 100
#: Extra passes per epoch; each copy is a sample kept in memory, so an absurd count exhausts it.
MAX_REPEATS = 10_000
MAX_FRAMES = 1_000_000


class _Required:
    """The default of a key the entry must set."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

#: Value kinds, with the words an error uses for them.
KIND_WORDS = {
    "str": "a string",
    "optional_str": "a string or null",
    "float": "a number",
    "number": "a number or null",
    "int": "an integer",
    "optional_int": "an integer or null",
    "bool": 'true/false (or the strings "true"/"false")',
    "optional_bool": "true/false or null",
    "number_list": "a list of positive numbers or null",
    "object": "a JSON object or null",
    "filter_list": "a list of strings, or the path of a text or JSON file",
    "word_list": "a list of words, or a string of words separated by commas or spaces",
    "id_list": "a dataset id or a list of dataset ids",
}
#: Kinds whose ``null`` means "use the default".
NULLABLE_KINDS = frozenset({"optional_str", "number", "optional_int", "optional_bool", "number_list", "object",
                            "filter_list", "word_list", "id_list"})


@dataclass(frozen=True)
class DatasetKey:
    """One key of a dataset entry (or of a nested object).

    Attributes:
        name: the key as written in the JSON file.
        kind: one of :data:`KIND_WORDS`; says how a JSON value is checked and converted.
        default: the parsed value when the entry leaves the key out, or :data:`REQUIRED`.
        help: one or two sentences in plain words (wizard, DATASETS.md).
        applies_to: the ``dataset_type`` values whose entries accept the key.
        backends: the storage ``type`` / ``metadata_backend`` values that accept it; empty means all.
        section: ``""`` for a key of the entry itself, else the nested object holding it.
        choices: the allowed values (each word, for a list of words).
        minimum / maximum: the allowed range of a number (of each number, for a list).
        exclusive_minimum: the value must be strictly above ``minimum``.
        inherits: the global option that fills the key when the entry leaves it out.
        default_note: how the docs describe a default that no plain value says (``from type``).
        aliases: other spellings accepted for the key (SimpleTuner's).
        hint: advice added to an error about the key (a refused choice, a dataset type that
            does not take it).
    """

    name: str
    kind: str
    default: Any
    help: str
    applies_to: tuple[str, ...] = IMAGE_LIKE_TYPES
    backends: tuple[str, ...] = ()
    section: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    inherits: str = ""
    default_note: str = ""
    aliases: tuple[str, ...] = ()
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KIND_WORDS:
            raise ValueError(f"dataset key {self.name!r}: unknown kind {self.kind!r}; use one of {list(KIND_WORDS)}")
        if self.section not in SECTIONS:
            raise ValueError(f"dataset key {self.name!r}: unknown section {self.section!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def parse(self, value: Any, where: str) -> Any:
        """``value`` (from JSON) as this key's Python value: coerced, its choices and range checked.

        Raises:
            DatasetConfigError: names ``where``, the key, the value (shortened when long), and what
                the key accepts.
        """
        if value is None and self.kind in NULLABLE_KINDS:
            return self.default
        parsed = _coerce(self.kind, value)
        if parsed is _INVALID:
            raise DatasetConfigError(f"{where}: key {self.name!r} has value {shown(value)} "
                                     f"({type(value).__name__}); expected {KIND_WORDS[self.kind]}")
        for item in _items(self.kind, parsed):
            written = item if self.kind in ("number_list", "word_list") else value  # 1e30, not its int
            if self.choices and item not in self.choices:
                extra = f" ({self.hint})" if self.hint else ""
                raise DatasetConfigError(f"{where}: key {self.name!r} has value {shown(written)}; "
                                         f"use one of {list(self.choices)}{extra}")
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not self.in_range(item):
                raise DatasetConfigError(f"{where}: key {self.name!r} has value {shown(written)}; "
                                         f"{self.range_advice()}")
        return parsed

    def in_range(self, number: float) -> bool:
        """Whether ``number`` lies in the key's range (whole numbers also within :data:`INT_LIMIT`)."""
        low, high = self.minimum, self.maximum
        if self.kind in ("int", "optional_int") and (high is None or high > INT_LIMIT):
            high = INT_LIMIT
        if low is not None and (number <= low if self.exclusive_minimum else number < low):
            return False
        return high is None or number <= high

    def range_text(self) -> str:
        """The range in the short notation of OPTIONS.md (``>= 1``, ``> 0``, ``(0, 65536]``), or ""."""
        low, high = self.minimum, self.maximum
        if low is None and high is None:
            return ""
        if high is None:
            return f"{'>' if self.exclusive_minimum else '>='} {_number(low)}"
        if low is None:
            return f"<= {_number(high)}"
        return f"{'(' if self.exclusive_minimum else '['}{_number(low)}, {_number(high)}]"

    def range_advice(self) -> str:
        """What to write instead of an out-of-range value."""
        low = self.minimum
        if low is None:
            advice = "use a smaller number"
        elif self.exclusive_minimum and low == 0:
            advice = "use a positive number"
        elif self.exclusive_minimum:
            advice = f"use a number above {_number(low)}"
        else:
            advice = f"use {_number(low)} or more"
        high = self.maximum if self.maximum is not None else (
            INT_LIMIT if self.kind in ("int", "optional_int") else None)
        if high is not None:
            advice += f", at most {_number(high)}"
        if self.inherits and self.default is None:
            advice += f", or remove the key to use --{self.inherits}"
        return advice


_INVALID = object()


def _coerce(kind: str, value: Any) -> Any:
    """``value`` as ``kind``, or :data:`_INVALID`. Booleans also accept the strings "true"/"false"
    (hand-edited and generated files often quote them); ``True`` is never a number."""
    if kind in ("bool", "optional_bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind in ("str", "optional_str"):
        if isinstance(value, str):
            return value
    elif kind in ("float", "number"):
        if _is_finite_number(value):
            return value
    elif kind in ("int", "optional_int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "number_list":
        if isinstance(value, list) and value and all(_is_finite_number(v) and v > 0 for v in value):
            return tuple(float(v) for v in value)
    elif kind == "object":
        if isinstance(value, dict):
            return value
    elif kind == "filter_list":
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif kind == "word_list":
        if isinstance(value, str):
            return tuple(word for word in value.replace(",", " ").split() if word)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(word for v in value for word in v.replace(",", " ").split() if word)
    elif kind == "id_list":
        if isinstance(value, str) and value.strip():
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            return tuple(value)
    return _INVALID


def _is_finite_number(value: Any) -> bool:
    """A JSON number that fits a float: not a bool, not NaN or infinite, not a 400-digit integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _items(kind: str, parsed: Any) -> Iterable[Any]:
    """The values whose choices and range are checked: each element of a list kind."""
    if kind in ("number_list", "word_list") and parsed is not None:
        return parsed
    return () if parsed is None else (parsed,)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else str(value)


# --- the table -------------------------------------------------------------------------------------

_K = DatasetKey
_TE = ("text_embeds",)
_ALL = DATASET_TYPES

#: Every key of every dataset entry, in the order DATASETS.md lists them.
DATASET_KEYS: tuple[DatasetKey, ...] = (
    # --- the entry itself: image, video, conditioning and eval datasets
    _K("id", "str", REQUIRED, "Unique name among all entries. It names the dataset's cache folders and appears in "
       "logs, so renaming a dataset moves its cache.", applies_to=_ALL),
    _K("dataset_type", "str", "image", "`image` (trained on), `video` (clips of video files, see [Video datasets]"
       "(#video-datasets)), `conditioning` (masks or control images paired to an image dataset, see [Conditioning "
       "datasets](#conditioning-datasets)), `eval` (cached, never trained on, see [Eval datasets](#eval-datasets)) "
       "or `text_embeds` (where prompt embeddings are cached).", choices=DATASET_TYPES),
    _K("type", "str", REQUIRED, "Storage backend: `local` (a folder), `aws` (an S3 bucket), `parquet` (files listed "
       "by a parquet table) or `huggingface` (a dataset saved on disk); see [Storage backends](#storage-backends).",
       choices=SUPPORTED_BACKEND_TYPES),
    _K("instance_data_dir", "optional_str", None, "Folder holding the images, searched recursively. Relative paths "
       "start from the working directory. It must exist unless the entry is disabled.",
       default_note="required for `local`, and for `parquet` without `image_column`"),
    _K("caption_strategy", "str", "textfile", "Where captions come from: `textfile` (`<stem>.txt` beside each "
       "image), `filename` (the file name), `instanceprompt` (`instance_prompt` for every image), or the table's "
       "caption column (`parquet`, `huggingface`).", choices=CAPTION_STRATEGIES, inherits="caption_strategy",
       default_note="`textfile` (or `--caption_strategy`); the table's captions for `parquet` and `huggingface` "
                    "datasets"),
    _K("instance_prompt", "optional_str", None, "The prompt for every image. Required with `instanceprompt`, "
       "`prepend_instance_prompt` and `only_instance_prompt`.", inherits="instance_prompt"),
    _K("prepend_instance_prompt", "optional_bool", None, "Put `instance_prompt` in front of every caption (\"sks\" + \"a dog on "
       "grass\" = \"sks a dog on grass\").",
       inherits="prepend_instance_prompt"),
    _K("only_instance_prompt", "optional_bool", None, "Train every image on `instance_prompt` alone; no caption file "
       "is needed.", inherits="only_instance_prompt"),
    _K("caption_filter_list", "filter_list", None, "Filters applied to every caption: a list of strings, regular "
       "expressions or `s/find/replace/` lines, or the path of a text file (one per line) or of a JSON list; see "
       "[Caption filters](#caption-filters)."),
    _K("disable_multiline_split", "bool", False, "Join the lines of a caption file into one caption instead of "
       "treating each line as a variant (one variant is trained per epoch)."),
    _K("caption_shuffle", "object", None, "Cache shuffled versions of each caption and train one per epoch: "
       "`{\"variants\": 4, \"keep_tokens\": 1, \"separator\": \",\", \"seed\": 0}` keeps the first `keep_tokens` "
       "tags in place and shuffles the rest (kohya's `shuffle_caption` + `keep_tokens`); see [Shuffled captions]"
       "(#shuffled-captions).", applies_to=("image", "video", "eval")),
    _K("resolution", "number", None, "Training size of this dataset, in the unit of `resolution_type`.",
       minimum=0, exclusive_minimum=True, maximum=MAX_EDGE, inherits="resolution"),
    _K("resolution_type", "optional_str", None, "`pixel` (shorter side in pixels), `pixel_area` (side of a square "
       "of the same area) or `area` (megapixels).", choices=RESOLUTION_TYPES, inherits="resolution_type"),
    _K("crop", "bool", False, "Crop to `crop_aspect` instead of keeping each image's aspect ratio."),
    _K("crop_aspect", "str", "square", "With `crop`: `square`, `preserve` (the image's own aspect), `closest` (the "
       "nearest of `crop_aspect_buckets`) or `random` (one of them per image, the same on every run).",
       choices=CROP_ASPECTS),
    _K("crop_aspect_buckets", "number_list", None, "Aspect ratios (width / height) for `closest` and `random`, e.g. "
       "`[0.75, 1.0, 1.33]`.", minimum=0, exclusive_minimum=True, maximum=MAX_ASPECT_RATIO),
    _K("random_flip", "bool", False, "Also cache the latents of each image mirrored left to right, and train on "
       "one or the other by a seeded draw per image and epoch (kohya's `flip_aug`); see [Random flips]"
       "(#random-flips).", applies_to=("image",)),
    _K("crop_style", "str", "center", "With `crop`: where the crop window sits: `center`, `corner` (top-left) or "
       "`random` (per image, the same on every run).", choices=CROP_STYLES),
    _K("minimum_image_size", "number", None, "Leave out images smaller than this, in the unit of `resolution_type`.",
       minimum=0, exclusive_minimum=True, maximum=MAX_EDGE, inherits="minimum_image_size"),
    _K("maximum_image_size", "number", None, "Treat larger images as if shrunk to `target_downsample_size` first. "
       "Set both or neither.", minimum=0, exclusive_minimum=True, maximum=MAX_EDGE,
       inherits="maximum_image_size"),
    _K("target_downsample_size", "number", None, "The size very large images are shrunk to; not larger than "
       "`maximum_image_size`.", minimum=0, exclusive_minimum=True, maximum=MAX_EDGE,
       inherits="target_downsample_size"),
    _K("minimum_aspect_ratio", "number", None, "Leave out images whose width / height is below this.",
       minimum=0, exclusive_minimum=True),
    _K("maximum_aspect_ratio", "number", None, "Leave out images whose width / height is above this.",
       minimum=0, exclusive_minimum=True),
    _K("max_upscale_threshold", "number", None, "Leave out images that would need more than this fraction of "
       "enlargement (0.2 = 20%).", minimum=0, inherits="max_upscale_threshold"),
    _K("probability", "float", 1.0, "Relative weight when several datasets are mixed; `0` never draws it.",
       minimum=0, maximum=1_000_000),
    _K("max_num_samples", "optional_int", None, "Use at most this many images of the dataset: a random subset, the "
       "same on every run for a seed.", minimum=1),
    _K("start_step", "int", 0, "First optimizer step at which the dataset is drawn.", minimum=0),
    _K("end_step", "optional_int", None, "The dataset is no longer drawn from this optimizer step on; it must be "
       "greater than `start_step`.", minimum=1),
    _K("repeats", "int", 0, "Extra passes per epoch: `0` means each image is seen once per epoch, `2` three times. "
       "See [Too small for the batch](#too-small-for-the-batch).", minimum=0, maximum=MAX_REPEATS),
    _K("folder_repeats", "bool", False, "kohya's folder convention: each subfolder named `<N>_<words>` (e.g. `10_sks "
       "dog`) becomes a dataset of its own that repeats N times, whose images without a caption file are trained on "
       "`<words>`; see [Folder repeats](#folder-repeats).", applies_to=("image",), backends=("local",)),
    _K("is_regularisation_data", "bool", False, "Use this dataset for prior preservation (DreamBooth-style class "
       "images): its batches are drawn at its `probability` like any dataset, never mixed with other datasets in "
       "one batch, and their loss is multiplied by `--prior_loss_weight`. See `regularisation_target` for what "
       "they are trained towards.",
       aliases=("is_regularization_data",)),
    _K("regularisation_target", "str", "data", "What a regularisation dataset's batches are trained towards: "
       "`data` (the usual denoising target on its images, classic prior preservation) or `base_model` (the frozen "
       "base model's own prediction for the same noisy input and caption, with the adapter switched off, so the "
       "adapter keeps the base's behaviour on these prompts; LoRA / LyCORIS only). Needs "
       "`is_regularisation_data: true`.", choices=REGULARISATION_TARGETS,
       aliases=("regularization_target",)),
    _K("cache_dir_vae", "optional_str", None, "Where this dataset's latents (and its stored scan) are cached: a "
       "folder, or `s3://bucket/prefix` for a bucket.",
       default_note="`<--cache_dir_vae>/<id>`, else `<--cache_dir>/vae/<id>`"),
    _K("vae_cache_clear_each_epoch", "bool", False, "Delete this dataset's latents after each of its epochs and "
       "encode them again when next used; with `crop_style: random` the crop windows are drawn again each epoch "
       "(the crop aspect and bucket stay)."),
    _K("hash_filenames", "bool", True, "Accepted for SimpleTuner configs; cache file names are always content "
       "hashes, whatever the value."),
    _K("skip_file_discovery", "word_list", None, "Start-up stages to skip (a list, or words separated by spaces or "
       "commas); see [Faster restarts](#faster-restarts).", choices=DISCOVERY_STAGES,
       inherits="skip_file_discovery"),
    _K("preserve_data_backend_cache", "optional_bool", None, "Reuse the stored file listing instead of listing the "
       "storage again.", inherits="preserve_data_backend_cache"),
    _K("delete_unwanted_images", "optional_bool", None, "Delete images that the size, aspect or upscale rules leave "
       "out, from the dataset's storage.", inherits="delete_unwanted_images"),
    _K("delete_problematic_images", "optional_bool", None, "Delete images whose header or pixels cannot be read, "
       "from the dataset's storage.", inherits="delete_problematic_images"),
    _K("conditioning_data", "id_list", (), "Ids of the `conditioning` datasets paired with this one by relative "
       "path.", applies_to=("image",), hint="it belongs on the image dataset that uses a conditioning dataset"),
    _K("conditioning_type", "optional_str", "controlnet", "What a conditioning dataset holds: `mask`, `controlnet`, "
       "`reference_strict` or `reference_loose`.", applies_to=("conditioning",), choices=CONDITIONING_TYPES),
    _K("disabled", "bool", False, "Keep the entry in the file but leave it out of training.", aliases=("disable",)),
    _K("metadata_backend", "optional_str", None, "Where the list of images comes from: `discovery` (list the "
       "files), `parquet` or `huggingface` (a table that also gives captions and maybe sizes).",
       choices=METADATA_BACKENDS, default_note="from `type`: `discovery` for `local` and `aws`"),
    _K("text_embeds", "optional_str", None, "Id of the `text_embeds` entry this dataset uses when the file lists "
       "several: its `cache_dir` holds the dataset's prompt embeddings and its `caption_filter_list` applies to the "
       "dataset's captions. An id that is not a `text_embeds` entry of the file stops the run, naming the ids there "
       "are.",
       applies_to=("image", "video", "eval"), default_note="the default entry",
       hint="set it on the dataset whose captions use that cache"),
    _K("video", "object", None, "Frame settings of a `video` dataset, see [Video datasets](#video-datasets).",
       applies_to=("video",), default_note="see below"),
    _K("dataset_name", "optional_str", None, "The folder of a Hugging Face dataset (saved with `save_to_disk`, or "
       "its parquet / arrow files); see [Storage backends](#storage-backends).", backends=("huggingface",),
       default_note="required for `huggingface`"),
    _K("parquet", "object", None, "Column settings of a parquet table; see [Storage backends](#storage-backends).",
       backends=("parquet",), default_note="required with `metadata_backend` `parquet`"),
    _K("huggingface", "object", None, "Column settings of a Hugging Face dataset; see [Storage backends]"
       "(#storage-backends).", backends=("huggingface",)),
    # --- bucket settings of "type": "aws"
    _K("aws_bucket_name", "optional_str", None, "The bucket holding the images.", backends=("aws",),
       default_note="required for `aws`"),
    _K("aws_data_prefix", "optional_str", "", "Key prefix of the dataset inside the bucket (`photos/2024` for "
       "`s3://bucket/photos/2024/...`); empty means the whole bucket.", backends=("aws",)),
    _K("aws_region_name", "optional_str", None, "The bucket's region, e.g. `us-east-1`.", backends=("aws",),
       default_note="from the environment"),
    _K("aws_endpoint_url", "optional_str", None, "Address of another S3-compatible server, e.g. "
       "`http://127.0.0.1:9000` for MinIO.", backends=("aws",), default_note="Amazon S3"),
    _K("aws_access_key_id", "optional_str", None, "Access key. When left out, boto3's usual chain is used: "
       "`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `~/.aws/credentials`, instance roles.",
       backends=("aws",), default_note="from the environment"),
    _K("aws_secret_access_key", "optional_str", None, "Secret key, found like the access key when left out.",
       backends=("aws",), default_note="from the environment"),
    # --- text_embeds entries
    _K("dataset_type", "str", "text_embeds", "Must be `text_embeds`.", applies_to=_TE, choices=("text_embeds",)),
    _K("type", "str", "local", "Only `local`: text embeddings are cached on the local disk.", applies_to=_TE,
       choices=TEXT_EMBED_BACKEND_TYPES, hint="text embeddings are cached on the local disk so far"),
    _K("cache_dir", "optional_str", None, "Folder for the cached prompt embeddings.", applies_to=_TE,
       default_note="`--cache_dir_text`, else `<--cache_dir>/text`"),
    _K("caption_filter_list", "filter_list", None, "Filters applied to the captions of every dataset that uses this "
       "entry, after the dataset's own.", applies_to=_TE),
    _K("default", "bool", True, "With several `text_embeds` entries, exactly one has `true`; datasets without a "
       "`text_embeds` key use it.", applies_to=_TE),
    _K("disabled", "bool", False, "Accepted, but has no effect on a `text_embeds` entry.", applies_to=_TE),
    # --- the "parquet" object
    _K("path", "str", REQUIRED, "The parquet file, or a folder of parquet files. With `\"type\": \"aws\"`, a key in "
       "the bucket.", section="parquet"),
    _K("filename_column", "str", "filename", "The image file of each row, relative to `instance_data_dir` (or the "
       "bucket prefix). A name without an image extension is matched by its stem: `0042` finds `0042.jpg`.",
       section="parquet",
       inherits="parquet_filename_column"),
    _K("identifier_includes_extension", "bool", False, "Use `filename_column` exactly as written, without the stem "
       "match.", section="parquet"),
    _K("caption_column", "str", "caption", "The caption. A list of strings gives its first non-empty one.",
       section="parquet", inherits="parquet_caption_column"),
    _K("fallback_caption_column", "optional_str", None, "Used when the caption cell is empty or null.",
       section="parquet"),
    _K("width_column", "optional_str", None, "Image widths; with `height_column` the scan opens no image.",
       section="parquet"),
    _K("height_column", "optional_str", None, "Image heights; set together with `width_column`.", section="parquet"),
    _K("image_column", "optional_str", None, "Encoded image bytes stored in the table; `instance_data_dir` is then "
       "not needed.", section="parquet"),
    # --- the "huggingface" object
    _K("image_column", "str", "image", "The image column: an `Image` feature, encoded bytes, or file paths "
       "(resolved against `instance_data_dir` if set, else `dataset_name`).", section="huggingface"),
    _K("caption_column", "str", "caption", "The caption column.", section="huggingface"),
    _K("fallback_caption_column", "optional_str", None, "Used when the caption cell is empty or null.",
       section="huggingface"),
    _K("width_column", "optional_str", None, "Image widths; with `height_column` no image is opened to size it.",
       section="huggingface"),
    _K("height_column", "optional_str", None, "Image heights; set together with `width_column`.",
       section="huggingface"),
    _K("split", "optional_str", None, "The split of a `DatasetDict`, or of split-named parquet / arrow files.",
       section="huggingface", default_note="`train` (every file when none is named after a split)"),
    # --- the "video" object
    _K("num_frames", "optional_int", None, "Frames in a training clip. Set it: memory grows with it.",
       applies_to=("video",), section="video", minimum=1, maximum=MAX_FRAMES,
       default_note="5 seconds at `--framerate` (150 at the default 30)"),
    _K("frame_interval", "int", 1, "Take every N-th frame: 2 halves the clip's frame rate and doubles the time it "
       "spans.", applies_to=("video",), section="video", minimum=1, maximum=MAX_FRAMES),
    _K("min_frames", "optional_int", None, "Leave out files with fewer frames. A lower value keeps shorter files; "
       "each is trained on as many frames as it has at `frame_interval`, in a bucket of its own length.",
       applies_to=("video",), section="video", minimum=1, maximum=MAX_FRAMES,
       default_note="the frames a full clip spans, `(num_frames - 1) × frame_interval + 1`"),
    _K("max_frames", "optional_int", None, "Leave out files with more frames (very long files cost start-up time to "
       "hash).", applies_to=("video",), section="video", minimum=1, maximum=MAX_FRAMES),
)


# --- lookups ---------------------------------------------------------------------------------------


def keys_for(dataset_type: str = "image", section: str = "") -> dict[str, DatasetKey]:
    """The keys an entry of ``dataset_type`` accepts in ``section``, by name, in table order."""
    return {key.name: key for key in DATASET_KEYS
            if key.section == section and (section != "" or dataset_type in key.applies_to)}


def key_named(name: str, dataset_type: str = "image", section: str = "") -> DatasetKey:
    """The declaration of ``name``; KeyError when ``dataset_type`` does not take it."""
    return keys_for(dataset_type, section)[name]


def defaults(dataset_type: str = "image", section: str = "") -> dict[str, Any]:
    """Key -> default of the keys ``dataset_type`` accepts in ``section`` (required keys left out)."""
    return {name: key.default for name, key in keys_for(dataset_type, section).items() if not key.required}


def default_of(name: str, dataset_type: str = "image", section: str = "") -> Any:
    """The default of one key; for the parsed settings classes, so they never restate a default."""
    return key_named(name, dataset_type, section).default


def aliases(dataset_type: str = "image") -> dict[str, str]:
    """Other spelling -> key for the entry keys of ``dataset_type``."""
    return {alias: key.name for key in keys_for(dataset_type).values() for alias in key.aliases}


# --- reading an entry ------------------------------------------------------------------------------


def read_entry(entry: Mapping, dataset_type: str, where: str, section: str = "") -> dict[str, Any]:
    """Every key ``dataset_type`` accepts in ``section``: parsed from ``entry``, or its default.

    Unknown keys get the closest known key, and a key that exists only for other dataset types
    says which ones take it. Rename aliases first (:func:`unalias`).

    Raises:
        DatasetConfigError: an unknown or misplaced key, a missing required key, or a value of the
            wrong type, choice or range.
    """
    declared = keys_for(dataset_type, section)
    for name in entry:
        if name not in declared:
            _refuse_key(name, dataset_type, section, where)
    values: dict[str, Any] = {}
    for name, key in declared.items():
        if name in entry:
            values[name] = key.parse(entry[name], where)
        elif key.required:
            raise DatasetConfigError(f"{where}: required key {name!r} is missing; add it to the entry")
        else:
            values[name] = key.default
    return values


def unalias(entry: Mapping, dataset_type: str, where: str) -> dict:
    """Rename SimpleTuner's other spellings (``is_regularization_data``, ``disable``) to ours."""
    renamed = dict(entry)
    for alias, name in aliases(dataset_type).items():
        if alias in renamed:
            if name in renamed:
                raise DatasetConfigError(f"{where}: keys {alias!r} and {name!r} mean the same thing; keep one")
            renamed[name] = renamed.pop(alias)
    return renamed


def _refuse_key(name: Any, dataset_type: str, section: str, where: str) -> None:
    """Raise the most helpful error for a key ``dataset_type`` does not accept in ``section``."""
    label = shown(name)
    if section == "":
        others = [key for key in DATASET_KEYS if key.section == "" and key.name == name]
        if others:
            raise DatasetConfigError(_wrong_type_message(others, dataset_type, where))
        nested = {key.section for key in DATASET_KEYS if key.section and key.name == name}
        if "video" in nested:
            raise DatasetConfigError(f"{where}: unknown key {label}; video settings go inside the \"video\" object, "
                                     f"e.g. \"video\": {{\"{name}\": ...}}")
        if nested:
            raise DatasetConfigError(f"{where}: unknown key {label}; table settings go inside the \"parquet\" or "
                                     f"\"huggingface\" object, e.g. \"huggingface\": {{\"{name}\": ...}}")
    known = [key.name for key in keys_for(dataset_type, section).values()]
    raise DatasetConfigError(f"{where}: unknown key {label}; {suggest(name, known)}")


def _wrong_type_message(declarations: list[DatasetKey], dataset_type: str, where: str) -> str:
    """A key that exists, but not on ``dataset_type``: name the types that take it (and a close key
    of this type, for ``cache_dir`` on an image dataset)."""
    types = [t for t in DATASET_TYPES if any(t in key.applies_to for key in declarations)]
    spelled = _joined([f'"{t}"' for t in types], "or")
    hints = "".join(f" ({key.hint})" for key in declarations if key.hint)
    name = declarations[0].name
    # a text_embeds key on an image entry (or the reverse) is most likely a near miss of this type's key
    crosses = (dataset_type == "text_embeds") != all(key.applies_to == ("text_embeds",) for key in declarations)
    close = difflib.get_close_matches(name, list(keys_for(dataset_type)), n=1, cutoff=0.6) if crosses else []
    instead = f"; or did you mean {close[0]!r}?" if close else ""
    return (f"{where}: key {name!r} is not supported on {dataset_type} datasets; it only applies to "
            f"{_joined(types)} datasets and is only used with \"dataset_type\": {spelled}{hints}; remove it or "
            f"change the dataset_type{instead}")


def _joined(words: list[str], conjunction: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def check_backends(entry: Mapping, storage: str, metadata: str, where: str) -> None:
    """Keys that belong to other storage types or metadata backends (``aws_*``, ``parquet``, ...).

    Raises:
        DatasetConfigError: names the key, the ``type`` / ``metadata_backend`` that takes it and
            this dataset's.
    """
    for key in keys_for("image").values():
        if key.backends and key.name in entry and storage not in key.backends and metadata not in key.backends:
            spelled = " or ".join(
                [f'"type": "{b}"' for b in key.backends if b in SUPPORTED_BACKEND_TYPES]
                + [f'"metadata_backend": "{b}"' for b in key.backends if b in METADATA_BACKENDS])
            raise DatasetConfigError(f"{where}: key {key.name!r} is only used with {spelled} (this dataset has type "
                                     f"{storage!r}, metadata_backend {metadata!r}); remove it or change those")


# --- messages --------------------------------------------------------------------------------------


def shown(value: Any) -> str:
    """``value`` for an error message, cut short like every option message (a 100 KB string, a
    400-digit number or a deep list stays one readable line)."""
    return show_value(value)


def suggest(name: Any, known: Iterable[str]) -> str:
    """'did you mean X?' with the closest known key, or the list of known keys."""
    known = list(known)
    matches = difflib.get_close_matches(name[:200], known, n=1, cutoff=0.6) if isinstance(name, str) else []
    if matches:
        return f"did you mean {matches[0]!r}?"
    return f"known keys are {sorted(set(known))}"
