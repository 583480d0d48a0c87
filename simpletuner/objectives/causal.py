"""Per-chunk noise levels for causal video training (spec 000's CausalSFT, after Chen et al. 2024,
"Diffusion Forcing").

A causal video model generates a clip chunk by chunk: chunk ``k`` is denoised while the chunks before
it are already finished and sit, as context, at a small fixed noise level. Plain SFT never shows the
model that situation, since all frames of a training clip share one noise level. Causal SFT does:

* the latent frames of a clip are cut into chunks of ``chunk_frames`` consecutive frames (the last
  chunk may be shorter);
* every sample draws how many leading chunks are *context* (uniformly from 0 to ``chunks - 1``, so at
  least one chunk is always learnt and every context length a generation passes through is seen);
* context frames sit at exactly ``context_noise`` (a sigma; 0 is clean) and are left out of the loss,
  because at generation time they are given, not predicted;
* every other chunk draws its own sigma from the run's flow schedule, independently of its neighbours
  (the "inhomogeneous timesteps" of diffusion forcing), and is learnt.

The result is a :class:`CausalNoisePlan`: a sigma per latent frame and a per-frame loss mask.
:func:`noise_per_frame` noises latents with it on the straight flow path and
:func:`per_frame_flow_loss` is the matching masked, optionally weighted, velocity loss. Pure tensor
functions; the method (simpletuner/methods/causal_sft.py) draws the sigmas and calls the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def chunk_count(num_frames: int, chunk_frames: int) -> int:
    """How many chunks ``num_frames`` latent frames make (the last one may be shorter)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames = {chunk_frames} must be at least 1")
    return -(-num_frames // chunk_frames)


def chunk_of_frame(num_frames: int, chunk_frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[F]``: the chunk index of every latent frame (``0 0 0 1 1 1 2`` for 7 frames in chunks of 3)."""
    chunk_count(num_frames, chunk_frames)  # validates chunk_frames
    return torch.arange(num_frames, device=device) // chunk_frames


@dataclass
class CausalNoisePlan:
    """The noise of one batch of clips, frame by frame.

    Attributes:
        frame_sigmas: ``[B, F]`` the sigma of every latent frame (context frames: ``context_noise``).
        chunk_sigmas: ``[B, chunks]`` the sigma each chunk drew (before context replaced some).
        context_chunks: ``[B]`` how many leading chunks of each sample are context.
        loss_mask: ``[B, 1, F, 1, 1]`` 1 on learnt frames, 0 on context frames (broadcasts over the
            latents' channels and pixels, like :func:`~simpletuner.objectives.first_frame.first_frame_mask`).
    """

    frame_sigmas: torch.Tensor
    chunk_sigmas: torch.Tensor
    context_chunks: torch.Tensor
    loss_mask: torch.Tensor


def plan_causal_noise(batch_size: int, num_frames: int, chunk_frames: int, context_noise: float,
                      draw_sigmas: Callable[[int], torch.Tensor], device: torch.device | str = "cpu",
                      context_chunks: torch.Tensor | None = None) -> CausalNoisePlan:
    """Draw the sigmas of every chunk and the context length of every sample.

    ``draw_sigmas(n)`` returns ``n`` sigmas from the run's schedule (the same sampler plain SFT uses,
    shift included); it is called once for all ``batch_size * chunks`` chunks. ``context_chunks``
    fixes the context lengths instead of drawing them (tests, evaluation).
    """
    if not 0.0 <= context_noise <= 1.0:
        raise ValueError(f"context_noise = {context_noise} must be a sigma between 0 and 1")
    chunks = chunk_count(num_frames, chunk_frames)
    chunk_sigmas = draw_sigmas(batch_size * chunks).to(device=device, dtype=torch.float32).reshape(batch_size, chunks)
    if context_chunks is None:
        context_chunks = torch.randint(0, chunks, (batch_size,)).to(device)
    context_chunks = torch.as_tensor(context_chunks, device=device).reshape(-1)
    if context_chunks.numel() != batch_size or bool((context_chunks < 0).any() or (context_chunks >= chunks).any()):
        raise ValueError(f"context_chunks {context_chunks.tolist()} must give each of {batch_size} samples a count "
                         f"from 0 to {chunks - 1} (at least one of its {chunks} chunks is learnt)")
    frame_chunk = chunk_of_frame(num_frames, chunk_frames, device)
    is_context = frame_chunk.view(1, -1) < context_chunks.view(-1, 1)  # [B, F]
    frame_sigmas = torch.where(is_context, torch.full_like(chunk_sigmas[:, :1], context_noise),
                               chunk_sigmas[:, frame_chunk])
    loss_mask = (~is_context).to(torch.float32).view(batch_size, 1, num_frames, 1, 1)
    return CausalNoisePlan(frame_sigmas, chunk_sigmas, context_chunks, loss_mask)


def noise_per_frame(latents: torch.Tensor, noise: torch.Tensor, frame_sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - s_f) x0 + s_f eps`` on ``[B, C, F, H, W]`` latents, with ``s_f`` the sigma of frame f."""
    if latents.dim() != 5:
        raise ValueError(f"per-frame noise needs video latents [B, C, F, H, W]; got shape {tuple(latents.shape)}")
    sigma = frame_sigmas.to(latents.dtype).view(latents.shape[0], 1, latents.shape[2], 1, 1)
    return (1 - sigma) * latents + sigma * noise


def per_frame_flow_loss(prediction: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor,
                        frame_weights: torch.Tensor | None = None,
                        pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's flow-matching loss over the frames it learns.

    Per sample: the squared error averaged over the learnt frames' elements (``frame_mask`` 1), each
    frame's error multiplied by its weight (``frame_weights`` ``[B, F]``, e.g. spec 004's bell curve
    at that frame's timestep) and, with a ``pixel_mask`` ``[B, 1, h, w]`` (1 = learn here; resized
    to the latents by area), only where the mask is set. Then the batch mean. A sample with nothing
    left to learn contributes 0, not NaN.
    """
    error = (prediction.float() - target.float()).pow(2)
    batch, _, frames, height, width = error.shape
    counted = frame_mask.float().reshape(batch, 1, frames, 1, 1)
    if pixel_mask is not None:
        area = torch.nn.functional.interpolate(pixel_mask.float(), size=(height, width), mode="area")
        counted = counted * area.unsqueeze(2)
    weighted = counted if frame_weights is None else counted * frame_weights.float().view(batch, 1, frames, 1, 1)
    total = (error * weighted).flatten(1).sum(dim=1)
    elements = counted.expand_as(error).flatten(1).sum(dim=1)
    return (total / elements.clamp_min(1e-8)).mean()
