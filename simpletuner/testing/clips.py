"""Tiny procedural video clips (a coloured shape sliding across a white frame), written with PyAV.

The video counterpart of :mod:`simpletuner.testing.shapes`: every clip is drawn from its caption
("a red square moving right"), so tests and benchmarks of the video families train on data whose
content is known, without a file from anywhere. Clips are a few frames of a few dozen pixels, the
size the tiny video models encode in milliseconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from simpletuner.testing.shapes import PALETTE, SHAPES, ShapeSpec, draw_shape

#: Frames per second written into every clip's container.
CLIP_FPS = 8
DIRECTIONS = ("right", "left")


def clip_frames(spec: ShapeSpec, direction: str, frames: int, size: int, rng: random.Random) -> list[np.ndarray]:
    """``frames`` RGB frames (size x size, uint8) of the shape of ``spec`` sliding ``direction``."""
    shape = np.asarray(draw_shape(spec, size, rng).convert("RGB"))
    step = max(1, size // (2 * max(frames - 1, 1)))
    sign = 1 if direction == "right" else -1
    return [np.roll(shape, sign * step * index, axis=1) for index in range(frames)]


def write_clip(path: Path, frames: list[np.ndarray], fps: int = CLIP_FPS) -> Path:
    """Encode ``frames`` as an mp4 (h264 when FFmpeg has it, else mpeg4) with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_demo_clips(out_dir: str | Path, count: int, frames: int = 9, size: int = 32, seed: int = 0) -> list[Path]:
    """``count`` captioned clips (``clip_NNN.mp4`` + ``.txt``) in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    rng = random.Random(seed)
    colours = list(PALETTE)
    paths = []
    for index in range(count):
        spec = ShapeSpec(colours[index % len(colours)], SHAPES[(index // len(colours)) % len(SHAPES)])
        direction = DIRECTIONS[index % len(DIRECTIONS)]
        path = write_clip(out / f"clip_{index:03d}.mp4", clip_frames(spec, direction, frames, size, rng))
        path.with_suffix(".txt").write_text(f"a {spec.colour} {spec.shape} moving {direction}\n", encoding="utf-8")
        paths.append(path)
    return paths


def write_video_project(root: Path, clips: int = 4, frames: int = 9, size: int = 32, images: int = 0) -> Path:
    """``root/clips`` (demo clips), optionally ``root/stills`` (demo shape images), and
    ``root/multidatabackend.json`` naming them (clips as a video dataset of ``frames`` frames) with a
    text-embed cache; the model folder is the caller's (``root/model``)."""
    from simpletuner.testing.shapes import make_demo_dataset

    make_demo_clips(root / "clips", clips, frames=frames, size=size)
    entries = [{"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(root / "clips"),
                "caption_strategy": "textfile", "resolution": size, "resolution_type": "pixel",
                "video": {"num_frames": frames}}]
    if images:
        make_demo_dataset(root / "stills", images, size=size, seed=5)
        entries.append({"id": "stills", "type": "local", "instance_data_dir": str(root / "stills"),
                        "caption_strategy": "textfile", "resolution": size, "resolution_type": "pixel"})
    entries.append({"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text"),
                    "default": True})
    (root / "multidatabackend.json").write_text(json.dumps(entries, indent=2))
    return root
