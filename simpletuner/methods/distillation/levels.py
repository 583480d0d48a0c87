"""Noise levels of distillation: how a latent is noised to a timestep, how a prediction becomes a clean
sample, where the few-step student samples, and its rollout.

Every family here writes a noisy latent as ``x_t = alpha_t * x0 + sigma_t * eps``:

* DDPM families (epsilon / v_prediction / sample): ``alpha = sqrt(alpha_bar_t)``, ``sigma = sqrt(1 - alpha_bar_t)``
  at an integer training timestep ``t``;
* flow matching: ``sigma = t / T`` and ``alpha = 1 - sigma``, the model predicting ``eps - x0``.

The student's timesteps are the ones diffusers samples it with, so what it learns is what a user's
pipeline runs:

* DDPM families: diffusers' "trailing" spacing of ``N`` steps (``[999]`` for one step,
  ``[999, 749, 499, 249]`` for four; the "leading" spacing SD ships would start a one-step student at
  timestep 1), or the ``student_timesteps`` the config lists. Validation and the model card sample
  with ``EulerDiscreteScheduler`` and exactly these ``timesteps``: Euler on the ODE variable
  ``x / sqrt(alpha_bar)`` is the deterministic DDIM step the rollout below takes.
* flow families: the sigmas ``FlowMatchEulerDiscreteScheduler`` with the family's scheduler config
  gives for ``N`` inference steps (its shift, and the resolution-dependent shift of families that use
  one); validation and the model card sample with that scheduler, so ``num_inference_steps=N`` walks
  the same path.

The rollout between student steps is deterministic DDIM (flow: Euler), ``x_next = alpha_next x0_hat +
sigma_next eps_hat`` with ``eps_hat`` implied by the prediction; its last step returns ``x0_hat``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def trailing_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """diffusers' "trailing" spacing: ``round(T, T - T/N, ...) - 1``, from the noisiest down."""
    return [int(round(num_train_timesteps - index * num_train_timesteps / steps)) - 1 for index in range(steps)]


def flow_inference_sigmas(scheduler, steps: int, image_tokens: int) -> list[float]:
    """The sigmas ``FlowMatchEulerDiscreteScheduler``, built from the family's scheduler config (its
    shift), walks for ``steps`` inference steps (its last, 0, left out). A resolution-dependent shift is
    given the ``mu`` diffusers' pipelines compute for ``image_tokens``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from simpletuner.objectives.flow import with_euler_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(with_euler_shift(copy.deepcopy(dict(scheduler.config))))
    arguments = {}
    config = scheduler.config
    if getattr(config, "use_dynamic_shifting", False):
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        arguments["mu"] = image_tokens * slope + base_shift - slope * base_len
    scheduler.set_timesteps(steps, **arguments)
    return [float(s) for s in scheduler.sigmas[:steps]]


@dataclass
class NoiseLevels:
    """``alpha_t`` / ``sigma_t`` of a family's noise process, and conversions between its predictions."""

    prediction_type: str
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # DDPM families only

    @classmethod
    def of(cls, model) -> "NoiseLevels":
        scheduler = model.noise_scheduler()
        prediction = model.prediction_type
        cumprod = None if prediction == "flow_matching" else scheduler.alphas_cumprod.double()
        return cls(prediction, int(scheduler.config.num_train_timesteps), cumprod)

    @property
    def flow(self) -> bool:
        return self.prediction_type == "flow_matching"

    def alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``alpha``, ``sigma`` shaped to broadcast over ``like``."""
        if self.flow:
            sigma = timesteps.double() / self.num_train_timesteps
            alpha = 1.0 - sigma
        else:
            index = timesteps.round().long().clamp(0, self.num_train_timesteps - 1).cpu()
            alpha_bar = self.alphas_cumprod[index]
            alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (alpha.to(like.device, torch.float32).view(shape), sigma.to(like.device, torch.float32).view(shape))

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(timesteps, x0)
        return alpha * x0 + sigma * noise

    def clean_estimate(self, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x0_hat`` from the model's raw output at ``sample``."""
        alpha, sigma = self.alpha_sigma(timesteps, sample)
        output, sample = output.float(), sample.float()
        if self.prediction_type == "epsilon":
            return (sample - sigma * output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * sample - sigma * output
        if self.prediction_type == "sample":
            return output
        return sample - sigma * output  # flow: output = eps - x0, sigma * (eps - x0) = sample - x0

    def noise_estimate(self, x0: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(timesteps, sample)
        return (sample.float() - alpha * x0) / sigma

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoising loss regresses at ``timesteps`` (the fake score trains on it)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            alpha, sigma = self.alpha_sigma(timesteps, x0)
            return alpha * noise - sigma * x0
        if self.prediction_type == "sample":
            return x0
        return noise - x0


@dataclass
class StudentSchedule:
    """The model timesteps the student samples at, noisiest first (floats: flow timesteps are ``sigma * T``)."""

    timesteps: list[float]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def for_model(cls, model, levels: NoiseLevels, steps: int, custom: Sequence[int] | None,
                  image_tokens: int) -> "StudentSchedule":
        if levels.flow:
            if custom:
                raise ValueError("distillation_config student_timesteps is for DDPM families; a flow-matching student "
                                 "samples at its scheduler's own sigmas for student_sample_steps, so diffusers' "
                                 "pipeline walks the same path. Remove student_timesteps")
            sigmas = flow_inference_sigmas(model.noise_scheduler(), steps, image_tokens)
            return cls([sigma * levels.num_train_timesteps for sigma in sigmas])
        if custom:
            values = [int(t) for t in custom]
            if len(values) != steps:
                raise ValueError(f"distillation_config student_timesteps lists {len(values)} timesteps but "
                                 f"student_sample_steps is {steps}; list one per step")
            if any(b >= a for a, b in zip(values, values[1:])) or values[0] >= levels.num_train_timesteps or values[-1] < 1:
                raise ValueError(f"distillation_config student_timesteps {values} must fall strictly from at most "
                                 f"{levels.num_train_timesteps - 1} to at least 1")
            return cls([float(t) for t in values])
        return cls([float(t) for t in trailing_timesteps(steps, levels.num_train_timesteps)])


def rollout(noise: torch.Tensor, schedule: StudentSchedule, levels: NoiseLevels, exit_step: int,
            predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The student's ``x0_hat`` at step ``exit_step``: steps before it run without gradients (DDIM /
    Euler from pure noise, as the pipeline samples), the exit step with whatever grad mode the caller
    has. ``predict(sample, timesteps)`` is one student call."""
    sample = noise
    batch = noise.shape[0]
    for index in range(exit_step + 1):
        timesteps = torch.full((batch,), schedule.timesteps[index], device=noise.device)
        if index < exit_step:
            with torch.no_grad():
                x0 = levels.clean_estimate(predict(sample, timesteps), sample, timesteps)
                eps = levels.noise_estimate(x0, sample, timesteps)
                following = torch.full((batch,), schedule.timesteps[index + 1], device=noise.device)
                sample = levels.noised(x0, eps, following).to(noise.dtype)
        else:
            return levels.clean_estimate(predict(sample, timesteps), sample, timesteps)
    raise AssertionError("unreachable")


def sample_noising_timesteps(batch: int, levels: NoiseLevels, distribution: dict, device) -> torch.Tensor:
    """The timesteps at which the generated sample is re-noised for the teacher and the fake score
    (``sample_t_cfg``): ``uniform`` or ``logit_normal`` between ``min`` and ``max`` (fractions of the
    schedule). DDPM timesteps are rounded to integers."""
    low, high = float(distribution.get("min", 0.02)), float(distribution.get("max", 0.98))
    kind = distribution.get("kind", "uniform")
    if kind == "logit_normal":
        unit = torch.sigmoid(torch.randn(batch) * float(distribution.get("std", 1.0)) + float(distribution.get("mean", 0.0)))
    else:
        unit = torch.rand(batch)
    fraction = low + (high - low) * unit
    timesteps = fraction * levels.num_train_timesteps
    if not levels.flow:
        timesteps = timesteps.floor().clamp(0, levels.num_train_timesteps - 1)
    return timesteps.to(device)


def image_tokens_of(latent_shape: Sequence[int], patch: int = 2) -> int:
    """Tokens of one sample for a resolution-dependent shift: patches of every (latent) frame."""
    frames = math.prod(latent_shape[2:-2]) if len(latent_shape) > 4 else 1
    return frames * (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
