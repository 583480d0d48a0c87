"""Latent consistency distillation (``--training_method lcm`` or ``--distillation_method lcm``): the
student learns to jump from any point of the teacher's sampling path straight to that path's clean end,
so diffusers' ``LCMScheduler`` (flow families: ``FlowMatchLCMScheduler``) samples it in 2-8 steps.

One step, on a batch of the dataset's latents and prompts:

1. a point ``t`` of the coarse timestep grid (``num_train_timesteps // lcm_skip_steps`` points, every
   ``lcm_skip_steps``-th training timestep) is drawn per sample, and the real latent is noised there;
2. the frozen teacher, with classifier-free guidance at ``guidance_scale``, takes one deterministic
   solver step from ``t`` to ``s = t - lcm_skip_steps`` (DDIM on DDPM families, Euler on flow ones);
3. the student's consistency function at ``(x_t, t)`` is pulled, by a pseudo-Huber loss, towards the
   student's own consistency function at the solver's ``(x_s, s)``, computed without gradients (the
   stop-gradient target of LCM-LoRA, which keeps no EMA copy of the student).

The consistency function of a DDPM family is LCM's ``c_skip(t) x_t + c_out(t) x0_hat(x_t, t)`` with the
boundary scalings ``LCMScheduler`` samples with (timestep scaling 10, ``sigma_data`` 0.5): at ``t = 0``
it is exactly the identity, which anchors the chain at the data. ``FlowMatchLCMScheduler`` samples with
the bare clean estimate ``x_t - sigma_t v``, which is already the identity at ``sigma = 0``, so a flow
student's consistency function is that estimate (``c_skip = 0``, ``c_out = 1``).

The teacher is the student's own base with its adapters switched off (LoRA student) or a frozen copy of
the denoiser (full student): networks.py. LCM keeps no state besides the RNGs the checkpoint restores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from simpletuner.methods.base import LossOutput, Stateless
from simpletuner.methods.distillation.levels import NoiseLevels, flow_inference_sigmas, image_tokens_of
from simpletuner.methods.distillation.networks import ScoreNetworks, prompt_conditioning
from simpletuner.methods.distillation.settings import DistillationSettings, distillation_settings

#: LCMScheduler's boundary-condition constants (its ``timestep_scaling`` default and ``sigma_data``).
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def boundary_scalings(timesteps: torch.Tensor, like: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_skip``, ``c_out`` at ``timesteps``, shaped to broadcast over ``like``.

    DDPM families use the scalings LCMScheduler applies when it samples, so the student is trained on the
    function the scheduler evaluates; flow families use none (see the module docstring)."""
    shape = (-1,) + (1,) * (like.dim() - 1)
    timesteps = timesteps.to(like.device, torch.float32).view(shape)
    if flow:
        return torch.zeros_like(timesteps), torch.ones_like(timesteps)
    scaled = timesteps * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip, c_out


def consistency_function(levels: NoiseLevels, output: torch.Tensor, sample: torch.Tensor,
                         timesteps: torch.Tensor) -> torch.Tensor:
    """The consistency function's value from a raw model ``output`` at ``(sample, timesteps)``."""
    c_skip, c_out = boundary_scalings(timesteps, sample, levels.flow)
    return c_skip * sample.float() + c_out * levels.clean_estimate(output, sample, timesteps)


def solver_step(levels: NoiseLevels, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                previous: torch.Tensor) -> torch.Tensor:
    """One deterministic step of the teacher's ODE from ``timesteps`` to ``previous``: re-noise the clean
    estimate with the noise the output implies (DDIM, eta 0; on flow families this is exactly an Euler step
    ``x + (sigma_prev - sigma) v``)."""
    clean = levels.clean_estimate(output, sample, timesteps)
    noise = levels.noise_estimate(clean, sample, timesteps)
    return levels.noised(clean, noise, previous)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Mean of ``sqrt((prediction - target)^2 + c^2) - c``: quadratic near zero, linear for outliers."""
    difference = prediction.float() - target.float()
    return ((difference ** 2 + c ** 2).sqrt() - c).mean()


@dataclass(frozen=True)
class ConsistencyGrid:
    """The timesteps the student is trained at (``points``) and where the teacher's step from each lands
    (``previous``), both in the model's timestep units (flow: ``sigma * T``)."""

    points: tuple[float, ...]
    previous: tuple[float, ...]

    @classmethod
    def ddpm(cls, num_train_timesteps: int, skip: int) -> "ConsistencyGrid":
        """Every ``skip``-th timestep ending at ``T - 1`` (LCMScheduler's own grid for ``T // skip``
        original steps); the first point steps to timestep 0."""
        count = num_train_timesteps // skip
        if count < 1:
            raise ValueError(f"distillation_config lcm_skip_steps {skip} is larger than the model's "
                             f"{num_train_timesteps} training timesteps; use at most {num_train_timesteps}")
        points = [float(index * skip - 1) for index in range(1, count + 1)]
        return cls(tuple(points), tuple(max(point - skip, 0.0) for point in points))

    @classmethod
    def flow(cls, sigmas: list[float], num_train_timesteps: int) -> "ConsistencyGrid":
        """The family scheduler's own sigmas (its shift included), noisiest first, each stepping to the next
        and the last to 0."""
        following = list(sigmas[1:]) + [0.0]
        points = [sigma * num_train_timesteps for sigma in sigmas]
        return cls(tuple(reversed(points)), tuple(reversed([sigma * num_train_timesteps for sigma in following])))

    def draw(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A grid point per sample and the point its teacher step lands on."""
        index = torch.randint(0, len(self.points), (batch,))
        points = torch.tensor(self.points, dtype=torch.float64)[index]
        previous = torch.tensor(self.previous, dtype=torch.float64)[index]
        return points.to(device), previous.to(device)


class LatentConsistencyDistillation(Stateless):
    """LCM on the method seam; see the module docstring."""

    def __init__(self, model, config, settings: DistillationSettings | None = None):
        self.model = model
        self.settings = settings or distillation_settings(config)
        self.levels = NoiseLevels.of(model)
        self.guidance_scale = float(self.settings.guidance_scale if self.settings.guidance_scale is not None
                                    else config.validation_guidance)
        # no fake score: the adapter targets and rank are unused
        self.networks = ScoreNetworks(model, [], 1, lora_student=config.model_type == "lora", with_fake_score=False)
        self.grid: ConsistencyGrid | None = None  # flow grids need the latent size (resolution-dependent shift)
        if not self.levels.flow:
            self.grid = ConsistencyGrid.ddpm(self.levels.num_train_timesteps, self.settings.lcm_skip_steps)
        self.encode_text_live = False

    def validation_defaults(self) -> dict[str, Any]:
        """LCM students sample in a few steps without classifier-free guidance (the teacher's is distilled
        in), through the LCM scheduler matching the family's noise process."""
        scheduler = "FlowMatchLCMScheduler" if self.levels.flow else "LCMScheduler"
        return {"validation_num_inference_steps": 4, "validation_guidance": 1.0, "sampling_scheduler": scheduler}

    # --- pieces --------------------------------------------------------------------------------------

    def _grid_for(self, latents: torch.Tensor) -> ConsistencyGrid:
        if self.grid is None:
            count = max(self.levels.num_train_timesteps // self.settings.lcm_skip_steps, 1)
            sigmas = flow_inference_sigmas(self.model.noise_scheduler(), count,
                                           image_tokens_of(latents.shape, getattr(self.model, "flow_patch_size", 2)))
            self.grid = ConsistencyGrid.flow(sigmas, self.levels.num_train_timesteps)
        return self.grid

    def _predict(self, sample: torch.Tensor, timesteps: torch.Tensor, text: dict, batch: dict) -> torch.Tensor:
        dtype = self.model.weight_dtype
        model_timesteps = timesteps.float() if self.levels.flow else timesteps.round().long()
        return self.model.predict(sample.to(dtype), model_timesteps, {k: v.to(dtype) for k, v in text.items()},
                                  batch=batch).float()

    def teacher_step(self, noisy: torch.Tensor, timesteps: torch.Tensor, previous: torch.Tensor, text: dict,
                     unconditional: dict, batch: dict) -> torch.Tensor:
        """The guided teacher's solver step from ``timesteps`` to ``previous`` (no gradients)."""
        guided = self.networks.guided_teacher(lambda sample, t, prompts: self._predict(sample, t, prompts, batch),
                                              noisy, timesteps, text, unconditional, self.guidance_scale)
        return solver_step(self.levels, guided, noisy, timesteps, previous)

    def target(self, stepped: torch.Tensor, previous: torch.Tensor, text: dict, batch: dict) -> torch.Tensor:
        """The student's own consistency function at the solver's point, as a constant."""
        with torch.no_grad():
            output = self._predict(stepped, previous, text, batch)
            return consistency_function(self.levels, output, stepped, previous)

    # --- one batch -----------------------------------------------------------------------------------

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached).float()
        text, unconditional = prompt_conditioning(model, batch, device, latents.shape[0])
        timesteps, previous = self._grid_for(latents).draw(latents.shape[0], device)
        noisy = self.levels.noised(latents, torch.randn_like(latents), timesteps)
        stepped = self.teacher_step(noisy, timesteps, previous, text, unconditional, batch)
        target = self.target(stepped, previous, text, batch)
        prediction = consistency_function(self.levels, self._predict(noisy, timesteps, text, batch), noisy, timesteps)
        loss = pseudo_huber(prediction, target, self.settings.lcm_huber_c)
        return LossOutput(loss, {"lcm": float(loss.detach())})


def build(model, config) -> LatentConsistencyDistillation:
    return LatentConsistencyDistillation(model, config)
