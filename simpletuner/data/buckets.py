"""Aspect buckets: the size each image is trained at, and grouping images of equal size.

A batch must hold tensors of one shape. Instead of cropping every image square (losing the edges of
wide and tall pictures), each image is resized to a target size that keeps its aspect ratio at about
the configured resolution, rounded to the model's alignment (the VAE downscale times the patch size).
Images with the same target size form a bucket; the sampler draws each batch from one bucket.

Upscaling is allowed: an image smaller than the target is resized up to it, because dropping small
images silently would surprise users more than a slightly soft picture. Images are never resized more
than needed to cover the target (see :func:`simpletuner.data.images.load_image_tensor`).

This module must import without torch.
"""

from __future__ import annotations

import math
from typing import Iterable

from simpletuner.data.config import RESOLUTION_TYPES
from simpletuner.data.metadata import ImageRecord

#: ``resolution_type: area`` counts megapixels as 10**6 px (1.0 -> a 1000x1000 px equivalent edge),
#: not 1024**2; use ``pixel_area`` with 1024 for the "1024x1024 equivalent" convention.
PIXELS_PER_MEGAPIXEL = 1_000_000


def round_to_alignment(value: float, alignment: int) -> int:
    """``value`` rounded to the nearest multiple of ``alignment`` (halves up), never below ``alignment``.

    Half-up rather than Python's banker's rounding so that results do not flip between even and
    odd multiples for inputs that land exactly halfway.
    """
    return max(alignment, int(math.floor(value / alignment + 0.5)) * alignment)


def pixel_edge(resolution: float, resolution_type: str) -> float:
    """The square edge, in px, that ``resolution`` stands for under ``resolution_type``.

    ``pixel`` and ``pixel_area`` give ``resolution`` in px already; ``area`` gives megapixels, whose
    equivalent square edge is ``sqrt(resolution * 10**6)``.
    """
    _check_resolution_type(resolution_type)
    if resolution_type == "area":
        return math.sqrt(resolution * PIXELS_PER_MEGAPIXEL)
    return float(resolution)


def target_size(
    width: int, height: int, resolution: float, resolution_type: str, alignment: int, crop: bool
) -> tuple[int, int]:
    """The (width, height) an image of ``width`` x ``height`` is trained at.

    - ``pixel``: the shorter side becomes ``resolution`` px, aspect ratio kept.
    - ``pixel_area``: the area becomes ``resolution**2`` px², aspect ratio kept.
    - ``area``: the area becomes ``resolution * 10**6`` px² (megapixels), aspect ratio kept.
    - ``crop=True``: a square ``(r, r)`` with ``r`` the pixel edge rounded to ``alignment``.

    Both sides are rounded to the nearest multiple of ``alignment`` (never below it), so the aspect
    ratio is kept only approximately.

    Raises:
        ValueError: non-positive sizes, resolution or alignment, or an unknown resolution_type.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if alignment < 1:
        raise ValueError(f"alignment must be at least 1, got {alignment}")
    edge = pixel_edge(resolution, resolution_type)
    if crop:
        side = round_to_alignment(edge, alignment)
        return side, side
    if resolution_type == "pixel":
        scale = edge / min(width, height)
    else:
        scale = edge / math.sqrt(width * height)
    return round_to_alignment(width * scale, alignment), round_to_alignment(height * scale, alignment)


def bucket_label(size: tuple[int, ...]) -> str:
    """``"704x512"`` for an image bucket, ``"704x512x17"`` for a video bucket (width, height, frames)."""
    return "x".join(str(value) for value in size)


def aspect_key(width: int, height: int) -> str:
    """Aspect ratio ``width / height`` with two decimals (``"1.50"``), for logs and reports."""
    return f"{width / height:.2f}"


def assign_buckets(
    records: Iterable[ImageRecord], resolution: float, resolution_type: str, alignment: int, crop: bool
) -> dict[tuple[int, int], list[ImageRecord]]:
    """Group ``records`` by their :func:`target_size`.

    Keys are in ascending (width, height) order and records keep their input order (the scan's
    sorted order), so the result is identical from run to run.
    """
    groups: dict[tuple[int, int], list[ImageRecord]] = {}
    for record in records:
        size = target_size(record.width, record.height, resolution, resolution_type, alignment, crop)
        groups.setdefault(size, []).append(record)
    return {size: groups[size] for size in sorted(groups)}


def merge_buckets(
    *bucket_maps: dict[tuple[int, int], list[ImageRecord]],
) -> dict[tuple[int, int], list[ImageRecord]]:
    """Combine per-dataset bucket maps (datasets may use different resolutions) into one.

    Records of equal target size share a bucket whatever their dataset, since a batch only needs
    equal tensor shapes. Key order is ascending; record order follows the argument order.
    """
    merged: dict[tuple[int, int], list[ImageRecord]] = {}
    for bucket_map in bucket_maps:
        for size, records in bucket_map.items():
            merged.setdefault(size, []).extend(records)
    return {size: merged[size] for size in sorted(merged)}


def _check_resolution_type(resolution_type: str) -> None:
    """Raise listing the valid names: strategies are chosen by name, so typos must be loud."""
    if resolution_type not in RESOLUTION_TYPES:
        raise ValueError(f"unknown resolution_type {resolution_type!r}; use one of {list(RESOLUTION_TYPES)}")


def bucket_alignment(requested: int, pixels_per_token: int, edge: float) -> int:
    """The rounding step for bucket sizes of one dataset.

    Rule: the configured ``aspect_bucket_alignment``, raised to the model's pixels per token when
    smaller (a bucket edge must map to whole latent cells: the VAE scale factor, times the patch
    size for transformers that split latents into patches, e.g. 16 px for SD3). When the dataset's
    pixel edge is smaller than that alignment (e.g. 32 px images with the default 64), aligning
    would upscale every image to the alignment, so ``2 * pixels_per_token`` is used instead: whole
    tokens, and an even latent size for the UNet's downsampling. A 64 px dataset with alignment 64
    keeps 64 and so gets 64x64 buckets.
    """
    alignment = max(requested, pixels_per_token)
    if edge < alignment:
        return pixels_per_token * 2
    return alignment
