"""Compare two adapters, or one adapter against its base, on the same prompts and seeds.

``simpletuner compare-lora`` renders every prompt x seed once per side with identical sampler
settings and generator seeds, so any difference between the two images comes from the adapters alone.
Per image pair it reports PSNR (how close the pixels are; infinite for identical images) and SSIM
(how close the local structure is; 1.0 for identical images), and writes a side-by-side grid (one
row per prompt and seed, side A on the left) plus the scores as JSON.

The adapters are folded in with merge-lora's loaders (:mod:`simpletuner.tools.lora_merge`), so any
file merge-lora accepts (diffusers / kohya / ComfyUI layouts, LyCORIS) compares. The sides are
rendered one after the other, so only one pipeline is in memory at a time. torch and diffusers are
imported inside the functions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

#: SSIM's usual constants (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
GRID_FILE, SCORES_FILE = "compare_grid.png", "compare_scores.json"


class CompareError(ValueError):
    """The comparison cannot run as asked (missing input, existing output, bad settings)."""


@dataclass(frozen=True)
class PairScore:
    """One prompt and seed rendered on both sides."""

    prompt: str
    seed: int
    psnr: float
    ssim: float


@dataclass(frozen=True)
class CompareReport:
    side_a: str
    side_b: str
    scores: tuple[PairScore, ...]
    grid: Path
    scores_file: Path

    def describe(self) -> str:
        lines = [f"A: {self.side_a}", f"B: {self.side_b}", f"{'PSNR dB':>8}  {'SSIM':>6}  seed  prompt"]
        for score in self.scores:
            psnr = "inf" if math.isinf(score.psnr) else f"{score.psnr:.2f}"
            lines.append(f"{psnr:>8}  {score.ssim:6.4f}  {score.seed:>4}  {score.prompt}")
        lines.append(f"grid: {self.grid}")
        lines.append(f"scores: {self.scores_file}")
        return "\n".join(lines)


# --- the measures ------------------------------------------------------------------------------------------


def psnr(first, second) -> float:
    """Peak signal-to-noise ratio of two same-sized 8-bit images, in dB (inf when identical)."""
    import numpy as np

    a, b = _as_array(first), _as_array(second)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(first, second) -> float:
    """Mean structural similarity of two same-sized 8-bit RGB images, per channel then averaged.

    Local means, variances and covariance come from a Gaussian window (reflect-padded so the image
    keeps its size); 1.0 means identical, values near 0 unrelated structure.
    """
    import torch
    import torch.nn.functional as F

    a = torch.from_numpy(_as_array(first)).permute(2, 0, 1)[None]
    b = torch.from_numpy(_as_array(second)).permute(2, 0, 1)[None]
    channels = a.shape[1]
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    gauss = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    gauss = gauss / gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    pad = SSIM_WINDOW // 2
    if min(a.shape[-2:]) <= pad:
        raise CompareError(f"images of {tuple(a.shape[-2:])} pixels are too small for SSIM's {SSIM_WINDOW}-pixel window")

    def blur(x):
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)

    mean_a, mean_b = blur(a), blur(b)
    var_a = blur(a * a) - mean_a**2
    var_b = blur(b * b) - mean_b**2
    covariance = blur(a * b) - mean_a * mean_b
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def _as_array(image):
    """An image as a float64 (height, width, 3) array of 0..255 values."""
    import numpy as np

    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise CompareError(f"expected an RGB image, got an array of shape {array.shape}")
    return array


def side_by_side(pairs: Sequence[tuple[Any, Any]]):
    """One row per pair, side A on the left, side B on the right."""
    from PIL import Image

    width, height = pairs[0][0].size
    grid = Image.new("RGB", (2 * width, height * len(pairs)), "white")
    for row, (left, right) in enumerate(pairs):
        grid.paste(left.convert("RGB"), (0, row * height))
        grid.paste(right.convert("RGB"), (width, row * height))
    return grid


# --- rendering -----------------------------------------------------------------------------------------------


def load_side(base: Path, adapter: Path | None, scale: float, dtype: str):
    """The base pipeline, with ``adapter`` folded in at ``scale`` when one is given."""
    import torch
    from diffusers import DiffusionPipeline

    from simpletuner.models.lora_formats import LoraFile
    from simpletuner.tools.lora_merge import MergeError, merge_lycoris, merge_peft

    try:
        pipeline = DiffusionPipeline.from_pretrained(str(base), torch_dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise CompareError(f"cannot load the pipeline in {base}: {error}") from error
    pipeline.to("cpu")
    pipeline.set_progress_bar_config(disable=True)
    if adapter is None:
        return pipeline
    try:
        lora_file = LoraFile.read(adapter)
        if lora_file.format == "lycoris":
            merge_lycoris(pipeline, adapter, lora_file.tensors, scale)
        else:
            merge_peft(pipeline, adapter, scale)
    except MergeError as error:
        raise CompareError(str(error)) from None
    except Exception as error:  # LoraFormatError, safetensors' own errors
        raise CompareError(f"{adapter}: not a readable adapter file ({error})") from error
    return pipeline


def render(pipeline, prompt: str, seed: int, steps: int, size: int | None, guidance: float | None):
    """One image for ``prompt`` from a CPU generator seeded with ``seed`` (video pipelines: the first frame)."""
    import torch

    kwargs: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps, "output_type": "pil",
                              "generator": torch.Generator("cpu").manual_seed(seed)}
    if size is not None:
        kwargs.update(height=size, width=size)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    with torch.no_grad():
        result = pipeline(**kwargs)
    images = getattr(result, "images", None)
    if images is None:
        images = result.frames[0]
    return images[0]


def render_side(base: Path, adapter: Path | None, scale: float, dtype: str, jobs: list[tuple[str, int]],
                steps: int, size: int | None, guidance: float | None) -> list[Any]:
    pipeline = load_side(base, adapter, scale, dtype)
    images = [render(pipeline, prompt, seed, steps, size, guidance) for prompt, seed in jobs]
    del pipeline
    return images


# --- the command ---------------------------------------------------------------------------------------------


def compare_lora(base: str | Path, adapter: str | Path, output: str | Path, prompts: Sequence[str],
                 other: str | Path | None = None, seeds: Sequence[int] = (0,), steps: int = 20,
                 size: int | None = None, guidance: float | None = None, scale: float = 1.0,
                 dtype: str = "float32", overwrite: bool = False) -> CompareReport:
    """The whole ``simpletuner compare-lora`` run: side A is ``base`` + ``adapter``, side B is ``base`` +
    ``other`` (or the base alone); writes the grid and the scores into ``output``."""
    base, adapter, output = Path(base), Path(adapter), Path(output)
    other = Path(other) if other is not None else None
    check_inputs(base, adapter, other, output, prompts, seeds, steps, overwrite)
    jobs = [(prompt, int(seed)) for prompt in prompts for seed in seeds]
    side_a = render_side(base, adapter, scale, dtype, jobs, steps, size, guidance)
    side_b = render_side(base, other, scale, dtype, jobs, steps, size, guidance)
    scores = tuple(PairScore(prompt, seed, psnr(a, b), ssim(a, b)) for (prompt, seed), a, b in zip(jobs, side_a, side_b))
    output.mkdir(parents=True, exist_ok=True)
    grid = output / GRID_FILE
    side_by_side(list(zip(side_a, side_b))).save(grid)
    scores_file = output / SCORES_FILE
    names = (str(adapter), str(other) if other is not None else f"base ({base})")
    scores_file.write_text(json.dumps({
        "side_a": names[0], "side_b": names[1], "steps": steps, "size": size, "guidance": guidance, "scale": scale,
        "scores": [{**asdict(s), "psnr": None if math.isinf(s.psnr) else s.psnr} for s in scores],
    }, indent=2) + "\n", encoding="utf-8")
    return CompareReport(names[0], names[1], scores, grid, scores_file)


def check_inputs(base: Path, adapter: Path, other: Path | None, output: Path, prompts: Sequence[str],
                 seeds: Sequence[int], steps: int, overwrite: bool) -> None:
    if not base.is_dir():
        raise CompareError(f"--base {base}: no such pipeline folder")
    for flag, path in (("--adapter", adapter), ("--other", other)):
        if path is not None and not path.is_file():
            raise CompareError(f"{flag} {path}: no such adapter file")
    if not prompts or any(not p.strip() for p in prompts):
        raise CompareError("give at least one non-empty --prompt")
    if not seeds:
        raise CompareError("give at least one --seed")
    if steps < 1:
        raise CompareError(f"--steps {steps}: at least 1")
    if not overwrite and any((output / name).exists() for name in (GRID_FILE, SCORES_FILE)):
        raise CompareError(f"{output} already holds a comparison; pass --overwrite to replace it")
