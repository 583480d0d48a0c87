"""Loss functions and per-timestep loss weights, shared by every DDPM-style family.

- ``loss_type``: ``l2`` (MSE), ``huber`` and ``smooth_l1``, the latter two in their pseudo-Huber
  form ``2c(sqrt(e^2 + c^2) - c)`` and ``2(sqrt(e^2 + c^2) - c)``, which are smooth everywhere.
  The threshold ``c`` follows ``huber_schedule`` (Khrapov et al. 2024, "scheduled pseudo-Huber"):
  ``constant`` (c = huber_c), ``exponential`` (c decays from 1 at t=0 to huber_c at t=T), ``snr``
  (c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c, large where the image is clean).
- ``snr_gamma`` (Min-SNR, Hang et al. 2023): the x0-space weight ``min(SNR, gamma)``, expressed for
  the prediction type: divided by SNR for epsilon, by SNR + 1 for v-prediction, as is for sample.
- ``use_soft_min_snr``: the same with a smooth minimum, ``SNR * g / (SNR + g)`` where
  ``g = 1 / soft_min_snr_sigma_data^2``: near ``SNR`` for noisy steps, near ``g`` for clean ones.
- ``snr_weight`` blends either weighting with the unweighted loss: ``1 + s * (w - 1)``, so 1 is the
  full weighting, 0 switches it off and values between soften it (useful when min-SNR over-damps
  the noisy timesteps of a small dataset).
- masked loss: with a per-pixel mask (1 = learn here), each sample's loss is the mean over the
  masked region only, so unmasked parts of the image neither help nor hurt.

SNR is ``alpha_bar / (1 - alpha_bar)`` from the scheduler, so every formula is the scheduler's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


@dataclass(frozen=True)
class LossSettings:
    """The loss options of one run, read once from the config."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    snr_gamma: float | None = None
    soft_min_snr: bool = False
    soft_min_snr_sigma_data: float = 1.0
    snr_weight: float = 1.0

    @classmethod
    def from_config(cls, config) -> "LossSettings":
        if config is None:
            return cls()
        return cls(
            loss_type=config.loss_type or "l2",
            huber_schedule=config.huber_schedule or "snr",
            huber_c=config.huber_c if config.huber_c is not None else 0.1,
            snr_gamma=config.snr_gamma or None,
            soft_min_snr=bool(config.use_soft_min_snr),
            soft_min_snr_sigma_data=config.soft_min_snr_sigma_data or 1.0,
            snr_weight=1.0 if config.snr_weight is None else float(config.snr_weight),
        )

    @property
    def weighted(self) -> bool:
        return self.soft_min_snr or self.snr_gamma is not None


def signal_to_noise(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) in float32, from diffusers' ``compute_snr``: the helper its
    Min-SNR training examples use, so our weights match theirs (tests/training/test_losses.py checks it)."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def snr_loss_weights(settings: LossSettings, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample weights for Min-SNR / soft Min-SNR, for the given prediction type."""
    if settings.soft_min_snr:
        gamma = 1.0 / settings.soft_min_snr_sigma_data**2
        x0_weight = snr * gamma / (snr + gamma)
    else:
        x0_weight = torch.clamp(snr, max=settings.snr_gamma)
    if prediction_type == "epsilon":
        weights = x0_weight / snr
    elif prediction_type == "v_prediction":
        weights = x0_weight / (snr + 1)
    elif prediction_type == "sample":
        weights = x0_weight
    else:
        raise ValueError(f"SNR weighting is defined for epsilon, v_prediction and sample, not {prediction_type!r}")
    return 1 + settings.snr_weight * (weights - 1)


def huber_threshold(settings: LossSettings, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The per-sample pseudo-Huber threshold c(t)."""
    c = settings.huber_c
    if settings.huber_schedule == "constant":
        return torch.full(timesteps.shape, c, device=timesteps.device)
    if settings.huber_schedule == "exponential":
        rate = -torch.log(torch.tensor(c)) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float())
    if settings.huber_schedule == "snr":
        sigmas = signal_to_noise(scheduler, timesteps).rsqrt()
        return (1 - c) / (1 + sigmas) ** 2 + c
    raise ValueError(f"unknown huber_schedule {settings.huber_schedule!r}; use one of {HUBER_SCHEDULES}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per element, in float32; ``threshold`` has one value per sample."""
    error = prediction.float() - target.float()
    if loss_type == "l2":
        return error.pow(2)
    c = threshold.float().view(-1, *([1] * (error.dim() - 1)))
    smooth = torch.sqrt(error.pow(2) + c.pow(2)) - c
    if loss_type == "huber":
        return 2 * c * smooth
    if loss_type == "smooth_l1":
        return 2 * smooth
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of {LOSS_TYPES}")


def masked_mean(elementwise: torch.Tensor, mask: torch.Tensor | None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of an elementwise loss, over the whole sample or only where ``mask`` is set.

    ``mask`` (N, 1, h, w) is resized to the loss's spatial size by area averaging, so a latent cell
    counts in proportion to how much of its pixel footprint is masked; a video loss (N, C, F, h, w)
    applies it to every frame. ``weights``, broadcastable to the loss (e.g. [N, 1, F, 1, 1] with 0 on
    a clean conditioning frame), leaves elements out: the mean is taken over what they keep. A sample
    whose mask is empty contributes 0 rather than NaN.
    """
    if mask is None and weights is None:
        return elementwise.flatten(1).mean(dim=1)
    kept = torch.ones((), device=elementwise.device, dtype=torch.float32)
    if mask is not None:
        kept = torch.nn.functional.interpolate(mask.float(), size=elementwise.shape[-2:], mode="area")
        if elementwise.dim() == 5:
            kept = kept.unsqueeze(2)  # (N, 1, 1, h, w): the same mask on every frame
    if weights is not None:
        kept = kept * weights.float()
    kept = kept.expand_as(elementwise)
    total = (elementwise * kept).flatten(1).sum(dim=1)
    return total / kept.flatten(1).sum(dim=1).clamp_min(1e-8)


def diffusion_loss(settings: LossSettings, scheduler, prediction: torch.Tensor, target: torch.Tensor,
                   timesteps: torch.Tensor, prediction_type: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss: per-sample (masked) mean, optionally SNR-weighted, then batch mean."""
    threshold = None if settings.loss_type == "l2" else huber_threshold(settings, scheduler, timesteps)
    per_sample = masked_mean(elementwise_loss(prediction, target, settings.loss_type, threshold), mask)
    if settings.weighted:
        snr = signal_to_noise(scheduler, timesteps).float()
        per_sample = per_sample * snr_loss_weights(settings, snr, prediction_type)
    return per_sample.mean()
