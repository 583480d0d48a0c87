"""Timestep sampling strategies, chosen by name from the config.

The trainer asks :func:`build_timestep_sampler` once and then calls the returned sampler every step.
Each strategy is a small function or class that draws from torch's global generator, so a resumed
run (which restores that generator) draws the same timesteps.
"""

from __future__ import annotations

from typing import Callable

import torch

TimestepSampler = Callable[[int, torch.device], torch.Tensor]


def uniform_sampler(num_train_timesteps: int) -> TimestepSampler:
    """Integer timesteps drawn uniformly from [0, num_train_timesteps)."""

    def sample(batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (batch_size,), device=device).long()

    return sample


def build_timestep_sampler(config, scheduler) -> TimestepSampler:
    """The DDPM-style timestep sampler the config asks for."""
    return uniform_sampler(scheduler.config.num_train_timesteps)
