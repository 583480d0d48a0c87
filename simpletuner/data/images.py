"""Decode one image into the tensor the VAE encodes: oriented, RGB, resized and cropped to its bucket.

This is the only place pixels are decoded. A truncated or corrupt file raises
:class:`CorruptImageError` naming the file, so the caller can skip it and report it instead of
training on a half-grey picture. We never enable PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``: with it
on, PIL pads a truncated file with grey and says nothing.

torch is imported inside :func:`load_image_tensor` so that importing this module stays cheap.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

#: Errors PIL lets escape for unreadable files: truncated data (OSError), bad structure
#: (SyntaxError, ValueError, struct.error, EOFError), broken compressed streams (zlib.error), and
#: absurdly large images (DecompressionBombError).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

#: Background for transparent pixels: white, as most captioned RGBA images (logos, cut-outs) are
#: shown on white, and black would teach dark halos.
_BACKGROUND_RGB = (255, 255, 255)


class CorruptImageError(Exception):
    """An image file that cannot be fully decoded; the message names the file and the reason."""


def load_image_tensor(path: Path, size: tuple[int, int]) -> "torch.Tensor":
    """Decode ``path`` into a float32 tensor of shape (3, height, width) with values in [-1, 1].

    Steps: full decode, EXIF orientation, RGB (alpha composited on white), Lanczos resize so the
    image covers ``size`` (aspect kept; small images are upscaled), then a centre crop to exactly
    ``size`` = (width, height).

    Raises:
        CorruptImageError: the file is truncated, corrupt or not an image.
    """
    import torch

    image = decode_image(Path(path))
    image = resize_to_cover(to_rgb(orient(image)), size)
    image = center_crop(image, size)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def decode_image(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (``.load()``), so truncation shows up now and not later."""
    try:
        with Image.open(path) as image:
            image.load()  # pixel data stays usable after the file is closed on exit
        return image
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"{path}: cannot decode image: {type(exc).__name__}: {exc}") from exc


def orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so phone photos are upright as the photographer saw them.

    Malformed EXIF is ignored rather than fatal: the pixels are fine, only the tag is not.
    """
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - PIL raises assorted errors for broken EXIF blocks
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels are composited onto white.

    16-bit and float greyscale are rescaled to 8 bits first, since PIL's own conversion clips them
    to 255 and turns most of the image white.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        scale = 1.0 if image.mode == "F" else 1.0 / 257.0  # 65535 / 257 == 255
        grey = np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND_RGB, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_to_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos-resize with aspect kept to the smallest size that covers ``size`` on both sides."""
    target_width, target_height = size
    scale = max(target_width / image.width, target_height / image.height)
    new_size = (
        max(target_width, round(image.width * scale)),
        max(target_height, round(image.height * scale)),
    )
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the centre ``size`` = (width, height) region; the image must already cover it."""
    target_width, target_height = size
    left = (image.width - target_width) // 2
    top = (image.height - target_height) // 2
    if (left, top) == (0, 0) and image.size == size:
        return image
    return image.crop((left, top, left + target_width, top + target_height))
