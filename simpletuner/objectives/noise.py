"""Noise tricks applied before the forward pass.

- Offset noise (Guttenberg 2023): add ``noise_offset * N(0, 1)`` per sample and channel, constant over
  the image, with probability ``noise_offset_probability`` per step. Plain Gaussian noise almost
  never changes an image's mean brightness, so models trained without it struggle with very dark or
  bright images.
- Input perturbation (Ning et al. 2023): the model sees latents noised with ``noise + gamma * N(0, 1)``
  while the target still uses ``noise``, a cheap remedy for exposure bias. ``input_perturbation_steps``
  fades gamma linearly to zero over the first steps.

Both draw from torch's global generator, so an exactly resumed run draws the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSettings:
    offset: float = 0.0
    offset_probability: float = 1.0
    perturbation: float = 0.0
    perturbation_steps: int | None = None

    @classmethod
    def from_config(cls, config) -> "NoiseSettings":
        if config is None:
            return cls()
        return cls(
            offset=(config.noise_offset if config.noise_offset is not None else 0.1) if config.offset_noise else 0.0,
            offset_probability=config.noise_offset_probability if config.noise_offset_probability is not None else 0.25,
            perturbation=config.input_perturbation or 0.0,
            perturbation_steps=config.input_perturbation_steps or None,
        )


def apply_offset_noise(noise: torch.Tensor, strength: float, probability: float) -> torch.Tensor:
    """``noise`` plus a per-sample, per-channel constant, on a ``probability`` share of steps."""
    if strength <= 0 or float(torch.rand(())) >= probability:
        return noise
    offset = torch.randn(noise.shape[0], noise.shape[1], *([1] * (noise.dim() - 2)),
                         device=noise.device, dtype=noise.dtype)
    return noise + strength * offset


def perturbation_strength(settings: NoiseSettings, step: int) -> float:
    """Input-perturbation gamma at optimizer step ``step`` (linear fade when steps are set)."""
    if settings.perturbation <= 0:
        return 0.0
    if settings.perturbation_steps:
        return settings.perturbation * max(0.0, 1.0 - step / settings.perturbation_steps)
    return settings.perturbation
