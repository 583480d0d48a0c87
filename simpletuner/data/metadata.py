"""Metadata scan: list a dataset's images with their sizes and captions, without decoding pixels.

Bucketing only needs each image's width and height, which PIL reads from the file header. Skipping
the decode keeps a 10k-image scan to a couple of seconds. The price is that a file truncated after a
valid header passes the scan; it is caught at decode time by
:func:`simpletuner.data.images.load_image_tensor`.

The scan opens files exactly as the decoder does (:func:`simpletuner.data.images.open_image`), so
it refuses what the decoder would refuse: non-images whatever their extension, empty files, and
headers claiming more than :data:`simpletuner.data.images.MAX_IMAGE_PIXELS` pixels. It never logs:
it returns each skipped file once with its reason, and the caller logs one line per file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from simpletuner.data.backends.local import LocalBackend
from simpletuner.data.captions import caption_file_for, caption_for
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.images import ImageTooLargeError, open_image, unreadable_reason

#: Files the scan looks at; their content is still sniffed (a PNG named .jpg is used). ``.gif``
#: contributes its first frame, as animated files do everywhere in the loader.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image.

    Attributes:
        path: the image file.
        width, height: pixel size as displayed, i.e. after the EXIF orientation that
            :func:`simpletuner.data.images.load_image_tensor` applies, so the bucket matches
            the decoded image's aspect (a portrait phone photo is stored landscape).
        caption: the prompt, resolved by the dataset's caption strategy.
        dataset_id: the owning dataset (for per-dataset repeats, caches and logs).
    """

    path: Path
    width: int
    height: int
    caption: str
    dataset_id: str


@dataclass
class ScanResult:
    """Outcome of a scan: the usable records, and every skipped file with a human-readable reason."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


#: EXIF orientations 5-8 rotate by 90 or 270 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


def read_image_size(path: Path) -> tuple[int, int]:
    """Displayed (width, height) from the header only; ``Image.open`` is lazy and we never ``.load()``.

    Raises:
        ImageTooLargeError: the header claims more pixels than the decoder would accept.
        Whatever PIL raises for an unreadable header (OSError, SyntaxError, ValueError, ...).
    """
    with open_image(path) as image:
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


def scan_image_dataset(cfg: ImageDatasetConfig) -> ScanResult:
    """Every image under ``cfg.instance_data_dir`` (recursive, sorted by relative path).

    Files whose header cannot be read, or with no caption under the dataset's strategy, are put
    in ``skipped`` with a reason rather than raising, so the caller can report them all at once.
    """
    result = ScanResult()
    backend = LocalBackend(Path(cfg.instance_data_dir))
    for path in backend.list_files(IMAGE_EXTENSIONS):
        try:
            width, height = read_image_size(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
            result.skipped.append((path, _unreadable_header_reason(path, exc)))
            continue
        caption = caption_for(path, cfg)
        if caption is None:
            result.skipped.append((path, _missing_caption_reason(path, cfg)))
            continue
        result.records.append(ImageRecord(path, width, height, caption, cfg.id))
    return result


def _unreadable_header_reason(path: Path, exc: Exception) -> str:
    """Why the header of ``path`` was refused: too large, empty, not an image, or PIL's error."""
    if isinstance(exc, ImageTooLargeError):
        return exc.reason
    return f"cannot read image header: {unreadable_reason(path, exc)}"


def _missing_caption_reason(path: Path, cfg: ImageDatasetConfig) -> str:
    """Explain why no caption was found, naming the file the user should create or fix."""
    if cfg.caption_strategy == "textfile":
        sidecar = caption_file_for(path)
        if sidecar.exists():
            return f"empty caption: caption file {sidecar} has no non-blank line"
        return f"caption file {sidecar} not found (caption_strategy 'textfile' expects <stem>.txt beside the image)"
    if cfg.caption_strategy == "filename":
        return f"file name {path.name!r} gives an empty caption (caption_strategy 'filename')"
    return "instance_prompt is empty (caption_strategy 'instanceprompt')"
