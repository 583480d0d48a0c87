"""The latent cache of a video dataset: a :class:`~simpletuner.data.cache.vae.VaeCache` of clips.

Everything but the pixels is the image cache's: content hashes, atomic verified entries, on-demand
and disabled modes, ``recreate``/``sync``. Two things differ:

* the pixels of one entry are a clip, (C, F, H, W) in [-1, 1] (:func:`simpletuner.data.video.load_video_tensor`),
  and a chunk handed to the family's ``encode_images`` is (B, C, F, H, W);
* the fingerprint also holds the frame selection (``frame_interval`` and the first frame), since
  the bucket size ``(width, height, frames)`` does not say which frames were taken.
"""

from __future__ import annotations

from pathlib import Path

import torch

from simpletuner.data.cache.store import fingerprint
from simpletuner.data.cache.vae import Size, VaeCache
from simpletuner.data.metadata import ImageRecord
from simpletuner.data.video import clip_frame_rate, load_video_tensor

#: The first frame of every clip (see :mod:`simpletuner.data.video`); part of the fingerprint so a
#: different choice later never reuses these entries.
FIRST_FRAME = 0


class VideoVaeCache(VaeCache):
    """Latents of one video dataset's clips; ``frame_interval`` says which frames a clip takes and
    ``framerate`` the rate assumed for files that declare none (``--framerate``)."""

    def __init__(self, *args, frame_interval: int = 1, framerate: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be at least 1, got {frame_interval}")
        self.frame_interval = frame_interval
        self.framerate = framerate

    def clip_frame_rate(self, record: ImageRecord) -> float:
        """Frames per second of ``record``'s clip (its file's rate divided by ``frame_interval``)."""
        return clip_frame_rate(record, self.frame_interval, self.framerate)

    def _fingerprint(self, record: ImageRecord, size: Size, model_parts: dict | None = None,
                     anchor: tuple[float, float] | None = None, crop: bool | None = None) -> str:
        return fingerprint(kind="vae_video_latents", content_sha256=self._content[record.path], size=list(size),
                           frame_interval=self.frame_interval, first_frame=FIRST_FRAME,
                           crop=self.crop if crop is None else crop,
                           anchor=list(anchor if anchor is not None else self._anchor(record)),
                           model=model_parts if model_parts is not None else self._model_parts)

    def _load_pixels(self, source: Path | bytes, size: Size, record: ImageRecord) -> torch.Tensor:
        return load_video_tensor(source, size, anchor=self._anchor(record), frame_interval=self.frame_interval,
                                 name=str(record.path))
