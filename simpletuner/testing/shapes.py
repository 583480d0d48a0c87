"""A procedural dataset of coloured shapes, and a scorer that checks images against their prompts.

Because every image is drawn from its caption ("a red circle on a white background"), a test or the
demo can ask a trained model for a colour and a shape and *measure* whether it delivered, instead of
eyeballing samples. Only PIL and numpy are used so that building the dataset needs no torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Colours far apart in RGB so that a decoded (slightly blurred, slightly shifted) image is still
#: unambiguous. Name -> RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "cyan": (20, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND_NAME = "white"
BACKGROUND_RGB = (255, 255, 255)

#: Fraction of a shape's bounding box that the shape fills; used to tell shapes apart when scoring.
_FILL_RATIO = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; its caption is derived from it, never stored separately."""

    colour: str
    shape: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {BACKGROUND_NAME} background"


def all_specs() -> list[ShapeSpec]:
    """Every colour x shape combination, in a fixed order."""
    return [ShapeSpec(c, s) for c in PALETTE for s in SHAPES]


def parse_caption(caption: str) -> ShapeSpec:
    """Recover the colour and shape named in a caption (first palette word and shape word found)."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise ValueError(f"caption {caption!r} names no palette colour and shape")
    return ShapeSpec(colour, shape)


def draw_shape(spec: ShapeSpec, size: int, rng: random.Random) -> Image.Image:
    """Draw one shape of random size and position on the background.

    The shape spans 45-75% of the image so that it survives the VAE's 4x or 8x downsampling.
    """
    image = Image.new("RGB", (size, size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    extent = int(size * rng.uniform(0.45, 0.75))
    left = rng.randint(1, size - extent - 1)
    top = rng.randint(1, size - extent - 1)
    box = (left, top, left + extent, top + extent)
    fill = PALETTE[spec.colour]
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return image


def make_demo_dataset(out_dir: str | Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``count`` PNG images with a caption ``.txt`` beside each; returns the image paths.

    Colours and shapes are balanced (cycled through every combination, then shuffled) so that
    every colour is equally frequent, which keeps "chance" at exactly 1/len(PALETTE).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = [all_specs()[i % len(all_specs())] for i in range(count)]
    rng.shuffle(specs)
    paths = []
    for index, spec in enumerate(specs):
        image = draw_shape(spec, size, rng)
        stem = f"{index:05d}_{spec.colour}_{spec.shape}"
        image.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(spec.caption + "\n", encoding="utf-8")
        paths.append(out / f"{stem}.png")
    return paths


@dataclass(frozen=True)
class ShapeReading:
    """What the scorer saw in one image."""

    colour: str | None
    shape: str | None
    foreground_fraction: float


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.max() <= 1.0:
        array = array * 255.0
    return array


def read_image(image: Image.Image | np.ndarray, threshold: float = 80.0) -> ShapeReading:
    """Find the foreground (pixels far from the background colour) and name its colour and shape.

    Colour: the palette entry nearest to most foreground pixels (a vote, robust to soft edges).
    Shape: the palette of fill ratios of the foreground inside its bounding box.
    """
    pixels = _as_array(image)
    distance = np.linalg.norm(pixels - np.asarray(BACKGROUND_RGB, dtype=np.float32), axis=-1)
    mask = distance > threshold
    fraction = float(mask.mean())
    if mask.sum() < 4:
        return ShapeReading(None, None, fraction)
    names = list(PALETTE)
    palette = np.asarray([PALETTE[n] for n in names], dtype=np.float32)
    foreground = pixels[mask]
    nearest = np.argmin(np.linalg.norm(foreground[:, None, :] - palette[None], axis=-1), axis=1)
    colour = names[int(np.bincount(nearest, minlength=len(names)).argmax())]
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    shape = min(_FILL_RATIO, key=lambda name: abs(_FILL_RATIO[name] - fill))
    return ShapeReading(colour, shape, fraction)


@dataclass(frozen=True)
class PromptMatch:
    """Fractions of images whose colour / shape match what their prompt asked for."""

    colour: float
    shape: float
    count: int


def score_samples(images: Sequence[Image.Image | np.ndarray], prompts: Iterable[str]) -> PromptMatch:
    """Score generated images against the prompts that produced them.

    Chance level is 1/6 for colour (six balanced colours) and 1/3 for shape.
    """
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("no images to score")
    colour_hits = shape_hits = 0
    for image, prompt in zip(images, prompts):
        wanted = parse_caption(prompt)
        seen = read_image(image)
        colour_hits += seen.colour == wanted.colour
        shape_hits += seen.shape == wanted.shape
    return PromptMatch(colour_hits / len(images), shape_hits / len(images), len(images))
