"""Metadata scan: list a dataset's images with their sizes and captions, without decoding pixels.

Bucketing only needs each image's width and height, which PIL reads from the file header. Skipping
the decode keeps a 10k-image scan to a couple of seconds. The price is that a file truncated after a
valid header passes the scan; it is caught at decode time by
:func:`simpletuner.data.images.load_image_tensor`.

The scan opens files exactly as the decoder does (:func:`simpletuner.data.images.open_image`), so
it refuses what the decoder would refuse: non-images whatever their extension, empty files, and
headers claiming more than :data:`simpletuner.data.images.MAX_IMAGE_PIXELS` pixels. It never logs:
it returns each skipped file once with its reason, and the caller logs one line per file.

Files are read through the dataset's storage backend (:mod:`simpletuner.data.backends`): a local
folder, a bucket (only the first :data:`HEADER_BYTES` of each image are fetched, with a ranged GET),
or a table (parquet, Hugging Face) that lists the images and may give their captions and sizes, in
which case no image is opened at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from simpletuner.data.backends import Backend, DatasetSource, SourceItem, StorageError, open_dataset
from simpletuner.data.captions import caption_for, caption_key_for
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.images import ImageSource, ImageTooLargeError, open_image, unreadable_reason

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
    """

    path: Path | str
    width: int
    height: int
    caption: str
    dataset_id: str
    key: str | None = field(default=None, compare=False)


@dataclass
class ScanResult:
    """Outcome of a scan: the usable records, and every skipped file with a human-readable reason."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)


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


def scan_image_dataset(cfg: ImageDatasetConfig, source: DatasetSource | None = None) -> ScanResult:
    """Every image of the dataset, sorted by key (recursive for folders and buckets; table order
    for parquet and Hugging Face datasets).

    Files whose header cannot be read, or with no caption under the dataset's strategy, are put
    in ``skipped`` with a reason rather than raising, so the caller can report them all at once.
    ``source`` is the dataset's opened backend (:func:`simpletuner.data.backends.open_dataset`
    by default).

    Raises:
        StorageError: the dataset's storage cannot be reached or read (bucket, credentials).
    """
    result = ScanResult()
    source = source if source is not None else open_dataset(cfg)
    backend = source.images
    items = source.items
    if items is None:
        items = [SourceItem(key) for key in backend.list_files(IMAGE_EXTENSIONS)]
    table_captions = cfg.caption_strategy in ("parquet", "huggingface")
    for item in items:
        path = backend.locate(item.key)
        if item.error is not None:
            result.skipped.append((path, item.error))
            continue
        if item.size is not None:
            width, height = item.size
        else:
            try:
                width, height = read_image_size_from(backend, item.key)
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
                result.skipped.append((path, _unreadable_header_reason(backend, item.key, exc)))
                continue
        if table_captions:
            caption, reason = item.caption, item.caption_reason
        else:
            caption = caption_for(item.key, cfg, backend)
            reason = None if caption is not None else _missing_caption_reason(backend, item.key, cfg)
        if caption is None:
            result.skipped.append((path, reason or "no caption"))
            continue
        result.records.append(ImageRecord(path, width, height, caption, cfg.id, key=item.key))
    return result


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
