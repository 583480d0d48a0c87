"""``--validation_preview``: pictures of a validation sample while it is still being denoised.

Every ``--validation_preview_steps`` sampling steps the pipeline's ``callback_on_step_end`` hands over
the current latents; a Tiny AutoEncoder (``--tiny_autoencoder_path``, else the family's default hub id,
read from the local cache when offline) turns them into small PNGs written to ``previews/`` beside the
validation images. The full VAE would cost as much as the sampling step itself; the Tiny AutoEncoder
costs a fraction, which is what makes a preview every step affordable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class PreviewSettings:
    every: int
    #: folder or hub id of a diffusers ``AutoencoderTiny`` for the family's latents
    autoencoder: str

    @classmethod
    def from_config(cls, config) -> "PreviewSettings | None":
        if not config.validation_preview:
            return None
        from simpletuner.models.registry import family_info

        source = config.tiny_autoencoder_path or family_info(config.model_family).tiny_autoencoder
        return cls(every=int(config.validation_preview_steps or 1), autoencoder=source)


def _spatial_latents(pipeline, latents, size: tuple[int, int]):
    """Flux hands its latents over packed into 2x2 patches ``(batch, tokens, channels)``: unpack them
    into ``(batch, channels, height, width)`` as its own decoder does."""
    if latents.ndim == 3 and hasattr(pipeline, "_unpack_latents"):
        return pipeline._unpack_latents(latents, size[1], size[0], pipeline.vae_scale_factor)
    return latents


@dataclass
class PreviewWriter:
    """The step callback for one batch of prompts: decodes and writes the batch's latents at every Nth
    step as ``previews/<size>_<name>_step<k>.png`` (``k`` counts sampling steps from 1)."""

    settings: PreviewSettings
    tiny: object
    folder: Path
    tag: str
    names: list[str]
    size: tuple[int, int]
    written: list[Path] = field(default_factory=list)

    def __call__(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        done = step_index + 1
        if done % self.settings.every == 0:
            self.write(pipeline, callback_kwargs["latents"], done)
        return {}

    def write(self, pipeline, latents, done: int) -> None:
        import torch

        tiny = self.tiny
        latents = _spatial_latents(pipeline, latents, self.size)
        if getattr(pipeline, "do_classifier_free_guidance", False) and latents.shape[0] == 2 * len(self.names):
            latents = latents.chunk(2)[1]  # a pipeline that keeps both guidance halves: the guided one
        scaled = latents / tiny.config.scaling_factor + tiny.config.shift_factor
        with torch.no_grad():
            pixels = tiny.decode(scaled.to(device=tiny.device, dtype=tiny.dtype)).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        from PIL import Image

        self.folder.mkdir(parents=True, exist_ok=True)
        for name, image in zip(self.names, pixels):
            path = self.folder / f"{self.tag}_{name}_step{done:03d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
            self.written.append(path)


def load_preview_autoencoder(settings: PreviewSettings, device, latent_channels: int | None):
    """The Tiny AutoEncoder, refused with a clear message when its latent width differs from the model's."""
    import torch

    from simpletuner.regularizers.vision_teacher import load_tiny_autoencoder

    try:
        tiny = load_tiny_autoencoder(settings.autoencoder, device, torch.float32)
    except (OSError, ValueError) as error:
        raise ValueError(f"--validation_preview: cannot load the Tiny AutoEncoder {settings.autoencoder!r} "
                         f"({error}); set --tiny_autoencoder_path to a local diffusers AutoencoderTiny folder") from None
    if latent_channels is not None and tiny.config.latent_channels != latent_channels:
        raise ValueError(f"--validation_preview: the Tiny AutoEncoder {settings.autoencoder!r} decodes "
                         f"{tiny.config.latent_channels}-channel latents, the model makes {latent_channels}; give "
                         "--tiny_autoencoder_path the one made for this model family")
    return tiny
