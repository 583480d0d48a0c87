"""Metadata scan: list a dataset's images with their sizes and captions, without decoding pixels.

Bucketing only needs each image's width and height, which PIL reads from the file header. Skipping
the decode keeps a 10k-image scan to a couple of seconds. The price is that a file truncated after a
valid header passes the scan; it is caught at decode time by
:func:`simpletuner.data.images.load_image_tensor`.

The scan opens files exactly as the decoder does (:func:`simpletuner.data.images.open_image`), so
it refuses what the decoder would refuse: non-images whatever their extension, empty files, and
headers claiming more than :data:`simpletuner.data.images.MAX_IMAGE_PIXELS` pixels. It does not log
its findings: it returns each skipped file once with its reason, and the caller logs one line per
file (only ``--print_filenames`` makes it log each file name as it goes).

Files are read through the dataset's storage backend (:mod:`simpletuner.data.backends`): a local
folder, a bucket (only the first :data:`HEADER_BYTES` of each image are fetched, with a ranged GET),
or a table (parquet, Hugging Face) that lists the images and may give their captions and sizes, in
which case no image is opened at all.

A ``video`` dataset goes through the same scan with video files: its "size" is read from the
container headers by :mod:`simpletuner.data.video` and its records are ``VideoRecord`` (with the
frame count and rate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from simpletuner.data.backends import Backend, DatasetSource, SourceItem, StorageError, open_dataset
from simpletuner.data.caption_rules import CaptionRules
from simpletuner.data.captions import caption_key_for, caption_variants_for
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.images import ImageSource, ImageTooLargeError, open_image, unreadable_reason
from simpletuner.data.parallel import ordered_map

logger = logging.getLogger(__name__)

#: Files the scan looks at; their content is still sniffed (a PNG named .jpg is used). ``.gif``
#: contributes its first frame, as animated files do everywhere in the loader.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

#: Bytes fetched from the start of a remote image to read its size. Enough for every PNG, GIF, BMP
#: and WebP header and for JPEGs whose EXIF/ICC blocks fit; larger headers fall back to the whole file.
HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image.

    Attributes:
        path: where the image is: its local file, or a description such as ``s3://bucket/key``.
        width, height: pixel size as displayed, i.e. after the EXIF orientation that
            :func:`simpletuner.data.images.load_image_tensor` applies, so the bucket matches
            the decoded image's aspect (a portrait phone photo is stored landscape).
        caption: the prompt, resolved by the dataset's caption strategy.
        dataset_id: the owning dataset (for per-dataset repeats, caches and logs).
        key: the image's key in its dataset's backend (None: ``path`` is a local file).
        captions: every caption variant (one per line of a multi-line caption file); ``caption``
            is the first. Empty for records built by hand, meaning just ``caption``.
    """

    path: Path | str
    width: int
    height: int
    caption: str
    dataset_id: str
    key: str | None = field(default=None, compare=False)
    captions: tuple[str, ...] = field(default=(), compare=False)

    @property
    def caption_variants(self) -> tuple[str, ...]:
        """``captions``, or ``(caption,)`` for a record without variants."""
        return self.captions or (self.caption,)


@dataclass
class ScanResult:
    """Outcome of a scan: the usable records, and every skipped file with a human-readable reason."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)
    #: Keys of every listed image (what ``preserve_data_backend_cache`` reuses).
    listed: list[str] = field(default_factory=list)
    #: Keys of images whose header could not be read (``delete_problematic_images`` removes them).
    unreadable: list[str] = field(default_factory=list)
    #: Key of each skipped path (to save and restore a scan).
    skipped_keys: list[str] = field(default_factory=list)


#: What one scanned file became: a record, or (key, path, reason, header_unreadable).
_Outcome = tuple[ImageRecord | None, tuple[str, Path | str, str, bool] | None, tuple[int, int] | None]


#: EXIF orientations 5-8 rotate by 90 or 270 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


def read_image_size(path: ImageSource, name: str | None = None) -> tuple[int, int]:
    """Displayed (width, height) from the header only; ``Image.open`` is lazy and we never ``.load()``.

    ``path`` is a local file or the image's first bytes (``name`` names it in messages).

    Raises:
        ImageTooLargeError: the header claims more pixels than the decoder would accept.
        Whatever PIL raises for an unreadable header (OSError, SyntaxError, ValueError, ...).
    """
    with open_image(path, name) as image:
        width, height = image.size
        if _exif_orientation(image) in _TRANSPOSING_ORIENTATIONS:
            return height, width
        return width, height


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag when it is already in the header (1 = upright otherwise).

    Only EXIF found while parsing the header is consulted: PNG's ``getexif`` would decode the whole
    image to look for an ``eXIf`` chunk after the pixel data. Such rare files get their bucket from
    the stored size; the decode still centre-crops them to the bucket size exactly.
    """
    if "exif" not in image.info:
        return 1
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF must not hide an otherwise good image
        return 1


def read_image_size_from(backend: Backend, key: str) -> tuple[int, int]:
    """The displayed size of ``key``: from the local file, or from the first :data:`HEADER_BYTES`
    of a remote one (the whole object only when its header is longer than that).

    Raises:
        as :func:`read_image_size`; StorageError when the storage itself cannot be reached.
    """
    local = backend.local_path(key)
    if local is not None:
        return read_image_size(local)
    name = str(backend.locate(key))
    head = backend.read_head(key, HEADER_BYTES)
    try:
        return read_image_size(head, name)
    except ImageTooLargeError:
        raise
    except Exception:  # noqa: BLE001 - maybe only cut short: retry on the whole file
        if len(head) < HEADER_BYTES:
            raise
    return read_image_size(backend.read_bytes(key), name)


def scan_image_dataset(
    cfg: ImageDatasetConfig,
    source: DatasetSource | None = None,
    *,
    rules: CaptionRules | None = None,
    keys: list[str] | None = None,
    size_hint: Callable[[str], tuple[int, int] | None] | None = None,
    on_scanned: Callable[[str, tuple[int, int] | None], None] | None = None,
    workers: int = 1,
    log_each: bool = False,
) -> ScanResult:
    """Every image of the dataset, sorted by key (recursive for folders and buckets; table order
    for parquet and Hugging Face datasets).

    Files whose header cannot be read, or with no caption under the dataset's strategy, are put
    in ``skipped`` with a reason rather than raising, so the caller can report them all at once.
    ``source`` is the dataset's opened backend (:func:`simpletuner.data.backends.open_dataset`
    by default).

    Args:
        rules: caption filters and instance-prompt rules (default: the dataset's own).
        keys: the files to look at instead of listing the storage (a preserved listing).
        size_hint: a known (width, height) for a key, so its header is not read again.
        on_scanned: called with each key and its size (None when unreadable), in order.
        workers: threads reading headers and captions; used only for remote storage, where
            they wait on the network (local header parsing is CPU-bound Python).
        log_each: log every file name as it is scanned (``--print_filenames``).

    Raises:
        StorageError: the dataset's storage cannot be reached or read (bucket, credentials).
    """
    result = ScanResult()
    source = source if source is not None else open_dataset(cfg)
    rules = rules if rules is not None else CaptionRules.for_dataset(cfg)
    backend = source.images
    items = source.items
    if items is None:
        listed = keys if keys is not None else backend.list_files(_extensions(cfg))
        items = [SourceItem(key) for key in listed]
    result.listed = [item.key for item in items]
    remote = bool(items) and backend.local_path(items[0].key) is None
    scan_one = lambda item: _scan_item(item, cfg, backend, rules, size_hint, log_each)  # noqa: E731
    for item, (record, skip, size) in zip(items, ordered_map(scan_one, items, workers if remote else 1, 4 * workers)):
        if on_scanned is not None:
            on_scanned(item.key, size)
        if record is not None:
            result.records.append(record)
            continue
        key, path, reason, unreadable = skip
        result.skipped.append((path, reason))
        result.skipped_keys.append(key)
        if unreadable:
            result.unreadable.append(key)
    return result


def _scan_item(item: SourceItem, cfg: ImageDatasetConfig, backend: Backend, rules: CaptionRules,
               size_hint: Callable[[str], tuple[int, int] | None] | None, log_each: bool) -> _Outcome:
    """Size and captions of one listed image, or why it is skipped."""
    path = backend.locate(item.key)
    if log_each:
        logger.info("dataset %s: scanning %s", cfg.id, path)
    if item.error is not None:
        return None, (item.key, path, item.error, False), None
    video = cfg.dataset_type == "video"
    size = item.size if item.size is not None else (size_hint(item.key) if size_hint is not None else None)
    if size is None:
        try:
            size = _read_video_size(backend, item.key) if video else read_image_size_from(backend, item.key)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
            reason = (getattr(exc, "reason", None) or f"cannot read video: {type(exc).__name__}: {exc}") if video \
                else _unreadable_header_reason(backend, item.key, exc)
            return None, (item.key, path, reason, True), None
    width, height = size[:2]
    if rules.only and rules.instance_prompt:
        captions: tuple[str, ...] = (rules.instance_prompt,)
        reason = None
    else:
        if cfg.caption_strategy in ("parquet", "huggingface"):
            raw = None if item.caption is None else [item.caption]
            reason = item.caption_reason
        else:
            raw = caption_variants_for(item.key, cfg, backend, split_lines=rules.split_lines)
            if raw is None and rules.fallback and cfg.caption_strategy == "textfile":
                raw = [rules.fallback]  # a folder_repeats subfolder's words
            reason = None if raw is not None else _missing_caption_reason(backend, item.key, cfg)
        captions = rules.apply_all(raw) if raw is not None else ()
        if raw is not None and not captions:
            reason = "caption is empty after caption_filter_list"
    if not captions:
        return None, (item.key, path, reason or "no caption", False), size
    if video:
        from simpletuner.data.video import VideoInfo, video_record

        record = video_record(path, VideoInfo(*size), captions[0], cfg.id, item.key, captions)
        return record, None, size
    record = ImageRecord(path, width, height, captions[0], cfg.id, key=item.key, captions=captions)
    return record, None, size


def _extensions(cfg: ImageDatasetConfig) -> tuple[str, ...]:
    """The file suffixes a dataset's scan lists: videos for a ``video`` dataset, images otherwise."""
    if cfg.dataset_type == "video":
        from simpletuner.data.video import VIDEO_EXTENSIONS

        return VIDEO_EXTENSIONS
    return IMAGE_EXTENSIONS


def _read_video_size(backend: Backend, key: str) -> tuple[int, int, int, float | None]:
    """(width, height, frames, fps) of a video from its headers (the "size" a video scan stores)."""
    from simpletuner.data.video import read_video_info_from

    info = read_video_info_from(backend, key)
    return info.width, info.height, int(info.frames or 0), info.fps


def _unreadable_header_reason(backend: Backend, key: str, exc: Exception) -> str:
    """Why the header of ``key`` was refused: too large, empty, not an image, or PIL's error."""
    if isinstance(exc, ImageTooLargeError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return f"cannot read image: {backend.locate(key)} does not exist"
    local = backend.local_path(key)
    try:
        evidence = local if local is not None else backend.read_head(key, 1)  # only to spot empty files
    except OSError:
        evidence = b"?"
    return f"cannot read image header: {unreadable_reason(evidence, exc)}"


def _missing_caption_reason(backend: Backend, key: str, cfg: ImageDatasetConfig) -> str:
    """Explain why no caption was found, naming the file the user should create or fix."""
    if cfg.caption_strategy == "textfile":
        sidecar = caption_key_for(key)
        if backend.exists(sidecar):
            return f"empty caption: caption file {backend.locate(sidecar)} has no non-blank line"
        return (f"caption file {backend.locate(sidecar)} not found (caption_strategy 'textfile' expects "
                "<stem>.txt beside the image)")
    if cfg.caption_strategy == "filename":
        return f"file name {Path(key).name!r} gives an empty caption (caption_strategy 'filename')"
    return "instance_prompt is empty (caption_strategy 'instanceprompt')"
