"""Supervised fine-tuning: the standard denoising loss on cached latents and text embeddings.

For each batch: draw latents from the cached VAE posterior, drop some captions (so the model also
learns the unconditional prediction classifier-free guidance needs), noise the latents at uniformly
sampled timesteps, and regress the family's prediction target with MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simpletuner.training.objectives import add_noise, mse_loss, training_target
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

    def compute_loss(self, batch: dict, device: torch.device) -> LossOutput:
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached)
        text = self.text_conditioning(batch, device)
        noise = torch.randn_like(latents)
        timesteps = self.sample_timesteps(latents.shape[0], device)
        noisy = add_noise(self.scheduler, latents, noise, timesteps)
        dtype = model.weight_dtype
        prediction = model.predict(noisy.to(dtype), timesteps, {k: v.to(dtype) for k, v in text.items()})
        target = training_target(self.scheduler, latents, noise, timesteps, model.prediction_type)
        loss = mse_loss(prediction, target)
        return LossOutput(loss, {})
