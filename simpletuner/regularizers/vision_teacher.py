"""The frozen DINOv2 teacher that the representation-alignment regularizers (CREPA, U-REPA) share.

Both compare the denoiser's inner tokens with an image encoder's patch tokens for the clean image. The
batch holds cached VAE posterior means, not pixels, so the clean image is the family's own VAE decoding
of that mean (under ``no_grad``); the encoder then sees it resized and ImageNet-normalised, and only its
patch tokens are kept: the CLS token and any register tokens are dropped, so there is one feature row
per image patch (a pooled output would collapse the alignment onto a single vector).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

#: Encoder short names (``--crepa_model`` / ``--urepa_model``) and the hub repositories of those DINOv2s.
DINOV2_HUB_IDS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
#: DINOv2 was trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_encoder(name_or_path: str, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen ``transformers.Dinov2Model`` from a short name, a hub id or a local folder."""
    from transformers import Dinov2Model

    encoder = Dinov2Model.from_pretrained(DINOV2_HUB_IDS.get(name_or_path, name_or_path))
    encoder.requires_grad_(False)
    return encoder.to(device=device, dtype=dtype).eval()


def encoder_prefix_tokens(encoder: torch.nn.Module) -> int:
    """Tokens the encoder puts before its patch tokens: the CLS token plus any register tokens."""
    return 1 + int(getattr(encoder.config, "num_register_tokens", 0) or 0)


@torch.no_grad()
def encoder_patch_tokens(encoder: torch.nn.Module, pixels: torch.Tensor, image_size: int,
                         frames_batch_size: int = -1) -> torch.Tensor:
    """The encoder's patch tokens (N, patches, E) for images in [-1, 1] (N, 3, H, W), resized to
    ``image_size`` square and ImageNet-normalised; images go through the encoder ``frames_batch_size``
    at a time (all together when it is 0 or negative)."""
    parameter = next(encoder.parameters())
    images = F.interpolate(pixels.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(-1, 1) + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    images = ((images - mean) / std).to(device=parameter.device, dtype=parameter.dtype)
    chunk = frames_batch_size if frames_batch_size > 0 else images.shape[0]
    skip = encoder_prefix_tokens(encoder)
    pieces = [encoder(pixel_values=part).last_hidden_state[:, skip:] for part in images.split(chunk)]
    return torch.cat(pieces).float()


def encoder_grid(encoder: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """The (rows, columns) of the encoder's patch-token grid at ``image_size``."""
    side = image_size // encoder.config.patch_size
    return side, side


@torch.no_grad()
def teacher_tokens_for_latents(vae, encoder: torch.nn.Module, latent_mean: torch.Tensor, image_size: int,
                               frames_batch_size: int = -1, who: str = "the regularizer") -> torch.Tensor:
    """The encoder's patch tokens for the clean images behind cached latents: the posterior means
    decoded by the family's VAE, then encoded. ``who`` names the caller in the error without a VAE."""
    if vae is None:
        raise RuntimeError(f"{who} needs the family's VAE to turn cached latents back into images")
    pixels = vae.decode(latent_mean.to(vae.device, dtype=vae.dtype)).sample
    return encoder_patch_tokens(encoder, pixels, image_size, frames_batch_size)


def make_projector(width: int, target_width: int) -> torch.nn.Module:
    """The trainable MLP from the denoiser's token width to the teacher's."""
    hidden = max(width, target_width)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.SiLU(), torch.nn.Linear(hidden, target_width))


class ProjectorAndGate:
    """The component methods of an aligner (CREPA, U-REPA) that trains ``self.projector`` and keeps the
    moving average and on/off state of ``self.gate`` (a schedule.SimilarityGate) between steps, weighted
    by ``self.schedule`` (a schedule.WeightSchedule)."""

    def active_weight(self, step: int, similarity: Callable[[], torch.Tensor]) -> float | None:
        """The schedule's weight at ``step``, or None while the term is off: past the cutoff, or with the
        similarity gate closed. A closed recoverable gate keeps measuring ``similarity()`` without
        gradients, so it can open again when the score drops."""
        if self.schedule.cut_off(step) or not self.gate.watching:
            return None
        if not self.gate.open:
            with torch.no_grad():
                self.gate.observe(similarity().item())
            return None
        return self.schedule.weight(step)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"projector": self.projector}

    def state_dict(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict(), "gate": self.gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector.load_state_dict(state["projector"])
        self.gate.load_state_dict(state["gate"])
