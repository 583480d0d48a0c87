"""Decode one image into the tensor the VAE encodes: oriented, RGB, resized and cropped to its bucket.

This is the only place pixels are decoded. A truncated or corrupt file raises
:class:`CorruptImageError` naming the file, so the caller can skip it and report it instead of
training on a half-grey picture. We never enable PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``: with it
on, PIL pads a truncated file with grey and says nothing.

What is accepted, and how (``tests/data/nasty_corpus.py`` holds one file of each kind):

* The format is sniffed from the content among :data:`IMAGE_FORMATS`, whatever the extension says:
  a PNG named ``.jpg`` is used; a text file named ``.png`` is "not an image"; a zero-byte file is
  an "empty file". Other formats PIL knows (EPS, PDF, ...) are refused, so a renamed file never
  reaches a plugin that shells out (Ghostscript) or that we have never tested.
* A header claiming more than :data:`MAX_IMAGE_PIXELS` pixels raises :class:`ImageTooLargeError`
  before anything is decoded (the scan rejects it from the header alone), so a 40000x40000 bomb
  costs a few bytes of memory, not gigabytes. PIL's global ``Image.MAX_IMAGE_PIXELS`` is left alone.
* Animated GIF / WebP / PNG: only the first frame is used (what a viewer shows as a still).
* EXIF orientation is applied, so the decoded pixels and the scanned size are upright.
* CMYK (Adobe-inverted or not), palette, greyscale, 16-bit and float images become 8-bit RGB;
  16-bit values are scaled down, not clipped to white; transparency (alpha channel, palette or
  colour-key ``tRNS``) is composited onto white.

Every function takes the image as a local path or as its encoded bytes (an object read from a
bucket, a cell of a table); ``name`` then says what to call it in messages.

torch is imported inside :func:`load_image_tensor` so that importing this module stays cheap.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

#: An image to open: a local file, or its encoded bytes (from a bucket or a table).
ImageSource = Path | str | bytes

#: Most pixels an image may have (width x height). Equal to the size at which PIL's own default
#: guard raises (2 x ``PIL.Image.MAX_IMAGE_PIXELS``), about 13400 x 13400: far above any training
#: resolution, far below what a few-byte PNG can claim. Checked on the header, before decoding.
MAX_IMAGE_PIXELS = 178_956_970

#: PIL format names the loader opens; the content decides, not the extension. JPEG covers MPO
#: (multi-picture camera JPEGs) too, since PIL's JPEG opener returns those.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

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

#: The pixel count in PIL's DecompressionBombError message: "Image size (N pixels) exceeds ...".
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class CorruptImageError(Exception):
    """An image file that cannot be fully decoded; the message names the file and the reason."""


class ImageTooLargeError(CorruptImageError):
    """The header claims more pixels than :data:`MAX_IMAGE_PIXELS`; nothing was decoded.

    Attributes:
        reason: the explanation without the path (the scan reports the path separately).
    """

    def __init__(self, path: Path | str, pixels: int | None, size: tuple[int, int] | None = None) -> None:
        claimed = f"{pixels} pixels" if pixels is not None else "an unknown number of pixels"
        if size is not None:
            claimed = f"{size[0]}x{size[1]} = {claimed}"
        self.reason = (
            f"image too large: header claims {claimed}, over the limit of {MAX_IMAGE_PIXELS} pixels "
            "(simpletuner.data.images.MAX_IMAGE_PIXELS); rejected before decoding"
        )
        super().__init__(f"{path}: {self.reason}")


def load_image_tensor(
    path: ImageSource, size: tuple[int, int], anchor: tuple[float, float] = (0.5, 0.5), name: str | None = None
) -> "torch.Tensor":
    """Decode ``path`` (a file, or encoded bytes called ``name``) into a float32 tensor of shape
    (3, height, width) with values in [-1, 1].

    Steps: full decode, EXIF orientation, RGB (alpha composited on white), Lanczos resize so the
    image covers ``size`` (aspect kept; small images are upscaled), then a crop to exactly
    ``size`` = (width, height) placed by ``anchor`` (see :func:`crop_at`; the default centres it).

    Raises:
        CorruptImageError: the file is truncated, corrupt, too large or not an image.
    """
    import torch

    image = decode_image(path, name)
    image = resize_to_cover(to_rgb(orient(image)), size)
    image = crop_at(image, size, anchor)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def load_conditioning_tensor(
    path: ImageSource, size: tuple[int, int], anchor: tuple[float, float], reference_size: tuple[int, int],
    mask: bool, name: str | None = None,
) -> "torch.Tensor":
    """A conditioning image cropped exactly like its paired training image: uint8 (C, height, width).

    The image is first brought to ``reference_size``, the paired image's displayed (width, height),
    then resized and cropped as :func:`load_image_tensor` treats the paired image, so the crop box
    is the same in both (for a conditioning image of the paired image's size the two are the same
    operations). A ``mask`` is single-channel and resampled bilinearly, so a hard edge stays within
    [0, 255] without the ringing Lanczos adds; other conditioning images are RGB like the image.

    Raises:
        CorruptImageError: as :func:`load_image_tensor`.
    """
    import torch

    image = to_rgb(orient(decode_image(path, name)))
    resample = Image.Resampling.BILINEAR if mask else Image.Resampling.LANCZOS
    if mask:
        image = image.convert("L")
    if image.size != tuple(reference_size):
        image = image.resize(tuple(reference_size), resample)
    image = crop_at(resize_to_cover(image, size, resample), size, anchor)
    pixels = np.asarray(image, dtype=np.uint8)
    if mask:
        return torch.from_numpy(pixels.copy()).unsqueeze(0)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _openable(source: ImageSource, name: str | None) -> tuple[object, Path | str]:
    """What ``Image.open`` takes for ``source`` (bytes are wrapped in a buffer), and its name."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), name or "<image bytes>"
    return source, name or source


@contextmanager
def open_image(path: ImageSource, name: str | None = None) -> Iterator[ImageFile.ImageFile]:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS`, with the pixel limit already checked.

    Only the header is read; the caller decides whether to ``.load()``. The scan and the decoder
    both open files through here, so they accept and refuse exactly the same files.

    Raises:
        ImageTooLargeError: the header claims more than :data:`MAX_IMAGE_PIXELS` pixels.
        Whatever PIL raises for an unreadable header (UnidentifiedImageError, OSError, ...).
    """
    source, path = _openable(path, name)
    with warnings.catch_warnings():
        # PIL warns from half our limit on; our own check below is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source, formats=_available_formats())
        except Image.DecompressionBombError as exc:  # PIL's hard limit fired inside open()
            pixels = _bomb_pixels(exc)
            if pixels is not None and pixels <= MAX_IMAGE_PIXELS:
                raise  # someone lowered PIL's global limit below ours; PIL's message says so
            raise ImageTooLargeError(path, pixels) from exc
    with image:
        check_pixel_limit(path, image.size)
        yield image


def check_pixel_limit(path: Path | str, size: tuple[int, int]) -> None:
    """Raise :class:`ImageTooLargeError` when ``size`` exceeds :data:`MAX_IMAGE_PIXELS`.

    Needed on top of PIL's guard because that one is a process-wide setting other code may raise
    or disable (``Image.MAX_IMAGE_PIXELS = None`` is a common snippet).
    """
    pixels = size[0] * size[1]
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(path, pixels, size)


def unreadable_reason(path: ImageSource, exc: BaseException) -> str:
    """A short, user-facing reason why PIL could not open or decode ``path`` (a file or bytes)."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            return "empty file (0 bytes)"
    else:
        try:
            if Path(path).stat().st_size == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
    if isinstance(exc, UnidentifiedImageError):
        formats = "/".join(IMAGE_FORMATS)
        return f"not an image (content is not {formats}, whatever the extension says)"
    return f"{type(exc).__name__}: {exc}"


def _available_formats() -> tuple[str, ...]:
    """:data:`IMAGE_FORMATS` this Pillow build can open (WebP support is optional in Pillow).

    ``Image.open`` raises KeyError for a listed format with no registered opener.
    """
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _bomb_pixels(exc: Image.DecompressionBombError) -> int | None:
    """The pixel count PIL put in its bomb error message; None if the wording ever changes."""
    match = _PIL_BOMB_PIXELS.search(str(exc))
    return int(match.group(1)) if match else None


def decode_image(path: ImageSource, name: str | None = None) -> Image.Image:
    """Open and fully decode ``path`` (``.load()``), so truncation shows up now and not later.

    For animated files this is the first frame: a freshly opened image is positioned on frame 0.
    """
    try:
        with open_image(path, name) as image:
            image.load()  # pixel data stays usable after the file is closed on exit
        return image
    except CorruptImageError:
        raise
    except _DECODE_ERRORS as exc:
        shown = _openable(path, name)[1]
        raise CorruptImageError(f"{shown}: cannot decode image: {unreadable_reason(path, exc)}") from exc


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


def resize_to_cover(image: Image.Image, size: tuple[int, int],
                    resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize (Lanczos by default) with aspect kept to the smallest size that covers ``size``."""
    target_width, target_height = size
    scale = max(target_width / image.width, target_height / image.height)
    new_size = (
        max(target_width, round(image.width * scale)),
        max(target_height, round(image.height * scale)),
    )
    if new_size == image.size:
        return image
    return image.resize(new_size, resample)


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the centre ``size`` = (width, height) region; the image must already cover it."""
    return crop_at(image, size, (0.5, 0.5))


def crop_at(image: Image.Image, size: tuple[int, int], anchor: tuple[float, float]) -> Image.Image:
    """Crop a ``size`` = (width, height) window placed by ``anchor`` = (x, y) in [0, 1].

    The anchor is the fraction of the slack (image size minus window size) left of / above the
    window: 0 takes the top/left, 0.5 centres it (as ``(slack) // 2``), 1 takes the bottom/right.
    The image must already cover ``size``.
    """
    target_width, target_height = size
    left = _offset(image.width - target_width, anchor[0])
    top = _offset(image.height - target_height, anchor[1])
    if (left, top) == (0, 0) and image.size == size:
        return image
    return image.crop((left, top, left + target_width, top + target_height))


def _offset(slack: int, fraction: float) -> int:
    """``fraction`` of ``slack`` pixels, floored and kept inside [0, slack]."""
    return min(slack, max(0, int(slack * fraction)))
