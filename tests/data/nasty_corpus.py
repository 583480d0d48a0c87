"""A corpus of awkward image and caption files, generated on the fly, with what the loader must do.

Every case is a small function that writes one image (and its caption ``.txt``, or deliberately
none) into a folder and returns an :class:`Expectation`. Files are generated with PIL and numpy, or
byte by byte where PIL cannot write them (16-bit RGB/RGBA/LA PNGs, a PNG whose header claims
40000x40000 pixels), so nothing binary is checked in and every case says how it was made.

Pixel expectations are in the displayed image (after EXIF orientation), as (x, y) -> (r, g, b),
sampled away from colour edges so that JPEG's blocks and chroma subsampling stay within tolerance.
"""

from __future__ import annotations

import codecs
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, features

from simpletuner.data.images import MAX_IMAGE_PIXELS

Outcome = Literal["used", "skipped", "decode_error"]
Pixel = tuple[tuple[int, int], tuple[int, int, int]]

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
BOMB_SIDE = 40_000


@dataclass(frozen=True)
class Expectation:
    """What must happen to one corpus image.

    Attributes:
        outcome: ``used`` (scanned and decoded), ``skipped`` (left out by the scan), or
            ``decode_error`` (the header scans fine, ``load_image_tensor`` raises CorruptImageError).
        why: the situation the case stands for, for failure messages.
        size: displayed (width, height) the scan must report (after EXIF orientation).
        caption: the caption the scan must attach.
        mode: the PIL mode the file opens in, when it is the point of the case (checks the corpus).
        pixels: expected colours in the decoded image at its scanned size.
        tolerance: allowed absolute difference per channel (0 for lossless files).
        reason: substrings the skip reason (or the decode error) must contain.
        caption_warning: the caption file is not UTF-8; one warning must name it.
    """

    outcome: Outcome
    why: str
    size: tuple[int, int] | None = None
    caption: str | None = None
    mode: str | None = None
    pixels: tuple[Pixel, ...] = ()
    tolerance: int = 0
    reason: tuple[str, ...] = ()
    caption_warning: bool = False


def webp_supported() -> bool:
    """Whether this Pillow can read and write WebP (an optional part of Pillow builds)."""
    return bool(features.check("webp"))


def build_nasty_corpus(folder: Path) -> dict[str, Expectation]:
    """Write every case into ``folder`` (created if needed); return {image file name: expectation}.

    The WebP case is left out when this Pillow has no WebP support.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: make(folder / name) for name, make in _cases().items()}


def case_names() -> list[str]:
    """Every image file name :func:`build_nasty_corpus` writes (for test parametrization)."""
    return sorted(_cases())


def _cases() -> dict[str, Callable[[Path], Expectation]]:
    """Case builders by image file name."""
    cases: dict[str, Callable[[Path], Expectation]] = {
        "truncated_png.png": _truncated_png,
        "truncated_jpeg.jpg": _truncated_jpeg,
        "zero_byte.png": _zero_byte,
        "png_named.jpg": _png_named_jpg,
        "jpeg_named.png": _jpeg_named_png,
        "text_named.png": _text_named_png,
        "cmyk.jpg": _cmyk_jpeg,
        "grey16.png": _grey16_png,
        "rgb16.png": _rgb16_png,
        "rgba16.png": _rgba16_png,
        "la16.png": _la16_png,
        "palette_transparent.png": _palette_transparent_png,
        "palette_alpha_bytes.png": _palette_alpha_bytes_png,
        "la.png": _la_png,
        "rgba.png": _rgba_png,
        "exif_rot6.jpg": lambda path: _exif_jpeg(path, 6),
        "exif_rot8.jpg": lambda path: _exif_jpeg(path, 8),
        "exif_rot3.jpg": lambda path: _exif_jpeg(path, 3),
        "animated.gif": _animated_gif,
        "bomb.png": _bomb_png,
        "latin1_caption.png": _latin1_caption,
        "cp1252_caption.png": _cp1252_caption,
        "utf8_bom_caption.png": _utf8_bom_caption,
        "utf16_caption.png": _utf16_caption,
        "empty_caption.png": _empty_caption,
        "zero_byte_caption.png": _zero_byte_caption,
        "missing_caption.png": _missing_caption,
    }
    if webp_supported():
        cases["image.webp"] = _webp
    return cases


# --- writers -------------------------------------------------------------------------------------


def _caption(image_path: Path, text: str | bytes) -> None:
    """Write the sidecar ``<stem>.txt``; bytes are written as given (for encoding cases)."""
    sidecar = image_path.with_suffix(".txt")
    if isinstance(text, bytes):
        sidecar.write_bytes(text)
    else:
        sidecar.write_text(text, encoding="utf-8")


def _halves(mode: str, size: tuple[int, int], left: float | tuple[int, ...], right: float | tuple[int, ...]) -> Image.Image:
    """An image whose left half is ``left`` and right half ``right`` (flat colours sample exactly)."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _noisy_rgb(size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels: compression cannot shrink them, so a cut file really lacks pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand: signature, IHDR, one IDAT and IEND, with valid CRCs.

    ``rows`` are raw scanlines without the filter byte (filter 0 is prepended). Used for what PIL
    cannot write: 16-bit colour PNGs, and a header claiming more rows than the data holds.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _sixteen_bit_halves(path: Path, colour_type: int, left: tuple[int, ...], right: tuple[int, ...]) -> None:
    """An 8x4 16-bit PNG (big-endian samples) with flat left and right halves."""
    width, height = 8, 4
    pack = ">" + "H" * len(left)
    row = struct.pack(pack, *left) * (width // 2) + struct.pack(pack, *right) * (width // 2)
    path.write_bytes(png_bytes(width, height, 16, colour_type, [row] * height))


# --- cases ---------------------------------------------------------------------------------------


def _truncated_png(path: Path) -> Expectation:
    _noisy_rgb((64, 64), seed=1).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _caption(path, "a truncated png")
    return Expectation("decode_error", "PNG cut in half: header fine, pixel data missing",
                       size=(64, 64), caption="a truncated png", reason=(path.name, "cannot decode image"))


def _truncated_jpeg(path: Path) -> Expectation:
    _noisy_rgb((64, 64), seed=2).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _caption(path, "a truncated jpeg")
    return Expectation("decode_error", "JPEG cut in half: header fine, scan data missing",
                       size=(64, 64), caption="a truncated jpeg", reason=(path.name, "truncated"))


def _zero_byte(path: Path) -> Expectation:
    path.write_bytes(b"")
    _caption(path, "nothing here")
    return Expectation("skipped", "zero-byte file", reason=("empty file",))


def _png_named_jpg(path: Path) -> Expectation:
    _halves("RGB", (24, 16), RED, BLUE).save(path, format="PNG")
    _caption(path, "a png named jpg")
    return Expectation("used", "PNG content behind a .jpg suffix: PIL sniffs the content",
                       size=(24, 16), caption="a png named jpg", pixels=(((4, 8), RED), ((20, 8), BLUE)))


def _jpeg_named_png(path: Path) -> Expectation:
    _halves("RGB", (32, 16), RED, BLUE).save(path, format="JPEG", quality=95)
    _caption(path, "a jpeg named png")
    return Expectation("used", "JPEG content behind a .png suffix", size=(32, 16), caption="a jpeg named png",
                       pixels=(((4, 8), RED), ((28, 8), BLUE)), tolerance=12)


def _text_named_png(path: Path) -> Expectation:
    path.write_text("this is a caption, not a picture\n", encoding="utf-8")
    _caption(path, "a text file")
    return Expectation("skipped", "text file with a .png suffix", reason=("not an image",))


def _cmyk_jpeg(path: Path) -> Expectation:
    # CMYK red is (0, 255, 255, 0), cyan (255, 0, 0, 0); libjpeg stores them Adobe-inverted.
    _halves("CMYK", (32, 32), (0, 255, 255, 0), (255, 0, 0, 0)).save(path, quality=95)
    _caption(path, "a cmyk jpeg")
    return Expectation("used", "CMYK JPEG (print workflows)", size=(32, 32), caption="a cmyk jpeg", mode="CMYK",
                       pixels=(((6, 16), RED), ((26, 16), (0, 255, 255))), tolerance=12)


def _grey16_png(path: Path) -> Expectation:
    # 0x4000 / 257 = 63.75; PIL's plain convert would clip it to 255.
    _halves("I;16", (8, 4), 0x4000, 0xFFFF).save(path)
    _caption(path, "a 16-bit grey png")
    return Expectation("used", "16-bit greyscale PNG: scaled to 8 bits, not clipped to white", size=(8, 4),
                       caption="a 16-bit grey png", mode="I;16",
                       pixels=(((1, 1), (64, 64, 64)), ((6, 1), WHITE)))


def _rgb16_png(path: Path) -> Expectation:
    # PIL has no 16-bit RGB image mode to save from, so the file is written by hand.
    _sixteen_bit_halves(path, 2, (0x8080, 0x4040, 0xC0C0), (0x1234, 0xFFFF, 0x0000))
    _caption(path, "a 16-bit rgb png")
    return Expectation("used", "16-bit RGB PNG (hand-written: PIL cannot save one)", size=(8, 4),
                       caption="a 16-bit rgb png", pixels=(((1, 1), (128, 64, 192)), ((6, 1), (18, 255, 0))),
                       tolerance=1)


def _rgba16_png(path: Path) -> Expectation:
    _sixteen_bit_halves(path, 6, (0x2000, 0x4000, 0x6000, 0xFFFF), (0x0000, 0x0000, 0x0000, 0x0000))
    _caption(path, "a 16-bit rgba png")
    return Expectation("used", "16-bit RGBA PNG: transparent half becomes white", size=(8, 4),
                       caption="a 16-bit rgba png", pixels=(((1, 1), (32, 64, 96)), ((6, 1), WHITE)), tolerance=1)


def _la16_png(path: Path) -> Expectation:
    _sixteen_bit_halves(path, 4, (0x8080, 0xFFFF), (0x0000, 0x0000))
    _caption(path, "a 16-bit grey alpha png")
    return Expectation("used", "16-bit grey + alpha PNG", size=(8, 4), caption="a 16-bit grey alpha png",
                       pixels=(((1, 1), (128, 128, 128)), ((6, 1), WHITE)), tolerance=1)


def _palette_transparent_png(path: Path) -> Expectation:
    image = _halves("P", (8, 4), 0, 1)
    image.putpalette([*RED, *BLUE] + [0] * (3 * 254))
    image.save(path, transparency=1)  # palette entry 1 (blue) is fully transparent
    _caption(path, "a palette png with transparency")
    return Expectation("used", "palette PNG with a transparent index (tRNS)", size=(8, 4), mode="P",
                       caption="a palette png with transparency", pixels=(((1, 1), RED), ((6, 1), WHITE)))


def _palette_alpha_bytes_png(path: Path) -> Expectation:
    image = _halves("P", (8, 4), 0, 1)
    image.putpalette([*RED, *GREEN] + [0] * (3 * 254))
    image.save(path, transparency=bytes([255, 128]))  # green at alpha 128 over white
    _caption(path, "a palette png with partial alpha")
    return Expectation("used", "palette PNG with per-entry alpha", size=(8, 4), mode="P",
                       caption="a palette png with partial alpha",
                       pixels=(((1, 1), RED), ((6, 1), (127, 255, 127))), tolerance=1)


def _la_png(path: Path) -> Expectation:
    _halves("LA", (8, 4), (50, 255), (50, 0)).save(path)
    _caption(path, "a grey alpha png")
    return Expectation("used", "8-bit grey + alpha PNG", size=(8, 4), caption="a grey alpha png", mode="LA",
                       pixels=(((1, 1), (50, 50, 50)), ((6, 1), WHITE)))


def _rgba_png(path: Path) -> Expectation:
    _halves("RGBA", (8, 4), (*BLUE, 255), (*RED, 0)).save(path)
    _caption(path, "an rgba png")
    return Expectation("used", "RGBA PNG with a transparent half", size=(8, 4), caption="an rgba png", mode="RGBA",
                       pixels=(((1, 1), BLUE), ((6, 1), WHITE)))


def _exif_jpeg(path: Path, orientation: int) -> Expectation:
    """Stored 48x24, red left half and blue right half, displayed per the EXIF orientation tag.

    6 turns it clockwise (red on top), 8 counter-clockwise (red at the bottom), 3 upside down
    (red on the right, no size swap).
    """
    exif = Image.Exif()
    exif[0x0112] = orientation
    _halves("RGB", (48, 24), RED, BLUE).save(path, exif=exif.tobytes(), quality=95)
    _caption(path, f"an exif orientation {orientation} jpeg")
    displayed = {
        6: ((24, 48), (((12, 6), RED), ((12, 42), BLUE))),
        8: ((24, 48), (((12, 6), BLUE), ((12, 42), RED))),
        3: ((48, 24), (((6, 12), BLUE), ((42, 12), RED))),
    }
    size, pixels = displayed[orientation]
    return Expectation("used", f"JPEG with EXIF orientation {orientation}", size=size,
                       caption=f"an exif orientation {orientation} jpeg", pixels=pixels, tolerance=12)


def _animated_gif(path: Path) -> Expectation:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    _caption(path, "an animated gif")
    return Expectation("used", "animated GIF: the first frame is used", size=(16, 16), caption="an animated gif",
                       pixels=(((2, 2), RED), ((13, 13), RED)))


def _webp(path: Path) -> Expectation:
    _halves("RGB", (16, 8), RED, BLUE).save(path, lossless=True)
    _caption(path, "a webp")
    return Expectation("used", "lossless WebP", size=(16, 8), caption="a webp", pixels=(((2, 4), RED), ((13, 4), BLUE)))


def _bomb_png(path: Path) -> Expectation:
    """IHDR claims 40000x40000 RGB (4.8 GB decoded); the file holds one compressed row (~200 bytes)."""
    path.write_bytes(png_bytes(BOMB_SIDE, BOMB_SIDE, 8, 2, [bytes(3 * BOMB_SIDE)]))
    _caption(path, "a decompression bomb")
    return Expectation("skipped", "header claims 40000x40000 pixels: rejected before decode",
                       reason=("image too large", str(BOMB_SIDE * BOMB_SIDE), str(MAX_IMAGE_PIXELS)))


def _caption_case(path: Path, data: bytes, caption: str, why: str, warning: bool) -> Expectation:
    """A small good PNG whose caption file holds ``data`` exactly."""
    Image.new("RGB", (8, 8), GREEN).save(path)
    _caption(path, data)
    return Expectation("used", why, size=(8, 8), caption=caption, pixels=(((4, 4), GREEN),), caption_warning=warning)


def _latin1_caption(path: Path) -> Expectation:
    return _caption_case(path, "café crème".encode("latin-1"), "café crème",
                         "Latin-1 caption (not UTF-8): decoded via the cp1252 fallback", warning=True)


def _cp1252_caption(path: Path) -> Expectation:
    return _caption_case(path, "“quoted” caption".encode("cp1252"), "“quoted” caption",
                         "Windows-1252 caption with curly quotes", warning=True)


def _utf8_bom_caption(path: Path) -> Expectation:
    return _caption_case(path, codecs.BOM_UTF8 + "naïve café".encode(), "naïve café",
                         "UTF-8 caption with a BOM (Notepad)", warning=False)


def _utf16_caption(path: Path) -> Expectation:
    return _caption_case(path, "a utf-16 caption ✓".encode("utf-16"), "a utf-16 caption ✓",
                         "UTF-16 caption with a BOM", warning=False)


def _empty_caption(path: Path) -> Expectation:
    Image.new("RGB", (8, 8), GREEN).save(path)
    _caption(path, "  \n\n")
    return Expectation("skipped", "caption file with only whitespace", reason=("empty caption",))


def _zero_byte_caption(path: Path) -> Expectation:
    Image.new("RGB", (8, 8), GREEN).save(path)
    _caption(path, b"")
    return Expectation("skipped", "zero-byte caption file", reason=("empty caption", str(path.with_suffix(".txt"))))


def _missing_caption(path: Path) -> Expectation:
    Image.new("RGB", (8, 8), GREEN).save(path)
    return Expectation("skipped", "no caption file", reason=(str(path.with_suffix(".txt")), "not found"))
