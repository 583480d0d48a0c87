"""Validation: sample images with the family's own pipeline during training, save grids, log them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from simpletuner.validation.resolutions import parse_resolutions

logger = logging.getLogger(__name__)


def make_grid(images: list, columns: int):
    """Paste images (same size) into one grid image, row-major."""
    from PIL import Image

    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def stitch_left(benchmark, image):
    """Put the base model's image to the left of the trained one, for before/after comparison."""
    from PIL import Image

    canvas = Image.new("RGB", (benchmark.width + image.width, max(benchmark.height, image.height)), "white")
    canvas.paste(benchmark.convert("RGB"), (0, 0))
    canvas.paste(image.convert("RGB"), (benchmark.width, 0))
    return canvas


@dataclass
class ValidationSettings:
    prompts: list[str]
    negative_prompt: str | None
    num_images: int
    num_inference_steps: int
    guidance: float
    seed: int
    resolutions: list[tuple[int, int]]

    @classmethod
    def from_config(cls, config, fallback_edge: int, family_defaults: dict | None = None) -> "ValidationSettings":
        """``family_defaults`` (from :meth:`ModelFamily.validation_defaults`) replace the table's
        defaults for options the user did not set, e.g. Flux's embedded guidance of 3.5."""
        explicit = getattr(config, "explicit", frozenset())

        def value(name: str):
            if name not in explicit and family_defaults and name in family_defaults:
                return family_defaults[name]
            return getattr(config, name)

        return cls(
            prompts=[config.validation_prompt] if config.validation_prompt else [],
            negative_prompt=value("validation_negative_prompt") or None,
            num_images=config.num_validation_images or 1,
            num_inference_steps=value("validation_num_inference_steps"),
            guidance=value("validation_guidance"),
            seed=config.validation_seed if config.validation_seed is not None else (config.seed or 0),
            resolutions=parse_resolutions(config.validation_resolution, fallback_edge),
        )


def generate_images(pipeline, prompts: list[str], settings: ValidationSettings, device,
                    size: tuple[int, int], batch_size: int = 16, extra_arguments: dict | None = None) -> list:
    """One image per prompt, each with its own seeded generator so results do not depend on batching
    and never touch the global random state (which would break exact resume)."""
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(settings.seed + start + i) for i in range(len(chunk))]
        result = pipeline(
            prompt=chunk,
            negative_prompt=[settings.negative_prompt] * len(chunk) if settings.negative_prompt else None,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance,
            width=size[0], height=size[1],
            generator=generators,
            **(extra_arguments or {}),
        )
        images.extend(result.images)
    return images


@dataclass
class Validator:
    """Runs validation at the configured interval and keeps the base model's images for comparison."""

    settings: ValidationSettings
    output_dir: Path
    tracker: object
    interval: int | None
    benchmark_enabled: bool
    device: object
    disabled: bool = False
    benchmark: dict[tuple[int, int], list] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.prompts) and not self.disabled

    def due(self, step: int) -> bool:
        return self.enabled and bool(self.interval) and step > 0 and step % self.interval == 0

    def run(self, model, step: int, label: str | None = None) -> dict[tuple[int, int], list]:
        """Sample every prompt x image index x resolution; write PNGs and a grid per resolution."""
        import torch

        from simpletuner.training.distributed import unwrap_parallel

        denoiser = unwrap_parallel(model.denoiser)  # DDP's forward would wait for the other processes
        # every trained network samples in eval mode (no LoRA dropout), then goes back to training
        networks = [denoiser, *model.trainable_text_encoders().values()]
        training_modes = [network.training for network in networks]
        for network in networks:
            network.eval()
        pipeline = model.build_pipeline(denoiser)
        pipeline.set_progress_bar_config(disable=True)
        prompts = [p for p in self.settings.prompts for _ in range(self.settings.num_images)]
        folder = self.output_dir / "validation" / (label or f"step_{step}")
        folder.mkdir(parents=True, exist_ok=True)
        results = {}
        from simpletuner.training.adapter import validation_strength

        # --validation_lycoris_strength: the adapter's multiplier while sampling, restored after
        with torch.no_grad(), self._autocast(model), validation_strength(model):
            for size in self.settings.resolutions:
                images = generate_images(pipeline, prompts, self.settings, self.device, size,
                                         extra_arguments=model.pipeline_call_arguments())
                results[size] = images
                self._write(folder, size, prompts, images, step)
        for network, was_training in zip(networks, training_modes):
            network.train(was_training)
        logger.info("validation images for step %d written to %s", step, folder)
        return results

    def _autocast(self, model):
        """Half-precision models mix dtypes inside the pipeline (the scheduler works in fp32);
        autocast keeps every layer's inputs in the layer's dtype, as in training."""
        import contextlib

        import torch

        if model.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=model.weight_dtype)

    def run_benchmark(self, model) -> None:
        """Images from the untrained model at step 0, later stitched left of each validation image."""
        if self.enabled and self.benchmark_enabled:
            self.benchmark = self.run(model, 0, label="step_0_base_model")

    def _write(self, folder: Path, size: tuple[int, int], prompts: list[str], images: list, step: int) -> None:
        tag = f"{size[0]}x{size[1]}"
        base = self.benchmark.get(size)
        shown = []
        for index, image in enumerate(images):
            image.save(folder / f"{tag}_{index:02d}.png")
            shown.append(stitch_left(base[index], image) if base and step > 0 else image)
        grid = make_grid(shown, columns=min(len(shown), 4))
        grid.save(folder / f"grid_{tag}.png")
        self.tracker.log_image(f"validation/{tag}", grid, step)
