"""Supervised fine-tuning: the standard denoising loss on cached latents and text embeddings.

For each batch: draw latents from the cached VAE posterior, drop some captions (so the model also
learns the unconditional prediction classifier-free guidance needs), noise the latents (with the
optional offset-noise and input-perturbation tricks) at timesteps from the configured sampler, and
regress the family's prediction target with the configured loss and weighting.

Two noise processes share this method:

* DDPM-style families (epsilon / v_prediction / sample) noise with the scheduler's ``alphas_cumprod``
  and draw integer timesteps from :mod:`simpletuner.objectives.timesteps`;
* flow-matching families noise along the straight path ``(1 - sigma) x0 + sigma eps``, draw sigmas
  from :mod:`simpletuner.objectives.flow` (the ``--flow_*`` options, optionally spec 004's discrete
  shifted table) and regress the velocity ``eps - x0``.

With ``--train_text_encoder`` the prompts are encoded live, with gradients, instead of read from the
text-embed cache (whose embeds would be stale as soon as the encoder moves).

Video families hand over latents [B, C, F, H, W]; everything above works on them unchanged (one
noise level per clip). Two family hooks shape it further: ``training_sigma_window`` confines the
flow sigmas to one expert's range of a two-expert model, and ``first_frame_conditioning`` keeps
the first latent frame of image-to-video samples clean (spec 004): un-noised in the input, at its
own timestep (the denoiser then gets one timestep per latent frame, [B, F]) and out of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from simpletuner.methods.base import LossOutput, Stateless
from simpletuner.methods.scheduled_sampling import build_scheduled_sampling
from simpletuner.objectives.first_frame import apply_clean_first_frame, first_frame_mask, frame_timesteps
from simpletuner.objectives.flow import FlowSigmaSampler, ShiftedDiscreteSchedule, flow_loss_weights, flow_noisy_latents
from simpletuner.objectives.losses import LossSettings, diffusion_loss, elementwise_loss, masked_mean
from simpletuner.objectives.noise import NoiseSettings, apply_offset_noise, perturbation_strength
from simpletuner.objectives.targets import (add_noise, check_diff2flow_schedule, diff2flow_prediction_and_target,
                                              training_target)
from simpletuner.objectives.timesteps import build_timestep_sampler


@dataclass
class NoisedBatch:
    """What the denoiser sees and what it should output, for one batch."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # prediction -> (prediction, target): lets diff2flow convert both
    loss_weights: torch.Tensor | None = None
    # Set by scheduled sampling's ReflexFlow (methods/scheduled_sampling.py): per-element loss weights,
    # an extra term of the prediction, and the named terms to log.
    element_weights: torch.Tensor | None = None
    regularize: Callable[[torch.Tensor], torch.Tensor] | None = None
    logs: dict[str, float] = field(default_factory=dict)
    # Set for a clean first frame (image-to-video): the timestep of every latent frame [B, F], which
    # the denoiser gets instead of ``timesteps``, and [B, 1, F, 1, 1] with 0 on the frames the loss skips.
    frame_timesteps: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None

    @property
    def model_timesteps(self) -> torch.Tensor:
        """What the denoiser is told: per-frame timesteps when a frame is clean, else one per sample."""
        return self.frame_timesteps if self.frame_timesteps is not None else self.timesteps


class FlowNoising:
    """Sigma sampling, noising and targets for flow-matching families.

    ``window`` (the family's ``training_sigma_window``, e.g. one expert's range) confines the sigmas to
    ``[low, high)``: drawn sigmas are mapped linearly into it, and the discrete table only offers its
    entries inside it.
    """

    def __init__(self, model, config, num_train_timesteps: int, window: tuple[float, float] | None = None):
        self.num_train_timesteps = num_train_timesteps
        default_shift = getattr(model, "default_flow_shift", None)
        self.sampler = FlowSigmaSampler.from_config(config, default_shift=default_shift)
        self.patch_size = getattr(model, "flow_patch_size", 2)
        self.weighting = config.flow_loss_weighting or "none"
        self.window = window
        self.table = None
        if config.flow_use_discrete_schedule or self.weighting == "gaussian":
            shift = config.flow_schedule_shift or default_shift or 1.0
            self.table = ShiftedDiscreteSchedule(
                shift=shift, num_train_timesteps=num_train_timesteps,
                min_timestep_boundary=config.flow_min_timestep_boundary or 0.0,
                max_timestep_boundary=config.flow_max_timestep_boundary or 1.0,
            )
        self.discrete = bool(config.flow_use_discrete_schedule)
        if self.discrete and window is not None:
            self._confine_table(*window)

    def _confine_table(self, low: float, high: float) -> None:
        """Keep only the table entries with ``low <= sigma < high`` (``<= 1`` when ``high`` is 1; the table
        runs from sigma 1 down)."""
        sigmas = self.table.sigmas.float()  # compared as drawn (float32), so none rounds onto the boundary
        inside = ((sigmas >= low) & ((sigmas < high) | (high >= 1.0))).nonzero().flatten()
        if inside.numel():
            self.table.min_index = max(self.table.min_index, int(inside.min()))
            self.table.max_index = min(self.table.max_index, int(inside.max()) + 1)
        if not inside.numel() or self.table.max_index <= self.table.min_index:
            raise ValueError(f"the discrete flow schedule has no entry with sigma in [{low}, {high}) between the "
                             "--flow_min_timestep_boundary / --flow_max_timestep_boundary; widen them")

    def into_window(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Sigmas in [0, 1] mapped linearly into the training window (unchanged without one)."""
        if self.window is None:
            return sigmas
        low, high = self.window
        return low + (high - low) * sigmas

    def sigmas(self, latents: torch.Tensor) -> torch.Tensor:
        batch = latents.shape[0]
        if self.discrete:
            return self.table.sample(batch, latents.device).sigmas.float()
        # tokens of one sample: patches of every (latent) frame, for the auto shift
        frames = math.prod(latents.shape[2:-2])
        seq_len = frames * (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
        return self.into_window(self.sampler(batch, latents.device, seq_len=seq_len).float())

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, input_noise: torch.Tensor,
                 sigmas: torch.Tensor | None = None) -> NoisedBatch:
        """``sigmas``: given (the evaluation loss's fixed ones) instead of drawn from the sampler."""
        if sigmas is None:
            sigmas = self.sigmas(latents)
        timesteps = sigmas * self.num_train_timesteps
        weights = None
        if self.weighting != "none":
            weights = flow_loss_weights(self.weighting, timesteps, self.table).to(latents.device, torch.float32)
        target = noise - latents
        return NoisedBatch(flow_noisy_latents(latents, input_noise, sigmas), timesteps,
                           lambda prediction: (prediction, target), weights)


def build(model, config) -> SupervisedFineTuning:
    """``--training_method sft`` (the registry's builder)."""
    return SupervisedFineTuning(model, config.caption_dropout_probability, config=config)


class SupervisedFineTuning(Stateless):
    """The default method; one instance per run. It trains nothing but the denoiser (and text encoders
    the trainer hands it) and keeps no state of its own: every random draw comes from the RNGs the
    checkpoint already restores."""

    def __init__(self, model, caption_dropout_probability: float, config):
        self.model = model
        self.caption_dropout_probability = caption_dropout_probability
        self.scheduler = model.noise_scheduler()
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.flow = model.prediction_type == "flow_matching"
        if self.flow:
            window = getattr(model, "training_sigma_window", lambda: None)()  # e.g. one expert's range
            self.flow_noising = FlowNoising(model, config, self.num_train_timesteps, window=window)
        else:
            window = getattr(model, "training_timestep_window", lambda: None)()  # e.g. one expert's slice
            self.sample_timesteps = build_timestep_sampler(config, self.scheduler, window=window)
        # --diff2flow_loss: regress the flow velocity (noise - latents) that the model's output implies.
        self.diff2flow = bool(config.diff2flow_enabled and config.diff2flow_loss)
        if self.diff2flow:
            check_diff2flow_schedule(self.scheduler, model.prediction_type)
        self.loss_settings = LossSettings.from_config(config)
        self.noise_settings = NoiseSettings.from_config(config)
        probability = config.masked_loss_probability
        self.masked_loss_probability = 1.0 if probability is None else float(probability)
        self.scheduled_sampling = build_scheduled_sampling(model, self.scheduler, config, self.flow)
        #: set by the trainer while ``--train_text_encoder`` is active (until ``--text_encoder_limit``)
        self.encode_text_live = False

    # --- conditioning ----------------------------------------------------------------------------

    def dropped_captions(self, batch_size: int) -> torch.Tensor:
        """Which samples lose their caption this step (``--caption_dropout_probability``)."""
        if self.caption_dropout_probability <= 0:
            return torch.zeros(batch_size, dtype=torch.bool)
        return torch.rand(batch_size) < self.caption_dropout_probability

    def text_conditioning(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt embeddings, with a random subset replaced by the empty prompt's."""
        if self.encode_text_live:
            return self.live_text_conditioning(batch)
        text = {key: batch[key].to(device) for key in batch["empty_prompt"]}
        dropped = self.dropped_captions(next(iter(text.values())).shape[0])
        if dropped.any():
            unconditional = self.model.unconditional_text(batch["empty_prompt"])
            for key, value in text.items():
                empty = unconditional[key].to(device)
                mask = dropped.to(device).view(-1, *([1] * (value.dim() - 1)))
                text[key] = torch.where(mask, empty, value)
        return text

    def live_text_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Captions encoded by the text encoder being trained; dropped captions become ``""``."""
        captions = list(batch["captions"])
        dropped = self.dropped_captions(len(captions))
        prompts = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]
        if any(p.requires_grad for encoder in self.model.trainable_text_encoders().values() for p in encoder.parameters()):
            return self.model.text_conditioning(prompts)
        with torch.no_grad():  # past --text_encoder_limit: the trained encoder, frozen
            return self.model.text_conditioning(prompts)

    def loss_mask(self, batch: dict, device: torch.device) -> torch.Tensor | None:
        """The batch's mask (1 = learn here) on ``--masked_loss_probability`` of the steps that have one."""
        mask = batch.get("mask")
        if mask is None or self.masked_loss_probability <= 0:
            return None
        if self.masked_loss_probability < 1 and float(torch.rand(())) >= self.masked_loss_probability:
            return None
        return mask.to(device)

    # --- noising -----------------------------------------------------------------------------------

    def ddpm_noising(self, latents: torch.Tensor, noise: torch.Tensor, input_noise: torch.Tensor,
                     timesteps: torch.Tensor | None = None) -> NoisedBatch:
        """``timesteps``: given (the evaluation loss's fixed ones) instead of drawn from the sampler."""
        if timesteps is None:
            timesteps = self.sample_timesteps(latents.shape[0], latents.device)
        noisy = add_noise(self.scheduler, latents, input_noise, timesteps)
        prediction_type = self.model.prediction_type
        if self.diff2flow:
            def target_of(prediction):
                return diff2flow_prediction_and_target(self.scheduler, prediction, noisy, latents, noise, timesteps,
                                                       prediction_type)
        else:
            target = training_target(self.scheduler, latents, noise, timesteps, prediction_type)

            def target_of(prediction):
                return prediction, target
        return NoisedBatch(noisy, timesteps, target_of)

    def clean_first_frame(self, noised: NoisedBatch, latents: torch.Tensor, input_noise: torch.Tensor, batch: dict,
                          generator: torch.Generator | None = None) -> NoisedBatch:
        """``noised`` with the first latent frame of the family's image-to-video samples put back clean
        (or at the family's noise level), its timestep set to that level and the frame kept out of
        the loss; unchanged when the family conditions no sample (``first_frame_conditioning``)."""
        hook = getattr(self.model, "first_frame_conditioning", None)
        condition = hook(batch, latents, generator=generator) if hook is not None else None
        if condition is None or latents.dim() != 5 or not bool(condition.conditioned.any()):
            return noised
        if not self.flow:
            raise ValueError(f"{self.model.family}: a clean first frame needs a flow-matching objective")
        conditioned = condition.conditioned.to(latents.device)
        mask = first_frame_mask(latents.shape, conditioned, device=latents.device, dtype=latents.dtype)
        noisy = apply_clean_first_frame(noised.noisy, latents, conditioned, noise=input_noise,
                                        noise_level=condition.noise_level)
        clean_timestep = condition.noise_level * self.num_train_timesteps
        return replace(noised, noisy=noisy, frame_mask=mask,
                       frame_timesteps=frame_timesteps(noised.timesteps, mask, clean_timestep))

    # --- the loss ----------------------------------------------------------------------------------

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached)
        text = self.text_conditioning(batch, device)
        noise = torch.randn_like(latents)
        noise = apply_offset_noise(noise, self.noise_settings.offset, self.noise_settings.offset_probability)
        gamma = perturbation_strength(self.noise_settings, step)
        input_noise = noise + gamma * torch.randn_like(noise) if gamma > 0 else noise
        noised = (self.flow_noising if self.flow else self.ddpm_noising)(latents, noise, input_noise)
        if self.scheduled_sampling is not None:  # the model's own rollout replaces part of the input
            noised = self.scheduled_sampling.apply(noised, latents, input_noise, text, batch, step)
        noised = self.clean_first_frame(noised, latents, input_noise, batch)
        loss = self.denoising_loss(noised, text, batch, lambda: self.loss_mask(batch, device))
        return LossOutput(loss, dict(noised.logs))

    def denoising_loss(self, noised: NoisedBatch, text: dict[str, torch.Tensor], batch: dict,
                       mask_of: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        """The denoiser's prediction for ``noised`` and its loss: the one quantity training and the
        evaluation loss share. ``mask_of`` is called after the prediction (it may draw a random number)."""
        model = self.model
        dtype = model.weight_dtype
        raw = model.predict(noised.noisy.to(dtype), noised.model_timesteps, {k: v.to(dtype) for k, v in text.items()},
                            batch=batch)
        prediction, target = noised.target_of(raw)
        mask = mask_of()
        if self.flow:
            elementwise = elementwise_loss(prediction, target, "l2")
            if noised.element_weights is not None:
                elementwise = elementwise * noised.element_weights
            per_sample = masked_mean(elementwise, mask, weights=noised.frame_mask)  # clean frames: no loss
            if noised.loss_weights is not None:
                per_sample = per_sample * noised.loss_weights
            loss = per_sample.mean()
        else:
            loss = diffusion_loss(self.loss_settings, self.scheduler, prediction, target, noised.timesteps,
                                  model.prediction_type, mask=mask)
        if noised.regularize is not None:
            loss = loss + noised.regularize(prediction)
        return loss

    # --- the evaluation loss -------------------------------------------------------------------------

    def eval_positions(self, count: int) -> list[float]:
        """``count`` evenly spaced points in (0, 1): the middles of ``count`` equal slices of the
        noise range (one point: the middle). Timestep ``p * num_train_timesteps`` or flow sigma ``p``."""
        return [(index + 0.5) / count for index in range(count)]

    @torch.no_grad()
    def eval_loss(self, batch: dict, device: torch.device, positions: list[float],
                  generator: torch.Generator) -> torch.Tensor:
        """The training loss of one eval batch, averaged over fixed noise levels ``positions``.

        Everything random comes from ``generator`` (latent sample, noise), so the same weights and
        generator seed give the same number and the global random state is untouched. Captions are
        never dropped, and offset noise / input perturbation (training-time regularisers) are left
        out; the noising, target, loss type, weighting and mask are the training ones.
        """
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached, generator=generator)
        if self.encode_text_live:
            text = model.text_conditioning(list(batch["captions"]))
        else:
            text = {key: batch[key].to(device) for key in batch["empty_prompt"]}
        mask = batch.get("mask")
        mask = mask.to(device) if mask is not None and self.masked_loss_probability > 0 else None
        size = latents.shape[0]
        total = torch.zeros((), device=device, dtype=torch.float32)
        for position in positions:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            if self.flow:
                sigmas = torch.full((size,), float(position), device=latents.device, dtype=torch.float32)
                noised = self.flow_noising(latents, noise, noise, sigmas=self.flow_noising.into_window(sigmas))
            else:
                step = min(int(position * self.num_train_timesteps), self.num_train_timesteps - 1)
                timesteps = torch.full((size,), step, device=latents.device, dtype=torch.long)
                noised = self.ddpm_noising(latents, noise, noise, timesteps=timesteps)
            noised = self.clean_first_frame(noised, latents, noise, batch, generator=generator)
            total += self.denoising_loss(noised, text, batch, lambda: mask).float()
        return total / len(positions)
