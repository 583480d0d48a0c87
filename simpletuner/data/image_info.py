"""Per-image size facts for SDXL-style micro-conditioning.

SDXL (Podell et al. 2023, section 2.2) conditions its UNet on three pairs of numbers per image: the
image's original size, the top-left corner of the crop window taken from the resized image, and the
size it is trained at. The model learns what small or cropped sources look like, and at inference
asking for a large, uncropped original steers it away from blur and cut-off subjects.

The numbers here come from the same geometry the latent cache uses when it decodes an image
(:func:`simpletuner.data.images.load_image_tensor`): resize with the aspect kept until the image
covers its bucket, then cut a bucket-sized window placed by the record's crop anchor
(:mod:`simpletuner.data.geometry`). Everything is in pixels and ``(height, width)`` / ``(top, left)``
order, as the diffusers SDXL pipelines take them. This module needs no torch except in
:func:`size_conditioning_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

Size = tuple[int, int]


@dataclass(frozen=True)
class ImageSizeInfo:
    """The micro-conditioning numbers of one training image.

    Attributes:
        original_size: (height, width) of the image as found (after EXIF orientation).
        crop_top_left: (top, left) of the training window inside the resized image.
        target_size: (height, width) of the training window (the bucket).
    """

    original_size: Size
    crop_top_left: Size
    target_size: Size


def covering_size(width: int, height: int, target: Size) -> Size:
    """(width, height) of the image resized, aspect kept, to the smallest size covering ``target``
    = (width, height); the same rounding as :func:`simpletuner.data.images.resize_to_cover`."""
    target_width, target_height = target
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def crop_offset(slack: int, fraction: float) -> int:
    """Pixels left of (or above) the window: ``fraction`` of the slack, floored and kept inside it,
    as :func:`simpletuner.data.images.crop_at` places it."""
    return min(slack, max(0, int(slack * fraction)))


def image_size_info(width: int, height: int, bucket: Size, anchor: tuple[float, float]) -> ImageSizeInfo:
    """Micro-conditioning of an image of ``width`` x ``height`` trained in ``bucket`` = (width, height)
    with its crop window at ``anchor`` = (x, y) fractions of the slack."""
    resized_width, resized_height = covering_size(width, height, bucket)
    left = crop_offset(resized_width - bucket[0], anchor[0])
    top = crop_offset(resized_height - bucket[1], anchor[1])
    return ImageSizeInfo(original_size=(height, width), crop_top_left=(top, left), target_size=(bucket[1], bucket[0]))


def size_conditioning_batch(infos: list[ImageSizeInfo]) -> dict:
    """The batch keys ``original_size``, ``crop_top_left`` and ``target_size``: LongTensors (B, 2)."""
    import torch

    return {name: torch.tensor([getattr(info, name) for info in infos], dtype=torch.long)
            for name in ("original_size", "crop_top_left", "target_size")}
