"""The clean first frame of image-to-video training (spec 004, "TI2V").

An image-to-video model is asked to continue a given picture. Its training therefore keeps the first
latent frame of each clip as the *clean* VAE latent of that picture instead of noising it with the
rest: the denoiser sees a clean frame 0 followed by noisy frames 1..F-1 and predicts the velocity of
the whole clip. Two consequences, both implemented here as pure tensor functions on 5-D latents
``[B, C, F, H, W]`` (batch, channels, latent frames, height, width):

* **noise**: :func:`apply_clean_first_frame` puts the clean latent back into frame 0 of the noisy
  input (optionally at a small noise level, for LTX-Video's partial noise on its conditioning frame);
* **loss**: :func:`first_frame_mask` is 1 on the frames the model must learn and 0 on the
  conditioning frame, whose "prediction" would only teach the model to copy its input.

Models that take a timestep per token (Wan 2.2's TI2V transformer, LTX-Video's transformer) are also
told that frame 0 is clean: diffusers' Wan 2.2 pipeline multiplies its first-frame mask by the step's
timestep, giving 0 on the conditioning frame's tokens, and LTX's image-to-video pipeline does the
same with ``t * (1 - conditioning_mask)``. :func:`frame_timesteps` builds that per-frame timestep
and :func:`token_timesteps` spreads it over the transformer's patch tokens in the (frame, row,
column) order both transformers flatten them in.

Per-sample switching covers LTX-Video's ``--ltx_i2v_prob`` (a share of the batch trains
image-to-video, the rest text-to-video): :func:`conditioned_samples` draws the switch, and every
function takes it as ``conditioned`` (a bool per sample; None means every sample is conditioned).

Nothing here imports the trainer or the methods: families and methods both call these functions.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: Axis of the latent-frame dimension in ``[B, C, F, H, W]`` latents.
FRAME_AXIS = 2


def _check_video_shape(shape: Sequence[int]) -> tuple[int, int, int, int, int]:
    if len(shape) != 5:
        raise ValueError(f"the clean first frame works on video latents [B, C, F, H, W]; got a shape of "
                         f"{len(shape)} dimensions {tuple(shape)}")
    return tuple(int(size) for size in shape)  # type: ignore[return-value]


def conditioned_samples(batch_size: int, probability: float = 1.0, device: torch.device | str = "cpu",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples of a batch train image-to-video this step: each one independently with
    ``probability`` (``--ltx_i2v_prob``). 1 and 0 decide without drawing, so a pure image-to-video or
    text-to-video run consumes no random numbers here and its random stream matches plain SFT's."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"the image-to-video probability {probability} must be between 0 and 1")
    if probability >= 1.0:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if probability <= 0.0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    draw_device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on its device
    return (torch.rand(batch_size, generator=generator, device=draw_device) < probability).to(device)


def first_frame_mask(latents_shape: Sequence[int], conditioned: torch.Tensor | None = None, clean_frames: int = 1,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, 1, F, 1, 1]``: 1 on the frames that are noised and learnt, 0 on the ``clean_frames``
    leading latent frames of each conditioned sample (all samples when ``conditioned`` is None).

    The singleton axes broadcast against latents, predictions and elementwise losses, so the same
    tensor masks the noise (:func:`apply_clean_first_frame`) and the loss.
    """
    batch, _, frames, _, _ = _check_video_shape(latents_shape)
    if not 0 <= clean_frames <= frames:
        raise ValueError(f"clean_frames = {clean_frames} must be between 0 and the clip's {frames} latent frames")
    mask = torch.ones(batch, 1, frames, 1, 1, device=device, dtype=dtype)
    if clean_frames == 0:
        return mask
    rows = _conditioned_rows(conditioned, batch, device)
    mask[rows, :, :clean_frames] = 0
    return mask


def _conditioned_rows(conditioned: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    if conditioned is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    conditioned = torch.as_tensor(conditioned, dtype=torch.bool, device=device).reshape(-1)
    if conditioned.numel() != batch:
        raise ValueError(f"conditioned has {conditioned.numel()} entries for a batch of {batch} samples")
    return conditioned


def apply_clean_first_frame(noisy: torch.Tensor, clean: torch.Tensor, conditioned: torch.Tensor | None = None,
                            clean_frames: int = 1, noise: torch.Tensor | None = None,
                            noise_level: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``noisy`` with the leading ``clean_frames`` latent frames of conditioned samples replaced by
    the clean latents ``clean`` (the same shape; only its leading frames are read). Other frames
    and unconditioned samples are returned bit for bit.

    ``noise_level`` > 0 (with ``noise``) places the conditioning frames at that sigma on the flow
    path instead, ``(1 - s) * clean + s * noise``: LTX-Video's partial noise on its first frame,
    which keeps the model from relying on a pixel-perfect conditioning image. It is one sigma for
    the batch or one per sample (``[B]``, e.g. a fraction of each sample's own sigma).
    """
    _check_video_shape(noisy.shape)
    if clean.shape[:2] != noisy.shape[:2] or clean.shape[3:] != noisy.shape[3:] or clean.shape[2] < clean_frames:
        raise ValueError(f"the clean latents {tuple(clean.shape)} do not match the noisy ones {tuple(noisy.shape)} "
                         f"in their first {clean_frames} frame(s)")
    level = _noise_levels(noise_level, noisy.shape[0], noisy.device)
    condition = clean[:, :, :clean_frames].to(noisy.dtype)
    if bool((level > 0).any()):
        if noise is None:
            raise ValueError("a conditioning frame noise level above 0 needs the noise to mix in")
        sigma = level.to(noisy.dtype).view(-1, 1, 1, 1, 1)
        condition = (1 - sigma) * condition + sigma * noise[:, :, :clean_frames].to(noisy.dtype)
    keep_noisy = first_frame_mask(noisy.shape, conditioned, clean_frames, device=noisy.device, dtype=torch.bool)
    padded = torch.cat([condition, noisy[:, :, clean_frames:]], dim=FRAME_AXIS)
    return torch.where(keep_noisy, noisy, padded)


def _noise_levels(noise_level: float | torch.Tensor, batch: int, device) -> torch.Tensor:
    """``[B]`` sigmas of the conditioning frames, from one value or one per sample, each in [0, 1]."""
    level = torch.as_tensor(noise_level, dtype=torch.float32, device=device).reshape(-1)
    if level.numel() == 1:
        level = level.expand(batch)
    if level.numel() != batch:
        raise ValueError(f"{level.numel()} conditioning noise levels for a batch of {batch} samples")
    if bool((level < 0).any() or (level > 1).any()):
        raise ValueError(f"the conditioning frame's noise level {level.tolist()} must be between 0 and 1")
    return level


def frame_timesteps(timesteps: torch.Tensor, mask: torch.Tensor,
                    clean_timestep: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``[B, F]``: the timestep of every latent frame. ``timesteps`` is one per sample ``[B]`` (plain
    SFT) or already one per frame ``[B, F]`` (causal SFT); frames where ``mask`` (from
    :func:`first_frame_mask`) is 0 get ``clean_timestep`` (0 for a clean frame, ``noise_level *
    num_train_timesteps`` for a partially noised one; one value or one per sample)."""
    frames = mask.shape[FRAME_AXIS]
    keep = mask.reshape(mask.shape[0], frames) > 0
    timesteps = torch.as_tensor(timesteps)
    if timesteps.dim() == 1:
        timesteps = timesteps.view(-1, 1).expand(-1, frames)
    if timesteps.shape != keep.shape:
        raise ValueError(f"timesteps of shape {tuple(timesteps.shape)} do not fit {frames} frames of "
                         f"{keep.shape[0]} samples")
    clean = torch.as_tensor(clean_timestep, dtype=timesteps.dtype, device=timesteps.device).reshape(-1, 1)
    return torch.where(keep.to(timesteps.device), timesteps, clean.expand_as(timesteps))


def token_timesteps(frame_timesteps: torch.Tensor, latents_shape: Sequence[int],
                    patch_size: Sequence[int] = (1, 2, 2)) -> torch.Tensor:
    """``[B, tokens]``: a per-frame timestep ``[B, F]`` repeated over the patch tokens of each frame,
    in the (frame, row, column) order in which Wan's and LTX-Video's transformers flatten patches,
    ready for their ``timestep`` argument of shape ``[batch, sequence]``.

    ``patch_size`` is the transformer's ``(frames, height, width)`` patch. A temporal patch larger
    than one frame takes the timestep of its first frame, so frames that share a token must share a
    timestep (causal chunks are whole patches).
    """
    _, _, frames, height, width = _check_video_shape(latents_shape)
    p_t, p_h, p_w = (int(size) for size in patch_size)
    if frames % p_t or height % p_h or width % p_w:
        raise ValueError(f"latents of {frames}x{height}x{width} (frames x height x width) do not split into "
                         f"patches of {p_t}x{p_h}x{p_w}")
    if frame_timesteps.shape[-1] != frames:
        raise ValueError(f"{frame_timesteps.shape[-1]} frame timesteps for {frames} latent frames")
    per_patch_frame = frame_timesteps[:, ::p_t]
    tokens_per_frame = (height // p_h) * (width // p_w)
    return per_patch_frame.repeat_interleave(tokens_per_frame, dim=1)
