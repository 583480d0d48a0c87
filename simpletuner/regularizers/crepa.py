"""CREPA: align a DiT block's image tokens, through a trained projector, with a frozen teacher's features.

Spec 002's cross-frame representation alignment. One denoiser block (``--crepa_block_index``, a 0-based
index into the family's ``transformer_blocks()``) is hooked; after the training forward its image tokens
go through a small trainable MLP (the projector, saved in the checkpoint and trained with the model)
and are compared, token by token, with a target:

* by default the patch tokens of a frozen DINOv2 (``--crepa_model``) for the clean images at
  ``--crepa_encoder_image_size`` (one row per image patch), cached with the latents or computed live
  (:class:`~simpletuner.regularizers.vision_teacher.TeacherFeatures`);
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
from simpletuner.regularizers.routing import on_shared_tokens
from simpletuner.regularizers.schedule import SimilarityGate, WeightSchedule
from simpletuner.regularizers.vision_teacher import ProjectorAndGate, TeacherFeatures, make_projector, pixels_from_latents

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
    features = None
    if config.crepa_use_backbone_features:
        target_width = width
        teacher = config.crepa_block_index if config.crepa_teacher_block_index is None else config.crepa_teacher_block_index
    else:
        features = teacher_features(model, config)[0]
        target_width, teacher = features.hidden_size, None
    projector = make_projector(width, target_width).to(model.device)
    return Crepa(block_index=config.crepa_block_index, teacher_block_index=teacher, projector=projector,
                 schedule=schedule, gate=gate, neighbours=neighbours, spatial_align=config.crepa_spatial_align,
                 teacher=features)


def teacher_features(model, config) -> list[TeacherFeatures]:
    """The DINOv2 features CREPA reads (none with ``--crepa_use_backbone_features``); the registry
    hands them to the data cache with ``--alignment_teacher_features cached``."""
    if config.crepa_use_backbone_features:
        return []
    return [TeacherFeatures(config.crepa_model, config.crepa_encoder_image_size, model.device, model.weight_dtype,
                            frames_batch_size=config.crepa_encoder_frames_batch_size)]


def block_position(index: int, count: int, option: str) -> int:
    if not 0 <= index < count:
        raise ValueError(f"`--{option}` {index} is past the denoiser's {count} transformer blocks; use 0 to {count - 1}")
    return index


class Crepa(ProjectorAndGate):
    name = "crepa"

    def __init__(self, *, block_index: int, projector: torch.nn.Module, schedule: WeightSchedule,
                 gate: SimilarityGate, neighbours: NeighbourSettings, spatial_align: bool = True,
                 teacher_block_index: int | None = None, teacher: TeacherFeatures | None = None):
        if (teacher is None) == (teacher_block_index is None):
            raise ValueError("CREPA aligns with either an image encoder or a teacher block, exactly one of them")
        self.block_index, self.teacher_block_index = block_index, teacher_block_index
        self.projector, self.schedule, self.gate, self.neighbours = projector, schedule, gate, neighbours
        self.spatial_align, self.teacher = spatial_align, teacher
        self.tokens = BlockTokens()
        self.vae = None

    def attach(self, model, capture: CaptureSwitch) -> None:
        blocks = transformer_blocks_of(model, "CREPA")
        roles = {"student": blocks[block_position(self.block_index, len(blocks), "crepa_block_index")]}
        if self.teacher_block_index is not None:
            roles["teacher"] = blocks[block_position(self.teacher_block_index, len(blocks), "crepa_teacher_block_index")]
        self.tokens.hook(roles, capture)
        self.capture = capture
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
        self.observe(score.item())
        loss = -weight * score
        return RegularizerTerm(loss, {"similarity": score.item(), "similarity_ema": self.gate.average,
                                      "weight": weight, "loss": loss.item()})

    def score(self, student: torch.Tensor, teacher: torch.Tensor | None, batch: dict) -> torch.Tensor:
        """The alignment score of the captured student tokens (B, N, D) with this batch's target.

        Under TREAD the student block may have run on a route's kept tokens only (``kept``): a teacher
        block's tokens are then taken at the same positions, and encoder features are matched to the
        whole token grid first and then cut to the kept tokens (pooled grids compare the kept tokens'
        mean with the target's)."""
        latent = batch["latent_mean"]
        kept = self.tokens.kept("student")
        student_grid = token_grid(student.shape[1] if kept is None else kept.total, latent.shape[-2], latent.shape[-1])
        if teacher is not None:
            student, target = on_shared_tokens(
                student, kept, teacher.detach(), self.tokens.kept("teacher"),
                names=(f"CREPA's block (`--crepa_block_index {self.block_index}`)",
                       f"its teacher block (`--crepa_teacher_block_index {self.teacher_block_index}`)"))
            target_grid = student_grid
        else:
            target = self.teacher.for_batch(batch, self.decode)
            target_grid = self.teacher.grid
        parameter = next(self.projector.parameters())
        projected = self.projector(student.to(parameter.dtype)).unsqueeze(1)  # one frame per sample
        target = target.unsqueeze(1).to(projected.device)
        if teacher is None and kept is not None:
            whole = projected.new_empty(*projected.shape[:2], kept.total, 0)  # stands for the whole token grid
            _, target = match_token_grids(whole, target, student_grid, target_grid, self.spatial_align)
            if target.shape[2] == kept.total:
                target = target[:, :, kept.positions.to(target.device)]
            else:  # pooled into one token: the kept tokens' mean against the whole target's
                projected = projected.mean(dim=2, keepdim=True)
        else:
            projected, target = match_token_grids(projected, target, student_grid, target_grid, self.spatial_align)
        return alignment_score(projected, target, self.neighbours)

    def decode(self, latent_mean: torch.Tensor) -> torch.Tensor:
        """The clean images behind cached latents, for live teacher features."""
        return pixels_from_latents(latent_mean, self.vae, who="CREPA")

