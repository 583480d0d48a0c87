"""CREPA: align a DiT block's image tokens, through a trained projector, with a frozen teacher's features.

Spec 002's cross-frame representation alignment. One denoiser block (``--crepa_block_index``, a 0-based
index into the family's ``transformer_blocks()``) is hooked; after the training forward its image tokens
go through a small trainable MLP (the projector, saved in the checkpoint and trained with the model)
and are compared, token by token, with a target:

* by default the patch tokens of a frozen DINOv2 (``--crepa_model``) run on the clean images at
  ``--crepa_encoder_image_size``. The batch holds cached VAE latents, not pixels, so the clean images
  are obtained by decoding the cached posterior means with the family's own VAE under ``no_grad``; the
  CLS token (and any register tokens) are dropped, leaving one feature row per image patch;
* with ``--crepa_use_backbone_features`` the (detached) image tokens of a deeper block of the same
  denoiser (``--crepa_teacher_block_index``), and no encoder is loaded.

When the two token grids differ in size, the target grid is resized to the denoiser's grid by bilinear
interpolation (``--crepa_spatial_align``), or both sides are averaged into one token each.

Each frame f is aligned with itself (weight 1) and with its neighbours k (weight exp(-|k - f| / tau)):
those exactly ``--crepa_adjacent_distance`` frames away, or with ``--crepa_cumulative_neighbors`` every
frame from 1 to that distance away. A frame's score is the weighted sum of mean token cosines (divided by
the weights' total with ``--crepa_normalize_neighbour_sum``); the sample's score is the mean over frames
(``--crepa_normalize_by_frames``, the default) or their sum. The term is ``-weight * score``, with the
weight from :class:`~simpletuner.regularizers.schedule.WeightSchedule` and the on/off switch from
:class:`~simpletuner.regularizers.schedule.SimilarityGate`. Image families have one frame per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simpletuner.regularizers.base import BlockTokens, CaptureSwitch, RegularizerTerm, transformer_blocks_of
from simpletuner.regularizers.schedule import SimilarityGate, WeightSchedule
from simpletuner.regularizers.vision_teacher import (ProjectorAndGate, encoder_grid, load_encoder, make_projector,
                                                     teacher_tokens_for_latents)

@dataclass(frozen=True)
class NeighbourSettings:
    distance: int = 1
    tau: float = 1.0
    cumulative: bool = False
    normalize_sum: bool = False
    normalize_by_frames: bool = True


# --- token grids and alignment ----------------------------------------------------------------------

def token_grid(count: int, latent_height: int, latent_width: int) -> tuple[int, int] | None:
    """The (rows, columns) of ``count`` image tokens laid over a latent of that size (each token a
    square patch of latents), or None when no square patch size fits."""
    patch = math.isqrt(max(latent_height * latent_width // max(count, 1), 1))
    if patch * patch * count == latent_height * latent_width and latent_height % patch == 0 and latent_width % patch == 0:
        return latent_height // patch, latent_width // patch
    return None


def match_token_grids(student: torch.Tensor, target: torch.Tensor, student_grid: tuple[int, int] | None,
                      target_grid: tuple[int, int] | None, spatial_align: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``student`` (B, F, N, C) and ``target`` (B, F, M, C) with the same token count: unchanged when
    N == M; else the target grid resized bilinearly to the student's (spatial_align, grids known);
    else both averaged into a single token."""
    if student.shape[2] == target.shape[2]:
        return student, target
    if spatial_align and student_grid is not None and target_grid is not None:
        batch, frames, _, channels = target.shape
        grid = target.reshape(batch * frames, *target_grid, channels).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=student_grid, mode="bilinear", align_corners=False)
        return student, grid.permute(0, 2, 3, 1).reshape(batch, frames, -1, channels)
    return student.mean(dim=2, keepdim=True), target.mean(dim=2, keepdim=True)


def neighbour_weights(frames: int, settings: NeighbourSettings) -> torch.Tensor:
    """(F, F) weights W[f, k]: 1 for k == f, exp(-|k - f| / tau) for f's neighbours, 0 elsewhere."""
    weights = torch.eye(frames, dtype=torch.float64)
    distances = range(1, settings.distance + 1) if settings.cumulative else (settings.distance,)
    for frame in range(frames):
        for distance in distances:
            for neighbour in (frame - distance, frame + distance):
                if 0 <= neighbour < frames:
                    weights[frame, neighbour] = math.exp(-distance / settings.tau)
    return weights


def alignment_score(projected: torch.Tensor, target: torch.Tensor, settings: NeighbourSettings) -> torch.Tensor:
    """The batch's mean alignment score of ``projected`` and ``target`` (both B, F, N, C)."""
    projected, target = F.normalize(projected.float(), dim=-1), F.normalize(target.float(), dim=-1)
    cosines = torch.einsum("bfnc,bknc->bfk", projected, target) / projected.shape[2]  # mean over tokens
    weights = neighbour_weights(projected.shape[1], settings).to(cosines)
    per_frame = (cosines * weights).sum(dim=-1)
    if settings.normalize_sum:
        per_frame = per_frame / weights.sum(dim=-1)
    per_sample = per_frame.mean(dim=1) if settings.normalize_by_frames else per_frame.sum(dim=1)
    return per_sample.mean()


def denoiser_token_width(model) -> int:
    """The width of the denoiser's image tokens (heads x head size in the DiT families' configs)."""
    config = model.denoiser.config
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if not heads or not head_dim:
        raise ValueError(f"CREPA cannot tell the token width of {model.config.model_family}'s denoiser "
                         "(its config has no num_attention_heads / attention_head_dim)")
    return int(heads) * int(head_dim)


# --- the regularizer --------------------------------------------------------------------------------

def build(model, config) -> Crepa:
    """``--crepa_enabled`` (the registry's builder)."""
    schedule = WeightSchedule.from_options(config, "crepa")
    gate = SimilarityGate.from_options(config, "crepa")
    neighbours = NeighbourSettings(config.crepa_adjacent_distance, config.crepa_adjacent_tau,
                                   config.crepa_cumulative_neighbors, config.crepa_normalize_neighbour_sum,
                                   config.crepa_normalize_by_frames)
    width = denoiser_token_width(model)
    encoder = None
    if config.crepa_use_backbone_features:
        target_width = width
        teacher = config.crepa_block_index if config.crepa_teacher_block_index is None else config.crepa_teacher_block_index
    else:
        encoder = load_encoder(config.crepa_model, model.device, model.weight_dtype)
        target_width, teacher = encoder.config.hidden_size, None
    projector = make_projector(width, target_width).to(model.device)
    return Crepa(block_index=config.crepa_block_index, teacher_block_index=teacher, projector=projector,
                 schedule=schedule, gate=gate, neighbours=neighbours, spatial_align=config.crepa_spatial_align,
                 encoder=encoder, encoder_image_size=config.crepa_encoder_image_size,
                 encoder_frames_batch_size=config.crepa_encoder_frames_batch_size)


def block_position(index: int, count: int, option: str) -> int:
    if not 0 <= index < count:
        raise ValueError(f"`--{option}` {index} is past the denoiser's {count} transformer blocks; use 0 to {count - 1}")
    return index


class Crepa(ProjectorAndGate):
    name = "crepa"

    def __init__(self, *, block_index: int, projector: torch.nn.Module, schedule: WeightSchedule,
                 gate: SimilarityGate, neighbours: NeighbourSettings, spatial_align: bool = True,
                 teacher_block_index: int | None = None, encoder: torch.nn.Module | None = None,
                 encoder_image_size: int = 518, encoder_frames_batch_size: int = -1):
        if (encoder is None) == (teacher_block_index is None):
            raise ValueError("CREPA aligns with either an image encoder or a teacher block, exactly one of them")
        self.block_index, self.teacher_block_index = block_index, teacher_block_index
        self.projector, self.schedule, self.gate, self.neighbours = projector, schedule, gate, neighbours
        self.spatial_align, self.encoder = spatial_align, encoder
        self.encoder_image_size, self.encoder_frames_batch_size = encoder_image_size, encoder_frames_batch_size
        self.tokens = BlockTokens()
        self.vae = None

    def attach(self, model, capture: CaptureSwitch) -> None:
        blocks = transformer_blocks_of(model, "CREPA")
        roles = {"student": blocks[block_position(self.block_index, len(blocks), "crepa_block_index")]}
        if self.teacher_block_index is not None:
            roles["teacher"] = blocks[block_position(self.teacher_block_index, len(blocks), "crepa_teacher_block_index")]
        self.tokens.hook(roles, capture)
        self.vae = getattr(model, "vae", None)

    def detach(self) -> None:
        self.tokens.remove()

    def term(self, batch: dict, step: int) -> RegularizerTerm | None:
        student, teacher = self.tokens.take("student"), self.tokens.take("teacher")
        if student is None:
            raise RuntimeError("CREPA captured no block output in this forward pass; the denoiser did not run the "
                               "hooked block (block swap or compilation replacing it?)")
        weight = self.active_weight(step, lambda: self.score(student, teacher, batch))
        if weight is None:
            return None
        score = self.score(student, teacher, batch)
        self.gate.observe(score.item())
        loss = -weight * score
        return RegularizerTerm(loss, {"similarity": score.item(), "similarity_ema": self.gate.average,
                                      "weight": weight, "loss": loss.item()})

    def score(self, student: torch.Tensor, teacher: torch.Tensor | None, batch: dict) -> torch.Tensor:
        """The alignment score of the captured student tokens (B, N, D) with this batch's target."""
        latent = batch["latent_mean"]
        student_grid = token_grid(student.shape[1], latent.shape[-2], latent.shape[-1])
        if teacher is not None:
            target, target_grid = teacher.detach(), student_grid
        else:
            target = self.encoder_features(latent)
            target_grid = encoder_grid(self.encoder, self.encoder_image_size)
        parameter = next(self.projector.parameters())
        projected = self.projector(student.to(parameter.dtype)).unsqueeze(1)  # one frame per sample
        projected, target = match_token_grids(projected, target.unsqueeze(1).to(projected.device), student_grid,
                                              target_grid, self.spatial_align)
        return alignment_score(projected, target, self.neighbours)

    def encoder_features(self, latent_mean: torch.Tensor) -> torch.Tensor:
        """The teacher's patch tokens for the clean images behind the cached latents."""
        return teacher_tokens_for_latents(self.vae, self.encoder, latent_mean, self.encoder_image_size,
                                          self.encoder_frames_batch_size, who="CREPA")

