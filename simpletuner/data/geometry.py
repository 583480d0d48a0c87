"""Where each image goes: its training size, its crop window, or why it is left out.

The per-dataset geometry keys of ``multidatabackend.json`` act here, in one pure function per rule,
before anything is decoded (only header sizes are known):

- ``minimum_image_size`` / ``minimum_aspect_ratio`` / ``maximum_aspect_ratio`` leave images out;
- ``maximum_image_size`` + ``target_downsample_size`` shrink very large images first, so a crop is
  taken from the whole picture rather than from a small window of it;
- ``crop`` with ``crop_aspect`` (square, preserve, closest, random) and ``crop_aspect_buckets``
  choose the trained aspect ratio; ``crop_style`` (center, corner, random) places the crop window;
- ``max_upscale_threshold`` leaves out images that would have to be enlarged too much.

Sizes are measured in the unit of the dataset's ``resolution_type``: ``pixel`` the shorter side in
px, ``pixel_area`` the edge of a square of equal area in px, ``area`` megapixels (10**6 px).
"Random" choices are seeded by the file path, so they are stable across runs and the latent cache
stays valid. This module must import without torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from simpletuner.data.buckets import PIXELS_PER_MEGAPIXEL, pixel_edge, round_to_alignment, target_size
from simpletuner.data.config import ImageDatasetConfig
from simpletuner.data.metadata import ImageRecord

Size = tuple[int, int]

#: Where the crop window sits inside the resized image, as fractions of the slack on each axis.
CROP_ANCHORS = {"center": (0.5, 0.5), "corner": (0.0, 0.0)}


@dataclass(frozen=True)
class Placement:
    """How one image is trained.

    Attributes:
        size: the (width, height) trained at; images of equal size share a bucket.
        anchor: (x, y) position of the crop window in [0, 1]: 0.5 centres it, 0 takes the top/left.
        source_size: the image size after ``maximum_image_size`` downsampling (or as found).
    """

    size: Size
    anchor: tuple[float, float]
    source_size: Size


def measure(width: int, height: int, resolution_type: str) -> float:
    """An image's size in the unit its dataset's resolution is given in."""
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "area":
        return width * height / PIXELS_PER_MEGAPIXEL
    return math.sqrt(width * height)


def _path_unit_values(record: ImageRecord, salt: str, count: int) -> list[float]:
    """``count`` numbers in [0, 1) derived from the file path: random but identical every run."""
    digest = hashlib.sha256(f"{salt}:{record.path}".encode("utf-8")).digest()
    return [int.from_bytes(digest[4 * i: 4 * i + 4], "big") / 2**32 for i in range(count)]


def downsampled_size(width: int, height: int, cfg: ImageDatasetConfig) -> Size:
    """Shrink an image larger than ``maximum_image_size`` to ``target_downsample_size``."""
    if cfg.maximum_image_size is None or measure(width, height, cfg.resolution_type) <= cfg.maximum_image_size:
        return width, height
    ratio = cfg.target_downsample_size / measure(width, height, cfg.resolution_type)
    scale = math.sqrt(ratio) if cfg.resolution_type == "area" else ratio
    return max(1, round(width * scale)), max(1, round(height * scale))


def exclusion_reason(record: ImageRecord, cfg: ImageDatasetConfig) -> str | None:
    """Why the size filters leave this image out, or None when it is kept."""
    size = measure(record.width, record.height, cfg.resolution_type)
    if cfg.minimum_image_size is not None and size < cfg.minimum_image_size:
        return (f"{record.width}x{record.height} is smaller than minimum_image_size {cfg.minimum_image_size:g} "
                f"({cfg.resolution_type})")
    aspect = record.width / record.height
    if cfg.minimum_aspect_ratio is not None and aspect < cfg.minimum_aspect_ratio:
        return f"aspect ratio {aspect:.3f} is below minimum_aspect_ratio {cfg.minimum_aspect_ratio:g}"
    if cfg.maximum_aspect_ratio is not None and aspect > cfg.maximum_aspect_ratio:
        return f"aspect ratio {aspect:.3f} is above maximum_aspect_ratio {cfg.maximum_aspect_ratio:g}"
    return None


def size_at_aspect(aspect: float, resolution: float, resolution_type: str, alignment: int) -> Size:
    """The training size of the given aspect ratio at the dataset's resolution."""
    edge = pixel_edge(resolution, resolution_type)
    if resolution_type == "pixel":
        width, height = (edge * aspect, edge) if aspect >= 1 else (edge, edge / aspect)
    else:
        width, height = edge * math.sqrt(aspect), edge / math.sqrt(aspect)
    return round_to_alignment(width, alignment), round_to_alignment(height, alignment)


def cropped_aspect(record: ImageRecord, source: Size, cfg: ImageDatasetConfig) -> float | None:
    """The aspect ratio a cropped image is trained at (None: keep the image's own)."""
    if cfg.crop_aspect == "square":
        return 1.0
    if cfg.crop_aspect == "preserve":
        return None
    choices = sorted(cfg.crop_aspect_buckets or ())
    if cfg.crop_aspect == "closest":
        own = source[0] / source[1]
        return min(choices, key=lambda a: (abs(math.log(a / own)), a))
    return choices[int(_path_unit_values(record, "crop_aspect", 1)[0] * len(choices))]


def crop_anchor(record: ImageRecord, cfg: ImageDatasetConfig, epoch: int = 0) -> tuple[float, float]:
    """Where the crop window sits; ``random`` is seeded by the path (and by the epoch after the
    first, which only ``vae_cache_clear_each_epoch`` asks for: new latents, new crops)."""
    if not cfg.crop:
        return CROP_ANCHORS["center"]
    if cfg.crop_style == "random":
        x, y = _path_unit_values(record, "crop_style" if epoch == 0 else f"crop_style:{epoch}", 2)
        return x, y
    return CROP_ANCHORS[cfg.crop_style]


def upscale_needed(source: Size, size: Size) -> float:
    """How much the source must be enlarged to cover ``size`` (1.0 = no enlargement)."""
    return max(size[0] / source[0], size[1] / source[1])


def place_image(record: ImageRecord, cfg: ImageDatasetConfig, alignment: int,
                rounding: int | None = None) -> Placement | str:
    """The image's :class:`Placement`, or the reason (a string) it is left out.

    ``rounding`` (``--aspect_bucket_rounding``) rounds an image's own aspect ratio to that many
    decimals before its size is computed, so near-identical aspects (1000x667 and 1000x670 at 1
    decimal) share a bucket instead of splitting a small dataset into many small buckets.
    """
    reason = exclusion_reason(record, cfg)
    if reason:
        return reason
    source = downsampled_size(record.width, record.height, cfg)
    aspect = cropped_aspect(record, source, cfg) if cfg.crop else None
    if aspect is None and rounding is not None:
        aspect = round(source[0] / source[1], rounding) or 10.0 ** -rounding
    if aspect is None:
        size = target_size(source[0], source[1], cfg.resolution, cfg.resolution_type, alignment, crop=False)
    else:
        size = size_at_aspect(aspect, cfg.resolution, cfg.resolution_type, alignment)
    if cfg.max_upscale_threshold is not None:
        factor = upscale_needed(source, size)
        if factor > 1 + cfg.max_upscale_threshold:
            return (f"needs {100 * (factor - 1):.0f}% upscaling to reach {size[0]}x{size[1]}; "
                    f"max_upscale_threshold is {cfg.max_upscale_threshold:g}")
    anchor = crop_anchor(record, cfg)
    return Placement(size=size, anchor=anchor, source_size=source)


def place_images(records: list[ImageRecord], cfg: ImageDatasetConfig, alignment: int, rounding: int | None = None
                 ) -> tuple[dict[ImageRecord, Placement], list[tuple[object, str]]]:
    """Placements of every kept record and (path, reason) for every left-out one."""
    placed: dict[ImageRecord, Placement] = {}
    skipped: list[tuple[object, str]] = []
    for record in records:
        result = place_image(record, cfg, alignment, rounding)
        if isinstance(result, str):
            skipped.append((record.path, result))
        else:
            placed[record] = result
    return placed, skipped


def buckets_of(placed: dict[ImageRecord, Placement]) -> dict[Size, list[ImageRecord]]:
    """Group placed records by training size, in ascending size order, records in input order."""
    groups: dict[Size, list[ImageRecord]] = {}
    for record, placement in placed.items():
        groups.setdefault(placement.size, []).append(record)
    return {size: groups[size] for size in sorted(groups)}
