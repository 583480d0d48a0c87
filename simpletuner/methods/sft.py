"""Supervised fine-tuning: the standard denoising loss on cached latents and text embeddings.

For each batch: draw latents from the cached VAE posterior, drop some captions (so the model also
learns the unconditional prediction classifier-free guidance needs), noise the latents (with the
optional offset-noise and input-perturbation tricks) at timesteps from the configured sampler, and
regress the family's prediction target with the configured loss and SNR weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simpletuner.training.losses import LossSettings, diffusion_loss
from simpletuner.training.noise import NoiseSettings, apply_offset_noise, perturbation_strength
from simpletuner.training.objectives import (add_noise, check_diff2flow_schedule, diff2flow_prediction_and_target,
                                              training_target)
from simpletuner.training.timesteps import build_timestep_sampler


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float]


class SupervisedFineTuning:
    """The default method; one instance per run."""

    def __init__(self, model, caption_dropout_probability: float, config=None):
        self.model = model
        self.caption_dropout_probability = caption_dropout_probability
        self.scheduler = model.noise_scheduler()
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.sample_timesteps = build_timestep_sampler(config, self.scheduler)
        # --diff2flow_loss: regress the flow velocity (noise - latents) that the model's output implies.
        self.diff2flow = bool(getattr(config, "diff2flow_enabled", False) and getattr(config, "diff2flow_loss", False))
        if self.diff2flow:
            check_diff2flow_schedule(self.scheduler, model.prediction_type)
        self.loss_settings = LossSettings.from_config(config)
        self.noise_settings = NoiseSettings.from_config(config)

    def text_conditioning(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt embeddings, with a random subset replaced by the empty prompt's."""
        text = {key: batch[key].to(device) for key in batch["empty_prompt"]}
        if self.caption_dropout_probability > 0:
            batch_size = next(iter(text.values())).shape[0]
            dropped = torch.rand(batch_size) < self.caption_dropout_probability
            if dropped.any():
                for key, value in text.items():
                    empty = batch["empty_prompt"][key].to(device)
                    mask = dropped.to(device).view(-1, *([1] * (value.dim() - 1)))
                    text[key] = torch.where(mask, empty, value)
        return text

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached)
        text = self.text_conditioning(batch, device)
        noise = torch.randn_like(latents)
        noise = apply_offset_noise(noise, self.noise_settings.offset, self.noise_settings.offset_probability)
        timesteps = self.sample_timesteps(latents.shape[0], device)
        gamma = perturbation_strength(self.noise_settings, step)
        input_noise = noise + gamma * torch.randn_like(noise) if gamma > 0 else noise
        noisy = add_noise(self.scheduler, latents, input_noise, timesteps)
        dtype = model.weight_dtype
        prediction = model.predict(noisy.to(dtype), timesteps, {k: v.to(dtype) for k, v in text.items()})
        if self.diff2flow:
            prediction, target = diff2flow_prediction_and_target(
                self.scheduler, prediction, noisy, latents, noise, timesteps, model.prediction_type)
        else:
            target = training_target(self.scheduler, latents, noise, timesteps, model.prediction_type)
        loss = diffusion_loss(self.loss_settings, self.scheduler, prediction, target, timesteps,
                              model.prediction_type)
        return LossOutput(loss, {})
