"""Causal SFT (``--training_method causal_sft``): flow-matching SFT on video with a noise level per
frame chunk and a noisy-context prefix, so a video model learns to continue a clip chunk by chunk
(spec 000's CausalSFT; Chen et al. 2024, "Diffusion Forcing").

Each step, for every clip of the batch (latents ``[B, C, F, H, W]``):

1. the latent frames are cut into chunks of ``--causal_chunk_frames``;
2. a random number of leading chunks becomes context, noised at exactly ``--context_noise`` and left
   out of the loss;
3. every other chunk draws its own sigma from the run's flow schedule (``--flow_*`` options, the
   family's shift) and is learnt;
4. the denoiser gets one timestep per latent frame (``[B, F]``, ``sigma * 1000``), which the family
   spreads over its tokens; the loss is the velocity error over the learnt frames, with spec 004's
   bell-curve weight per frame under ``--flow_loss_weighting gaussian``.

An image-to-video family's clean first frame (``first_frame_conditioning``, spec 004) is applied on
top, as in SFT: that frame is put back clean (or at the family's noise level) with its own timestep
and left out of the loss, whatever chunk it belongs to.

Only families whose transformer takes a timestep per token can do this; the config rules
(simpletuner/options/causal_rules.py) refuse the others before a model loads. Everything else
(caption dropout, offset noise, input perturbation, masked loss, the text-embed cache or live text
encoders, the evaluation loss) is plain SFT's, inherited.
"""

from __future__ import annotations

import torch

from simpletuner.methods.base import LossOutput
from simpletuner.methods.sft import NoisedBatch, SupervisedFineTuning
from simpletuner.objectives.causal import CausalNoisePlan, noise_per_frame, per_frame_flow_loss, plan_causal_noise
from simpletuner.objectives.flow import flow_loss_weights
from simpletuner.objectives.noise import apply_offset_noise, perturbation_strength


def build(model, config) -> "CausalSupervisedFineTuning":
    """``--training_method causal_sft`` (the registry's builder)."""
    return CausalSupervisedFineTuning(model, config)


class CausalSupervisedFineTuning(SupervisedFineTuning):
    """SFT with per-chunk sigmas and a context prefix; keeps no state of its own (its random draws come
    from the global RNG the checkpoint restores)."""

    def __init__(self, model, config):
        super().__init__(model, config.caption_dropout_probability, config=config)
        if not self.flow:
            raise ValueError(f"--training_method causal_sft trains flow-matching video models; {model.family} trains "
                             f"{model.prediction_type}")
        if self.scheduled_sampling is not None:
            raise ValueError("--training_method causal_sft cannot be combined with scheduled sampling (its rollout "
                             "draws one timestep per sample)")
        self.chunk_frames = int(config.causal_chunk_frames)
        self.context_noise = float(config.context_noise)

    def plan(self, latents: torch.Tensor) -> CausalNoisePlan:
        """This batch's per-frame sigmas and loss mask. Chunk sigmas come from the SFT sampler, asked
        for one sigma per chunk through a zero-copy view of ``batch x chunks`` clips (so a schedule that
        depends on the clip's size, like the auto shift, sees the real one)."""
        batch, frames = latents.shape[0], latents.shape[2]

        def draw_sigmas(count: int) -> torch.Tensor:
            return self.flow_noising.sigmas(latents[:1].expand(count, *latents.shape[1:]))

        return plan_causal_noise(batch, frames, self.chunk_frames, self.context_noise, draw_sigmas,
                                 device=latents.device)

    def frame_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """``--flow_loss_weighting``'s weight of every frame's timestep (``[B, F]``), or None."""
        weighting = self.flow_noising.weighting
        if weighting == "none":
            return None
        weights = flow_loss_weights(weighting, timesteps.reshape(-1), self.flow_noising.table)
        return weights.reshape(timesteps.shape).to(timesteps.device, torch.float32)

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached)
        if latents.dim() != 5:
            raise ValueError(f"--training_method causal_sft trains video latents [B, C, F, H, W]; {model.family} gave "
                             f"latents of shape {tuple(latents.shape)}")
        text = self.text_conditioning(batch, device)
        noise = torch.randn_like(latents)
        noise = apply_offset_noise(noise, self.noise_settings.offset, self.noise_settings.offset_probability)
        gamma = perturbation_strength(self.noise_settings, step)
        input_noise = noise + gamma * torch.randn_like(noise) if gamma > 0 else noise
        plan = self.plan(latents)
        timesteps = plan.frame_sigmas * self.num_train_timesteps  # [B, F]: one timestep per latent frame
        noised = NoisedBatch(noise_per_frame(latents, input_noise, plan.frame_sigmas), timesteps,
                             target_of=lambda prediction: (prediction, noise - latents))
        # an image-to-video family's clean first frame (spec 004) applies on top of the chunks
        noised = self.clean_first_frame(noised, latents, input_noise, batch)
        learnt = plan.loss_mask if noised.frame_mask is None else plan.loss_mask * noised.frame_mask
        dtype = model.weight_dtype
        raw = model.predict(noised.noisy.to(dtype), noised.model_timesteps, {k: v.to(dtype) for k, v in text.items()},
                            batch=batch)
        prediction, target = noised.target_of(raw)
        pixel_mask = self.loss_mask(batch, device)
        loss = per_frame_flow_loss(prediction, target, learnt, self.frame_weights(timesteps), pixel_mask)
        return LossOutput(loss)
