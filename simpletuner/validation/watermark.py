"""``--enable_watermark``: an invisible watermark in every validation image.

Samples shared from a fine-tune travel without their context; a watermark lets a detector tell later
that an image was machine-made. We stamp the 48-bit message the SDXL reference code uses (diffusers
keeps it as ``WATERMARK_BITS``), with invisible-watermark's DWT-DCT encoder, so existing detectors for
SDXL output recognise ours too. The encoder needs at least 256 x 256 pixels of area; smaller images
are written unmarked and the log says so.

The pipelines' own watermarkers (SDXL builds one whenever the package is installed) are switched off
where the pipelines are built, so this module is the one place a watermark comes from and
``--enable_watermark false`` really means none.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: invisible-watermark's DWT-DCT method refuses images with fewer pixels than this
MINIMUM_AREA = 256 * 256
#: the ``pip install`` extra that brings invisible-watermark (module ``imwatermark``)
EXTRA = "simpletuner[watermark]"


def watermark_available() -> bool:
    """Whether invisible-watermark is importable (checked without importing it: it pulls OpenCV)."""
    import importlib.util

    return importlib.util.find_spec("imwatermark") is not None


def watermark_bits() -> list[int]:
    """The 48 message bits, as diffusers' SDXL watermarker holds them."""
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS

    return list(WATERMARK_BITS)


class Watermarker:
    """Stamps PIL images; one encoder is reused for a whole validation run."""

    def __init__(self) -> None:
        from imwatermark import WatermarkEncoder

        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bits", watermark_bits())
        self.skipped_sizes: set[tuple[int, int]] = set()

    def apply(self, images: list[Any]) -> list[Any]:
        """``images`` with the watermark embedded; too-small images come back unchanged (logged once
        per size)."""
        return [self._stamp(image) for image in images]

    def _stamp(self, image):
        import numpy as np
        from PIL import Image

        if image.width * image.height < MINIMUM_AREA:
            if image.size not in self.skipped_sizes:
                self.skipped_sizes.add(image.size)
                logger.warning("--enable_watermark: %dx%d images are below the watermark's minimum of 256x256 "
                               "pixels of area and are written without one", image.width, image.height)
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        marked = self.encoder.encode(bgr, "dwtDct")
        return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def read_watermark(image) -> list[int]:
    """The 48 bits decoded from ``image`` (for tests and for users checking a sample)."""
    import numpy as np
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [int(bit) for bit in WatermarkDecoder("bits", 48).decode(bgr, "dwtDct")]


def without_builtin_watermark(pipeline):
    """``pipeline`` with a diffusers-side watermarker (SDXL's ``watermark`` attribute) turned off: the
    choice is ``--enable_watermark``'s alone, applied by :class:`Watermarker` after sampling."""
    if getattr(pipeline, "watermark", None) is not None:
        pipeline.watermark = None
    return pipeline
