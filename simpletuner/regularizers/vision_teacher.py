"""The frozen DINOv2 teacher that the representation-alignment regularizers (CREPA, U-REPA) share.

Both compare the denoiser's inner tokens with an image encoder's patch tokens for the clean image.
Only the patch tokens are kept: the CLS token and any register tokens are dropped, so there is one
feature row per image patch (a pooled output would collapse the alignment onto a single vector).

Those tokens depend on the clean image alone, never on the step, so by default
(``--alignment_teacher_features cached``) they are computed once per image while the data is cached:
:class:`TeacherFeatures` is a second encoder next to the VAE, its entries kept and fingerprinted exactly
like the latents (by image content, bucket size, crop and the encoder's name and input size), and the
batch carries them under :attr:`TeacherFeatures.batch_key`. With ``live`` (or for a batch that carries
no features, e.g. a video dataset) they are computed every step from the batch itself: the cached VAE
posterior means are decoded back to pixels under ``no_grad`` (by the family's VAE, or U-REPA's Tiny
AutoEncoder with ``--urepa_use_tae``) and encoded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from simpletuner.options.alignment_rules import DINOV2_HUB_IDS

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
def pixels_from_latents(latent_mean: torch.Tensor, vae, tiny_autoencoder: torch.nn.Module | None = None,
                        who: str = "the regularizer") -> torch.Tensor:
    """The clean images in [-1, 1] behind cached posterior means (the live path).

    The family's VAE decodes the raw means. A Tiny AutoEncoder is trained on the latents the
    denoiser sees, so the means are shifted and scaled by the VAE's factors first (its own scaling
    factor is 1). ``who`` names the caller in the error when the family has no VAE."""
    if vae is None:
        raise RuntimeError(f"{who} needs the family's VAE to turn cached latents back into images")
    if tiny_autoencoder is None:
        return vae.decode(latent_mean.to(vae.device, dtype=vae.dtype)).sample
    config = vae.config
    scaled = (latent_mean.float() - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor
    parameter = next(tiny_autoencoder.parameters())
    return tiny_autoencoder.decode(scaled.to(parameter.device, dtype=parameter.dtype)).sample


def load_tiny_autoencoder(name_or_path: str, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen ``diffusers.AutoencoderTiny`` from a local folder or a hub id (offline: the hub cache)."""
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(name_or_path)
    tiny.requires_grad_(False)
    return tiny.to(device=device, dtype=dtype).eval()


class TeacherFeatures:
    """One DINOv2 teacher at one input size: its patch tokens for a batch, and the same tokens as a
    second image encoder for the data cache.

    Nothing heavy happens at construction: the encoder's config is read when its width or grid is
    first asked for, and its weights load the first time an image is encoded. A run whose cache
    already holds every image's features never loads them.

    As the data cache's encoder it offers what :class:`~simpletuner.data.cache.vae.VaeCache` asks
    of a model: ``latent_fingerprint_parts()`` and ``encode_images(pixels)``; entries hold float16
    tokens (half the disk of float32; alignment only reads their directions).
    """

    FORMAT_VERSION = 1

    def __init__(self, name_or_path: str, image_size: int, device: torch.device | str, dtype: torch.dtype,
                 frames_batch_size: int = -1):
        self.name_or_path = name_or_path
        self.image_size = int(image_size)
        self.device, self.dtype = device, dtype
        self.frames_batch_size = frames_batch_size
        self._config = None
        self._encoder: torch.nn.Module | None = None

    # --- identity -------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The hub id or folder the encoder loads from."""
        return DINOV2_HUB_IDS.get(self.name_or_path, self.name_or_path)

    @property
    def batch_key(self) -> str:
        """Where a batch carries these features: one key per encoder and input size, so CREPA and
        U-REPA with the same teacher share one cache."""
        return f"teacher_features:{self.name_or_path}@{self.image_size}"

    @property
    def cache_folder(self) -> str:
        """The sub-folder of a dataset's ``cache_dir_vae`` holding these features."""
        from pathlib import Path

        label = self.name_or_path if self.name_or_path in DINOV2_HUB_IDS else Path(self.name_or_path).name
        safe = "".join(character if character.isalnum() or character in "-_." else "_" for character in label)
        return f"teacher_features/{safe}-{self.image_size}"

    def latent_fingerprint_parts(self) -> dict[str, str]:
        """What identifies these entries (on top of the image and its crop, which the cache adds): the
        encoder (for a folder also its files' sizes and times, so replaced weights rebuild), the input
        size, the token layout and storage."""
        from pathlib import Path

        parts = {"kind": "dinov2_patch_tokens", "encoder": self.source, "image_size": str(self.image_size),
                 "storage": "float16", "version": str(self.FORMAT_VERSION)}
        folder = Path(self.source)
        if folder.is_dir():
            stats = sorted((item.name, item.stat().st_size, item.stat().st_mtime_ns) for item in folder.iterdir()
                           if item.is_file())
            parts["files"] = repr(stats)
        return parts

    @property
    def config(self):
        if self._config is None:
            from transformers import Dinov2Config

            self._config = Dinov2Config.from_pretrained(self.source)
        return self._config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def grid(self) -> tuple[int, int]:
        """The (rows, columns) of the patch-token grid at ``image_size``."""
        side = self.image_size // int(self.config.patch_size)
        return side, side

    # --- encoding -------------------------------------------------------------------------------

    @property
    def encoder(self) -> torch.nn.Module:
        if self._encoder is None:
            self._encoder = load_encoder(self.name_or_path, self.device, self.dtype)
        return self._encoder

    def release(self) -> None:
        """Drop the loaded weights (they load again if another image needs encoding)."""
        self._encoder = None

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The data cache's entry for images in [-1, 1] (N, 3, H, W): ``{"features": (N, patches, E)}``."""
        tokens = encoder_patch_tokens(self.encoder, pixels, self.image_size, self.frames_batch_size)
        return {"features": tokens.to(torch.float16)}

    def for_batch(self, batch: dict, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The batch's teacher tokens (B, patches, E) in float32: from the data cache when the batch
        carries them, else encoded now from ``decode(batch["latent_mean"])`` (pixels in [-1, 1])."""
        cached = batch.get(self.batch_key)
        if cached is not None:
            return cached.float()
        pixels = decode(batch["latent_mean"])
        return encoder_patch_tokens(self.encoder, pixels, self.image_size, self.frames_batch_size)


def make_projector(width: int, target_width: int) -> torch.nn.Module:
    """The trainable MLP from the denoiser's token width to the teacher's."""
    hidden = max(width, target_width)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.SiLU(), torch.nn.Linear(hidden, target_width))


class ProjectorAndGate:
    """The component methods of an aligner (CREPA, U-REPA) that trains ``self.projector`` and keeps the
    moving average and on/off state of ``self.gate`` (a schedule.SimilarityGate) between steps, weighted
    by ``self.schedule`` (a schedule.WeightSchedule)."""

    #: Set by the subclass's ``attach``: averages the similarity over processes before the gate sees it.
    capture = None

    def observe(self, similarity: float) -> None:
        """Feed the gate this batch's similarity, averaged over processes (so every process keeps one gate)."""
        self.gate.observe(self.capture.process_mean(similarity) if self.capture is not None else similarity)

    def active_weight(self, step: int, similarity: Callable[[], torch.Tensor]) -> float | None:
        """The schedule's weight at ``step``, or None while the term is off: past the cutoff, or with the
        similarity gate closed. A closed recoverable gate keeps measuring ``similarity()`` without
        gradients, so it can open again when the score drops."""
        if self.schedule.cut_off(step) or not self.gate.watching:
            return None
        if not self.gate.open:
            with torch.no_grad():
                self.observe(similarity().item())
            return None
        return self.schedule.weight(step)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"projector": self.projector}

    def state_dict(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict(), "gate": self.gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector.load_state_dict(state["projector"])
        self.gate.load_state_dict(state["gate"])
