"""Video datasets: read each file's length and size from its container, pick frames, decode clips.

A ``"dataset_type": "video"`` entry is scanned, placed, bucketed and cached like an image dataset,
with three differences, all here:

* **Scan** (:func:`read_video_info_from`): width, height, frame count and frame rate come from the
  container and stream headers through PyAV (FFmpeg's demuxers), without decoding a frame. When the
  container records no frame count (Matroska, WebM), the video packets are counted instead, still
  without decoding them. A file PyAV cannot open, with no video stream, or empty, is skipped with
  its reason.
* **Placement** (:func:`place_videos`): the frame size goes through the image rules
  (:func:`simpletuner.data.geometry.place_image`: resolution, crop, size filters); files shorter
  than ``min_frames`` or longer than ``max_frames`` are left out with their reason. The bucket is
  ``(width, height, frames)``, so a batch never mixes sizes or clip lengths.
* **Decode** (:func:`load_video_tensor`): the clip is frames ``0, k, 2k, ...`` (``k`` =
  ``frame_interval``), ``num_frames`` of them (fewer for a file shorter than a full clip, when
  ``min_frames`` lets it in). Each frame is resized and cropped exactly as an image of the same size
  would be, with the record's one crop window, so every frame of a clip shows the same region. The
  tensor is (C, F, H, W) in [-1, 1], what a video VAE encodes.

The clip always starts at the first frame: the choice is deterministic, so the latent cache stays
valid from run to run. Rotation metadata (phone videos) is not applied: the stored frame size is
trained on, in the scan and in the decode alike.

A model family trains video datasets only if it sets ``encodes_video = True`` (its ``encode_images``
then takes (B, C, F, H, W) pixels); otherwise the data path stops at start-up naming the dataset.
A video VAE that compresses time encodes only some clip lengths (``1 + 4k`` frames for Wan):
:func:`fit_clip_length` lowers a dataset's ``num_frames`` to the nearest such length (with a
warning) and :func:`place_videos` does the same for files shorter than a full clip, so every
bucket holds a length the family's VAE takes whole. Image datasets join a video family's training
as one-frame clips where the family allows it (``trains_images_as_clips``).

``av`` and torch are imported inside the functions that need them, so the CLI's validation path and
``--dry-run`` do not load FFmpeg unless a video dataset is scanned.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from simpletuner.data.config import DatasetConfigError, ImageDatasetConfig, VideoSettings
from simpletuner.data.geometry import Placement, place_image
from simpletuner.data.images import MAX_IMAGE_PIXELS, CorruptImageError, crop_at, resize_to_cover
from simpletuner.data.metadata import ImageRecord
from simpletuner.data.settings import DEFAULT_FRAMERATE

if TYPE_CHECKING:
    import torch

    from simpletuner.data.backends import Backend

#: Files a video dataset's scan looks at (lower-cased suffixes); the content decides whether they open.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")

#: Bytes fetched from the start of a remote video to read its header (one ranged GET). Enough for an
#: MP4 whose index (``moov``) comes first; otherwise, or when the frame count is not in the header,
#: the whole object is read.
VIDEO_HEADER_BYTES = 1 << 20

Size3 = tuple[int, int, int]
#: A family's clip-length rule: the longest accepted clip of at most that many frames, or None.
FrameCount = Callable[[int], "int | None"]

logger = logging.getLogger(__name__)


class CorruptVideoError(CorruptImageError):
    """A video that cannot be opened or decoded; the message names the file and the reason.

    Attributes:
        reason: the explanation without the path (the scan reports the path separately).
    """

    def __init__(self, path: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What the container headers say about a video's first video stream.

    Attributes:
        width, height: frame size in pixels, as stored (rotation metadata is not applied).
        frames: number of frames (from the header, else from counting packets); None when unknown.
        fps: frames per second; None when the file declares no rate.
    """

    width: int
    height: int
    frames: int | None
    fps: float | None


@dataclass(frozen=True)
class VideoRecord(ImageRecord):
    """An :class:`~simpletuner.data.metadata.ImageRecord` of a video file, with its length.

    Attributes:
        frames: frames in the file.
        fps: the file's frame rate (None when it declares none).
    """

    frames: int = field(default=0, compare=False)
    fps: float | None = field(default=None, compare=False)


def _openable(source: Path | str | bytes, name: str | None) -> tuple[object, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), name or "<video bytes>"
    return str(source), name or str(source)


def _is_empty(source: Path | str | bytes) -> bool:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source) == 0
    try:
        return Path(source).stat().st_size == 0
    except OSError:
        return False


def _describe(exc: BaseException) -> str:
    """FFmpeg's words for an error, without the file name it appends (the caller names the file)."""
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


def probe_video(source: Path | str | bytes, name: str | None = None, count_packets: bool = True) -> VideoInfo:
    """Size, length and rate of a video (a local file or its bytes) from the headers; no frame is decoded.

    ``count_packets=False`` leaves ``frames`` None instead of demuxing the file when the header has
    no frame count (for a remote file's first bytes, where a count would be cut short).

    Raises:
        CorruptVideoError: empty file, not a video PyAV can open, no video stream, or a frame size
            over :data:`simpletuner.data.images.MAX_IMAGE_PIXELS`.
    """
    import av

    opened, shown = _openable(source, name)
    if _is_empty(source):
        raise CorruptVideoError(shown, "cannot read video: empty file (0 bytes)")
    try:
        with av.open(opened, mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                raise CorruptVideoError(shown, "cannot read video: the file has no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = int(stream.frames or 0) or None
            if frames is None and count_packets:
                # Matroska/WebM store no frame count: one packet per frame, read without decoding.
                frames = sum(1 for packet in container.demux(stream) if packet.size)
    except CorruptVideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise CorruptVideoError(shown, f"cannot read video header: {_describe(exc)}") from exc
    if width <= 0 or height <= 0:
        raise CorruptVideoError(shown, "cannot read video: the stream declares no frame size")
    if width * height > MAX_IMAGE_PIXELS:
        raise CorruptVideoError(shown, f"video too large: frames of {width}x{height} pixels, over the limit of "
                                f"{MAX_IMAGE_PIXELS} pixels")
    return VideoInfo(width, height, frames, float(rate) if rate else None)


def read_video_info_from(backend: "Backend", key: str) -> VideoInfo:
    """:func:`probe_video` of ``key``: from its local file, or from the first :data:`VIDEO_HEADER_BYTES`
    of a remote one (the whole object when the header is not all there or has no frame count).

    Raises:
        CorruptVideoError: as :func:`probe_video`; StorageError when the storage cannot be reached.
    """
    local = backend.local_path(key)
    if local is not None:
        return probe_video(local)
    name = str(backend.locate(key))
    head = backend.read_head(key, VIDEO_HEADER_BYTES)
    if len(head) < VIDEO_HEADER_BYTES:  # the whole file
        return probe_video(head, name)
    try:
        info = probe_video(head, name, count_packets=False)
        if info.frames is not None:
            return info
    except CorruptVideoError:
        pass
    return probe_video(backend.read_bytes(key), name)


def video_record(path: Path | str, info: VideoInfo, caption: str, dataset_id: str, key: str | None,
                 captions: tuple[str, ...]) -> VideoRecord:
    """The record of a scanned video."""
    return VideoRecord(path, info.width, info.height, caption, dataset_id, key=key, captions=captions,
                       frames=int(info.frames or 0), fps=info.fps)


# --- placement -------------------------------------------------------------------------------------


def clip_frames(available: int, video: VideoSettings) -> int:
    """Frames trained from a file of ``available`` frames: ``num_frames``, or as many as fit at
    ``frame_interval`` when the file is shorter than a full clip."""
    return max(1, min(video.num_frames, (available - 1) // video.frame_interval + 1))


def length_exclusion(frames: int, video: VideoSettings) -> str | None:
    """Why ``min_frames`` / ``max_frames`` leave a file of ``frames`` frames out, or None."""
    low = video.min_frames if video.min_frames is not None else video.span
    if frames < low:
        why = "min_frames" if video.min_frames is not None else (
            f"a clip of num_frames {video.num_frames} every {video.frame_interval} frame(s); set min_frames "
            "to keep shorter files")
        return f"video too short: {frames} frames, fewer than {low} ({why})"
    if video.max_frames is not None and frames > video.max_frames:
        return f"video too long: {frames} frames, more than max_frames {video.max_frames}"
    return None


def place_videos(records: list[ImageRecord], cfg: ImageDatasetConfig, alignment: int, rounding: int | None = None,
                 frame_count: FrameCount | None = None) -> tuple[dict[ImageRecord, Placement], list[tuple[object, str]]]:
    """Placements (size ``(width, height, frames)``) of every kept video, and (path, reason) for
    every left-out one; the frame size follows the dataset's image rules.

    ``frame_count`` is the family's rule for clip lengths (``ModelFamily.accepted_frame_count``): a
    file too short for a full clip trains the longest accepted length it has, and is left out when
    it has none. Without a rule every length is taken.
    """
    video = cfg.video or VideoSettings()
    placed: dict[ImageRecord, Placement] = {}
    skipped: list[tuple[object, str]] = []
    for record in records:
        frames = getattr(record, "frames", 0)
        reason = length_exclusion(frames, video)
        result = reason or place_image(record, cfg, alignment, rounding)
        if isinstance(result, str):
            skipped.append((record.path, result))
            continue
        clip = clip_frames(frames, video)
        accepted = frame_count(clip) if frame_count is not None else clip
        if accepted is None:
            skipped.append((record.path, f"video too short: a clip of {clip} frame(s) is shorter than any clip "
                            "length the model's VAE encodes"))
            continue
        placed[record] = dataclasses.replace(result, size=(*result.size, accepted))
    return placed, skipped


def placement_function(cfg: ImageDatasetConfig, frame_count: FrameCount | None = None):
    """:func:`place_videos` (with the family's clip-length rule ``frame_count``) for video datasets,
    :func:`simpletuner.data.geometry.place_images` otherwise."""
    if cfg.dataset_type == "video":
        return functools.partial(place_videos, frame_count=frame_count)
    from simpletuner.data.geometry import place_images

    return place_images


# --- the family's clip lengths ---------------------------------------------------------------------


def frame_count_rule(model) -> FrameCount | None:
    """The family's clip-length rule (``accepted_frame_count``); None for encoders without one
    (test stand-ins), which take every length."""
    return getattr(model, "accepted_frame_count", None)


def fit_clip_length(cfg: ImageDatasetConfig, model) -> ImageDatasetConfig:
    """``cfg`` with ``num_frames`` lowered to the longest clip the family's VAE encodes whole.

    A warning names the dataset, the asked and the trained length and the lengths that work, so the
    user can set one of them and silence it.

    Raises:
        DatasetConfigError: no length up to ``num_frames`` is accepted.
    """
    rule = frame_count_rule(model)
    video = cfg.video
    if rule is None or video is None or video.num_frames is None:
        return cfg
    fitted = rule(video.num_frames)
    family = getattr(model, "family", "") or "this model"
    describe = getattr(model, "accepted_frame_counts_text", None)
    lengths = describe() if describe is not None else "the lengths it accepts"
    if fitted is None:
        raise DatasetConfigError(f"dataset {cfg.id!r}: \"num_frames\": {video.num_frames} is shorter than any clip the "
                                 f"{family} VAE encodes; set \"num_frames\" in its \"video\" object to one of {lengths}")
    if fitted != video.num_frames:
        logger.warning("dataset %s: the %s VAE encodes clips of %s frames, not %d; training clips of %d frames "
                       "(set \"num_frames\": %d in its \"video\" object to silence this)", cfg.id, family, lengths,
                       video.num_frames, fitted, fitted)
    return dataclasses.replace(cfg, video=dataclasses.replace(video, num_frames=fitted))


# --- decoding --------------------------------------------------------------------------------------


def load_video_tensor(source: Path | str | bytes, size: Size3, anchor: tuple[float, float] = (0.5, 0.5),
                      frame_interval: int = 1, name: str | None = None) -> "torch.Tensor":
    """Decode the clip of ``source`` for bucket ``size`` = (width, height, frames): float32
    (3, frames, height, width) in [-1, 1].

    Frames ``0, frame_interval, 2 * frame_interval, ...`` are kept; decoding stops after the last
    one. Each is resized (Lanczos) to cover (width, height) and cropped by ``anchor``, exactly as
    :func:`simpletuner.data.images.load_image_tensor` treats an image, so all frames share one crop box.

    Raises:
        CorruptVideoError: the file cannot be opened, or fewer frames decode than the clip needs
            (a truncated or damaged file).
    """
    import av
    import torch

    width, height, count = (int(value) for value in size)
    opened, shown = _openable(source, name)
    frames: list[np.ndarray] = []
    try:
        with av.open(opened, mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                raise CorruptVideoError(shown, "cannot decode video: the file has no video stream")
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index % frame_interval:
                    continue
                image = crop_at(resize_to_cover(frame.to_image(), (width, height)), (width, height), anchor)
                frames.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                if len(frames) == count:
                    break
    except CorruptVideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise CorruptVideoError(shown, f"cannot decode video: {_describe(exc)}") from exc
    if len(frames) < count:
        raise CorruptVideoError(
            shown, f"cannot decode video: only {len(frames)} of the {count} frames of the clip (every "
            f"{frame_interval} frame(s) from the first) could be decoded; the file is truncated or damaged")
    pixels = torch.from_numpy(np.stack(frames)).to(torch.float32) / 127.5 - 1.0  # (F, H, W, C)
    return pixels.permute(3, 0, 1, 2).contiguous()


def clip_frame_rate(record: ImageRecord, frame_interval: int, framerate: float | None = None) -> float:
    """Frames per second of the trained clip: the file's rate (else ``framerate``, else
    :data:`DEFAULT_FRAMERATE`) divided by ``frame_interval``."""
    rate = getattr(record, "fps", None) or framerate or DEFAULT_FRAMERATE
    return float(rate) / frame_interval
