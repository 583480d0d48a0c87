"""Noise, targets and losses shared by every DDPM-style family.

A family declares its prediction type; the maths lives here once:
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (DDPM, Ho et al. 2020) and the v-target
``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (Salimans & Ho 2022), both from the scheduler's
``alphas_cumprod``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0), via the scheduler so its beta schedule is respected."""
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the network is trained to output for the given prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error computed in float32, whatever the model's dtype."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
