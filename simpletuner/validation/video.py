"""Validation videos for the video families: sampled with the family's own diffusers pipeline, written
as mp4 files with PyAV, and shown to trackers as a grid of first frames.

A validation run of a video family (``ModelFamily.encodes_video``) makes one clip per prompt, image
index and resolution, exactly as an image family makes one image, with the same seeds (clip ``i``
uses ``seed + i``) and the same file stems; only the files differ:

* ``<W>x<H>_<stem>.mp4``: H.264 (yuv420p, so every player opens it) at ``--framerate`` frames per
  second (30 when unset), ``--validation_num_video_frames`` frames long (the pipeline's own default
  when unset); written to a temporary name and renamed, so a crash never leaves half a file;
* ``grid_<W>x<H>.png``: the first frame of every clip (beside the base model's, as for images), which
  is what TensorBoard and webhooks show;
* ``validation.json``: prompt, seed, size, frame count, steps and starting picture of every clip.

Prompts from ``--validation_dataset_file`` (FastVideo's format, :mod:`simpletuner.validation.dataset_file`)
join the other validation prompts; an entry's own steps, size, frame count and ``image_path`` apply to
its clips alone. Image-to-video pipelines (those whose call takes an ``image``) need a starting
picture for every prompt, so every prompt must then come from such a file with an ``image_path``.

PyAV, PIL and torch are imported inside the functions that use them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.data.settings import DEFAULT_FRAMERATE
from simpletuner.validation.dataset_file import ValidationEntry, load_validation_dataset

if TYPE_CHECKING:
    from simpletuner.validation.runner import ValidationSettings, Validator


#: Frames per second of validation videos when ``--framerate`` is unset: the rate the data path assumes.
DEFAULT_VIDEO_FPS = DEFAULT_FRAMERATE
#: The encoder: H.264 through FFmpeg's libx264, in the mp4 container.
VIDEO_CODEC = "libx264"
#: libx264's constant-quality setting: 18 is visually near lossless at small sizes.
VIDEO_CRF = "18"


@dataclass(frozen=True)
class VideoSettings:
    """The video half of the validation options.

    Attributes:
        num_frames: ``--validation_num_video_frames`` (or the family's default); None leaves the
            pipeline's own default.
        framerate: frames per second written into the mp4 files.
        entries: the ``--validation_dataset_file`` entries, in file order.
        first_entry: where the first entry's caption sits in ``ValidationSettings.prompts``.
    """

    num_frames: int | None = None
    framerate: int = DEFAULT_VIDEO_FPS
    entries: tuple[ValidationEntry, ...] = ()
    first_entry: int = 0

    @classmethod
    def from_config(cls, config, value, prompts: list[str], names: list[str | None]) -> "VideoSettings":
        """Read the options (``value(name)`` applies the family's defaults) and append the dataset
        file's captions to ``prompts`` / ``names`` (shortnames ``dataset_00``, ``dataset_01``, ...)."""
        entries: tuple[ValidationEntry, ...] = ()
        first = len(prompts)
        if config.validation_dataset_file:
            entries = tuple(load_validation_dataset(config.validation_dataset_file))
            for index, entry in enumerate(entries):
                prompts.append(entry.caption)
                names.append(f"dataset_{index:02d}")
        return cls(num_frames=value("validation_num_video_frames"),
                   framerate=int(value("framerate") or DEFAULT_VIDEO_FPS), entries=entries, first_entry=first)

    def entry_for(self, prompt_index: int) -> ValidationEntry | None:
        """The dataset-file entry behind prompt ``prompt_index``, or None for the other prompts."""
        offset = prompt_index - self.first_entry
        return self.entries[offset] if 0 <= offset < len(self.entries) else None


@dataclass(frozen=True)
class VideoRequest:
    """One clip to sample."""

    stem: str
    prompt: str
    seed: int
    size: tuple[int, int]
    num_frames: int | None
    num_inference_steps: int
    image: Path | None = None

    @property
    def tag(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


def video_requests(settings: "ValidationSettings", stems: list[str], seed: int) -> list[VideoRequest]:
    """Every clip of one validation run: prompt x image index (``stems``, as the image path names
    them) x resolution, or the entry's own size for a dataset-file prompt that gives one."""
    video = settings.video or VideoSettings()
    requests = []
    for index, stem in enumerate(stems):
        prompt_index = index // settings.num_images
        entry = video.entry_for(prompt_index)
        sizes = [entry.size] if entry is not None and entry.size else settings.resolutions
        for size in sizes:
            requests.append(VideoRequest(
                stem=stem, prompt=settings.prompts[prompt_index], seed=seed + index, size=size,
                num_frames=(entry.num_frames if entry else None) or video.num_frames,
                num_inference_steps=(entry.num_inference_steps if entry else None) or settings.num_inference_steps,
                image=entry.image_path if entry else None,
            ))
    return requests


def check_requests(requests: list[VideoRequest], model, pipeline) -> None:
    """Refuse, before anything is sampled, clip lengths the family's VAE cannot decode whole and a
    mismatch between the pipeline and the starting pictures (needed by image-to-video, meaningless
    for text-to-video)."""
    for frames in sorted({r.num_frames for r in requests if r.num_frames is not None}):
        if model.accepted_frame_count(frames) != frames:
            raise ValueError(f"validation clips of {frames} frames: the {model.family} VAE decodes clips of "
                             f"{model.accepted_frame_counts_text()} frames; set --validation_num_video_frames (or the "
                             "entry's num_frames) to one of those")
    takes_image = pipeline_takes_image(pipeline)
    if takes_image:
        missing = [r.prompt for r in requests if r.image is None]
        if missing:
            raise ValueError(f"the {model.family} validation pipeline ({type(pipeline).__name__}) generates "
                             f"image-to-video and needs a starting picture for every prompt, but {missing[0]!r} has "
                             "none; list the prompts in --validation_dataset_file with an image_path each")
    else:
        pictured = [r.prompt for r in requests if r.image is not None]
        if pictured:
            raise ValueError(f"--validation_dataset_file gives {pictured[0]!r} an image_path, but the {model.family} "
                             f"validation pipeline ({type(pipeline).__name__}) generates from text only; remove "
                             "image_path or train an image-to-video flavour")


def pipeline_takes_image(pipeline) -> bool:
    """Whether the pipeline's call has an ``image`` argument (diffusers' image-to-video pipelines)."""
    return "image" in inspect.signature(pipeline.__call__).parameters


def generate_video(pipeline, request: VideoRequest, settings: "ValidationSettings", device,
                   extra_arguments: dict | None = None) -> list:
    """One clip as a list of RGB PIL frames, from its own seeded generator (never the global RNG)."""
    import torch

    from simpletuner.validation.runner import generator_device

    arguments: dict[str, Any] = dict(
        prompt=request.prompt, negative_prompt=settings.negative_prompt,
        num_inference_steps=request.num_inference_steps, guidance_scale=settings.guidance,
        width=request.size[0], height=request.size[1], output_type="np",
        generator=torch.Generator(device=generator_device(settings, device)).manual_seed(request.seed),
        **(extra_arguments or {}),
    )
    if request.num_frames is not None:
        arguments["num_frames"] = request.num_frames
    if request.image is not None:
        from PIL import Image

        with Image.open(request.image) as picture:
            arguments["image"] = picture.convert("RGB")
    return video_frames(pipeline(**arguments).frames[0])


def video_frames(video) -> list:
    """A pipeline's clip (an array or tensor [F, H, W, C] in [0, 1] or uint8, or a list of PIL
    images) as RGB PIL frames."""
    import numpy as np
    from PIL import Image

    if isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        return [frame.convert("RGB") for frame in video]
    array = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if array.ndim != 4:
        raise ValueError(f"a validation clip should be frames x height x width x channels; got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(frame).convert("RGB") for frame in array]


def write_mp4(frames: list, path: Path, fps: int) -> Path:
    """Encode RGB PIL frames (all one size) as an H.264 mp4 at ``fps``; written to a temporary name
    and renamed into place. Even sizes use yuv420p, which every player decodes; odd ones yuv444p."""
    import av
    import numpy as np

    if not frames:
        raise ValueError(f"no frames to write to {path}")
    width, height = frames[0].size
    if any(frame.size != (width, height) for frame in frames):
        raise ValueError(f"the frames of {path.name} differ in size")
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), mode="w", format="mp4") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=int(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        stream.options = {"crf": VIDEO_CRF}
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    partial.replace(path)
    return path


def sample_videos(validator: "Validator", pipeline, model, folder: Path, stems: list[str], seed: int, step: int,
                  arguments: dict, label: str | None = None, caption: str | None = None,
                  tracker_key: str = "validation") -> dict[tuple[int, int], list]:
    """The video branch of :meth:`Validator.run`: sample every clip, write the mp4 files, the
    first-frame grid per size (logged to the tracker) and ``validation.json``. Returns the clips by
    size, as lists of frames (the benchmark keeps them for the side-by-side grids)."""
    settings = validator.settings
    requests = video_requests(settings, stems, seed)
    check_requests(requests, model, pipeline)
    fps = (settings.video or VideoSettings()).framerate
    results: dict[tuple[int, int], list] = {}
    record: dict[str, dict] = {}
    for request in requests:
        frames = generate_video(pipeline, request, settings, validator.device, extra_arguments=arguments)
        clip = write_mp4(frames, folder / f"{request.tag}_{request.stem}.mp4", fps)
        validator.tracker.log_video(f"{tracker_key}/{request.tag}/{request.stem}", clip, step)  # wandb / comet play it
        results.setdefault(request.size, []).append(frames)
        record[f"{request.tag}_{request.stem}"] = {
            "prompt": request.prompt, "seed": request.seed, "width": request.size[0], "height": request.size[1],
            "num_frames": len(frames), "num_inference_steps": request.num_inference_steps,
            "image": None if request.image is None else str(request.image),
        }
    for size, clips in results.items():
        write_first_frame_grid(validator, folder, size, clips, step, label, caption, tracker_key)
    write_video_record(folder, settings, step, seed, fps, record)
    return results


def write_first_frame_grid(validator: "Validator", folder: Path, size: tuple[int, int], clips: list, step: int,
                           label: str | None = None, caption: str | None = None,
                           tracker_key: str = "validation") -> None:
    """``grid_<W>x<H>.png``: each clip's first frame, the base model's to its left after step 0, captioned
    as the image grids are, and logged to the tracker under ``validation/<W>x<H>``."""
    from simpletuner.validation.runner import (BASE_MODEL_CAPTION, caption_grid, make_grid, panel_caption, save_grid,
                                               stitch_left)

    tag = f"{size[0]}x{size[1]}"
    base = validator.benchmark.get(size)
    compared = bool(base) and step > 0 and len(base) == len(clips)
    shown = [stitch_left(base[index][0], frames[0]) if compared else frames[0] for index, frames in enumerate(clips)]
    grid = make_grid(shown, columns=min(len(shown), 4))
    caption = caption or panel_caption(step, label)
    grid = caption_grid(grid, shown[0].width, shown[0].height, [BASE_MODEL_CAPTION, caption] if compared else [caption])
    save_grid(grid, folder / f"grid_{tag}.png")
    validator.tracker.log_image(f"{tracker_key}/{tag}", grid, step)


def write_video_record(folder: Path, settings: "ValidationSettings", step: int, seed: int, fps: int,
                       videos: dict[str, dict]) -> None:
    """``validation.json``: enough to reproduce any clip (prompt, seed, size, frames, steps, picture)."""
    import json

    record = {"step": step, "seed": seed, "seed_source": settings.seed_source or "cpu",
              "randomized": settings.randomize, "framerate": fps, "videos": videos}
    (folder / "validation.json").write_text(json.dumps(record, indent=2))
