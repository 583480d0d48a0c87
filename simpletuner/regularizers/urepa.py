"""U-REPA: align a UNet's mid-block features, through a trained projector, with a frozen DINOv2's patch tokens.

Spec 002's representation alignment for the UNet families (sd1x, sd2x, sdxl, kolors). Their denoisers
have no repeated transformer blocks, so the one hooked module is the UNet's bottleneck,
``denoiser.mid_block``. Its output feature map (B, C, H, W) is read as H * W tokens of width C; a small
trainable MLP (the projector, saved in the checkpoint and trained with the model) maps them to the
teacher's width. The teacher is the shared DINOv2 of :mod:`simpletuner.regularizers.vision_teacher`
(one feature row per image patch, for the clean image: cached with the latents, or decoded from them live
with the VAE or, ``--urepa_use_tae``, a Tiny AutoEncoder), its token grid resized
bilinearly to H x W so that every student token has a target at the same place.

Two terms, with H the projected student tokens and Y the teacher tokens, each L2-normalised per token:

* alignment: the mean cosine similarity of matching tokens, ``mean_i <H_i, Y_i>``, entered negated;
* manifold: ``mean((H Hᵀ - Y Yᵀ)²)`` over each sample's N x N token-similarity matrices, which asks the
  student to reproduce how the teacher's tokens relate to each other, not only where each one points.

The term is ``weight * (-similarity + urepa_manifold_weight * manifold)``, with the weight from the
shared :class:`~simpletuner.regularizers.schedule.WeightSchedule` and the on/off switch from the shared
:class:`~simpletuner.regularizers.schedule.SimilarityGate`, which follows the alignment similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simpletuner.regularizers.base import CaptureSwitch, RegularizerTerm
from simpletuner.regularizers.schedule import SimilarityGate, WeightSchedule
from simpletuner.regularizers.vision_teacher import (ProjectorAndGate, TeacherFeatures, load_tiny_autoencoder,
                                                     make_projector, pixels_from_latents)


def feature_map_tokens(features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A (B, C, H, W) feature map as tokens (B, H * W, C) in row-major order, and its (H, W) grid."""
    batch, channels, height, width = features.shape
    return features.flatten(2).transpose(1, 2), (height, width)


def resize_token_grid(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, rows * columns, E) laid on ``grid``, resized bilinearly to ``size`` (unchanged when equal)."""
    if tuple(grid) == tuple(size):
        return tokens
    batch, _, channels = tokens.shape
    image = tokens.reshape(batch, *grid, channels).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(batch, -1, channels)


def alignment_similarity(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of matching tokens of ``projected`` and ``target`` (both B, N, E)."""
    return F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


def manifold_distance(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the per-sample token-similarity matrices (B, N, N) of the
    L2-normalised ``projected`` and ``target`` tokens (both B, N, E): 0 when they relate alike."""
    student, teacher = F.normalize(projected.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return (student @ student.transpose(1, 2) - teacher @ teacher.transpose(1, 2)).pow(2).mean()


def mid_block_of(model) -> torch.nn.Module:
    block = getattr(model.denoiser, "mid_block", None)
    if block is None:
        raise ValueError(f"U-REPA needs a UNet denoiser with a mid block; {model.config.model_family}'s has none")
    return block


def mid_block_width(model) -> int:
    """The mid block's channel count: the widest (last) entry of the UNet's ``block_out_channels``."""
    return int(model.denoiser.config.block_out_channels[-1])


def build(model, config) -> Urepa:
    """``--urepa_enabled`` (the registry's builder)."""
    schedule = WeightSchedule.from_options(config, "urepa")
    gate = SimilarityGate.from_options(config, "urepa")
    teacher = teacher_features(model, config)[0]
    projector = make_projector(mid_block_width(model), teacher.hidden_size).to(model.device)
    tiny = None
    if config.urepa_use_tae:
        tiny = load_tiny_autoencoder(config.tiny_autoencoder_path or model.info.tiny_autoencoder, model.device,
                                     model.weight_dtype)
    return Urepa(projector=projector, teacher=teacher, schedule=schedule, gate=gate,
                 manifold_weight=float(config.urepa_manifold_weight), tiny_autoencoder=tiny)


def teacher_features(model, config) -> list[TeacherFeatures]:
    """The DINOv2 features U-REPA reads; the registry hands them to the data cache with
    ``--alignment_teacher_features cached``."""
    return [TeacherFeatures(config.urepa_model, config.urepa_encoder_image_size, model.device, model.weight_dtype)]


class Urepa(ProjectorAndGate):
    name = "urepa"

    def __init__(self, *, projector: torch.nn.Module, teacher: TeacherFeatures, schedule: WeightSchedule,
                 gate: SimilarityGate, manifold_weight: float = 3.0, tiny_autoencoder: torch.nn.Module | None = None):
        self.projector, self.teacher, self.schedule, self.gate = projector, teacher, schedule, gate
        self.manifold_weight, self.tiny_autoencoder = manifold_weight, tiny_autoencoder
        self.captured: torch.Tensor | None = None
        self.vae = None
        self._handle = None

    def attach(self, model, capture: CaptureSwitch) -> None:
        def record(module, inputs, output):
            if capture.on:
                self.captured = output[0] if isinstance(output, (tuple, list)) else output

        self._handle = mid_block_of(model).register_forward_hook(record)
        self.capture = capture
        self.vae = getattr(model, "vae", None)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def term(self, batch: dict, step: int) -> RegularizerTerm | None:
        features, self.captured = self.captured, None
        if features is None:
            raise RuntimeError("U-REPA captured no mid-block output in this forward pass; the UNet did not run its "
                               "mid block (compilation or offloading replacing it?)")
        weight = self.active_weight(step, lambda: self.terms(features, batch)[0])
        if weight is None:
            return None
        similarity, manifold = self.terms(features, batch)
        self.observe(similarity.item())
        loss = weight * (-similarity + self.manifold_weight * manifold)
        return RegularizerTerm(loss, {"similarity": similarity.item(), "similarity_ema": self.gate.average,
                                      "manifold": manifold.item(), "weight": weight, "loss": loss.item()})

    def terms(self, features: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(alignment similarity, manifold distance) of the captured mid-block map with this batch's teacher."""
        tokens, grid = feature_map_tokens(features)
        parameter = next(self.projector.parameters())
        projected = self.projector(tokens.to(parameter.dtype))
        target = self.teacher_tokens(batch, grid).to(projected.device)
        return alignment_similarity(projected, target), manifold_distance(projected, target)

    def teacher_tokens(self, batch: dict, grid: tuple[int, int]) -> torch.Tensor:
        """The teacher's patch tokens for this batch (cached, or live through the VAE or the Tiny
        AutoEncoder), resized to the student's token grid."""
        tokens = self.teacher.for_batch(batch, self.decode)
        return resize_token_grid(tokens, self.teacher.grid, grid)

    def decode(self, latent_mean: torch.Tensor) -> torch.Tensor:
        return pixels_from_latents(latent_mean, self.vae, self.tiny_autoencoder, who="U-REPA")

