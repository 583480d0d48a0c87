"""Score distillation into a few-step student: DMD2 (``--training_method dmd2``), f-distill
(``f_distill``) and LADD (``ladd``). One class, three settings of it.

Every step, on a batch of the dataset's prompts (and its latents, the "real" side of the discriminator):

1. the **student** turns pure noise into a clean sample in ``student_sample_steps`` steps: a random
   exit step is drawn, the steps before it run without gradients (as diffusers samples), and the exit
   step's clean estimate is the generated sample (levels.py);
2. on a student step (every ``student_update_freq``-th) its loss is returned to the trainer, which
   runs the backward and steps the student's optimizer and schedule:

   * DMD2: the distribution-matching gradient. The generated sample is re-noised at a ``sample_t_cfg``
     timestep; the frozen teacher (with classifier-free guidance at ``guidance_scale``) and the fake
     score each estimate the clean sample, and the student's sample descends the gradient
     ``fake - teacher``, towards the teacher (objectives/distillation.py). ``gan_loss_weight_gen`` adds
     the non-saturating generator loss of a discriminator head on the fake score's middle-block features;
   * f-distill: the same gradient, weighted per sample by ``h(r)`` of the chosen f-divergence, with
     ``r`` the teacher/student density ratio the discriminator's logit estimates (clipped to
     ``ratio_lower`` / ``ratio_upper``);
   * LADD: only the generator loss, the discriminator reading the frozen teacher's features;

   on the other steps the trainer does not touch the student (``LossOutput.updates_model``);
3. every step the **critic** takes one optimizer step of its own (critic.py): the fake score's
   denoising loss on the (detached) generated sample, plus the discriminator's logistic loss on
   re-noised real and generated latents (LADD: that loss plus the R1 penalty ``gan_r1_reg_weight``,
   measured by finite differences: how much the logit of a real latent moves when the latent is
   perturbed by ``gan_r1_reg_alpha`` times fresh noise, as FastGen does; the exact penalty would need
   a second backward through the teacher, which costs as much memory as training it and which CPU
   attention kernels do not even provide).

The generator term's gradient is taken inside the method (``torch.autograd.grad`` through the
discriminator, with the discriminator's network active) and handed to the trainer as a surrogate with
that gradient and the loss's value: the trainer's backward then only walks the student's own graph,
which matters under gradient checkpointing, where a block is recomputed with whichever adapter is
active at backward time.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from simpletuner.methods.base import LossOutput, MethodContext
from simpletuner.methods.distillation.critic import Critic
from simpletuner.methods.distillation.discriminator import FeatureTap
from simpletuner.methods.distillation.levels import (NoiseLevels, StudentSchedule, image_tokens_of, rollout,
                                                     sample_noising_timesteps)
from simpletuner.methods.distillation.networks import ScoreNetworks, prompt_conditioning
from simpletuner.methods.distillation.settings import DistillationSettings, distillation_settings
from simpletuner.objectives import distillation as losses

logger = logging.getLogger(__name__)


def value_with_gradient(tensor: torch.Tensor, gradient: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``tensor`` is ``gradient``."""
    product = (tensor * gradient.to(tensor.dtype)).sum()
    return product - product.detach() + value.detach()


def student_targets(model) -> list[str]:
    """The layers the fake score's adapter sits on: the student LoRA's own layers (so switching adapters
    never leaves a student layer active inside the fake score), or, for a full student, the family's
    default LoRA targets."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [name for name, module in model.denoiser.named_modules() if isinstance(module, BaseTunerLayer)]
    return adapted or model.lora_target_modules()


class ScoreDistillation:
    """DMD2, f-distill or LADD (``kind``); see the module docstring."""

    def __init__(self, model, config, kind: str, settings: DistillationSettings | None = None):
        self.model = model
        self.kind = kind
        self.settings = settings or distillation_settings(config)
        self.levels = NoiseLevels.of(model)
        # Flux-style families take guidance as an input embedding (the family's predict passes it), not
        # as two passes: no classifier-free guidance on top unless asked for
        self.embedded_guidance = bool(model.info.validation.embedded_guidance)
        default_guidance = 1.0 if self.embedded_guidance else config.validation_guidance
        self.guidance_scale = float(self.settings.guidance_scale if self.settings.guidance_scale is not None
                                    else default_guidance)
        self.adversarial_generator = kind == "ladd" or self.settings.gan_loss_weight_gen > 0
        self.uses_discriminator = self.adversarial_generator or kind == "f_distill"
        rank = self.settings.fake_score_rank or config.lora_rank or 16
        self.networks = ScoreNetworks(model, student_targets(model), rank,
                                      lora_student=config.model_type == "lora", with_fake_score=kind != "ladd")
        self.tap = FeatureTap(model) if self.uses_discriminator else None
        # LADD's critic is only a discriminator: beta1 0, as adversarial training usually runs Adam, so its
        # steps follow the generator's moves without momentum from older ones
        self.critic = Critic(self.networks.fake_parameters, self.settings.fake_score_lr or config.learning_rate,
                             self.settings.fake_score_warmup_steps, weight_decay=float(config.adam_weight_decay or 0.0),
                             betas=(0.0 if kind == "ladd" else 0.9, 0.999), max_grad_norm=config.max_grad_norm)
        self.schedule: StudentSchedule | None = None  # needs the latent size (a flow scheduler's shift)
        self.student_updates = 0
        self.encode_text_live = False
        self._describe(config, rank)

    def _describe(self, config, rank: int) -> None:
        """One log line: which network is which, and the weights they hold against three separate models."""
        held, base = self.networks.held_weight_bytes()
        host = "the student's base" if self.networks.lora_student else "a frozen copy of the denoiser"
        fake = "no fake score" if self.kind == "ladd" else f"fake score = LoRA rank {rank} on {host}"
        logger.info("%s: teacher = %s with adapters off, guidance %g; %s; student samples in %d step(s), learns every "
                    "%d step(s); weights held %.1f MB (three separate models: %.1f MB)", self.kind, host,
                    self.guidance_scale, fake, self.settings.student_sample_steps, self.settings.student_update_freq,
                    held / 2**20, 3 * base / 2**20)

    # --- the seam ------------------------------------------------------------------------------------

    def bind(self, context: MethodContext) -> None:
        self.critic.average_gradients = context.average_gradients

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {}  # the critic trains itself (critic.py); the student is the trainer's

    def state_dict(self) -> dict[str, Any]:
        return {"fake_score": self.networks.fake_score_state(), "critic": self.critic.state_dict(),
                "student_updates": self.student_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.networks.load_fake_score_state(state["fake_score"])
        self.critic.load_state_dict(state["critic"])
        self.student_updates = int(state["student_updates"])

    def validation_defaults(self) -> dict[str, Any]:
        """The student samples at its own step count without classifier-free guidance (the teacher's
        guidance is distilled into it); DDPM families through Euler at the student's timesteps."""
        steps = self.settings.student_sample_steps
        defaults: dict[str, Any] = {"validation_num_inference_steps": steps}
        if not self.embedded_guidance:  # an embedded guidance value stays the family's
            defaults["validation_guidance"] = 1.0
        if self.levels.flow:
            defaults["sampling_scheduler"] = "FlowMatchEulerDiscreteScheduler"
        else:
            defaults["sampling_scheduler"] = "EulerDiscreteScheduler"
            defaults["sampling_timesteps"] = self.sampling_timesteps()
        return defaults

    def sampling_timesteps(self) -> list[int]:
        """DDPM families: the timesteps a pipeline should sample the student at."""
        from simpletuner.methods.distillation.levels import trailing_timesteps

        if self.settings.student_timesteps:
            return list(self.settings.student_timesteps)
        return trailing_timesteps(self.settings.student_sample_steps, self.levels.num_train_timesteps)

    # --- pieces --------------------------------------------------------------------------------------

    def _predict(self, sample: torch.Tensor, timesteps: torch.Tensor, text: dict, batch: dict) -> torch.Tensor:
        dtype = self.model.weight_dtype
        model_timesteps = timesteps if self.levels.flow else timesteps.round().long()
        return self.model.predict(sample.to(dtype), model_timesteps, {k: v.to(dtype) for k, v in text.items()},
                                  batch=batch)

    def _schedule_for(self, latents: torch.Tensor) -> StudentSchedule:
        if self.schedule is None:
            self.schedule = StudentSchedule.for_model(
                self.model, self.levels, self.settings.student_sample_steps, self.settings.student_timesteps,
                image_tokens_of(latents.shape, getattr(self.model, "flow_patch_size", 2)))
        return self.schedule

    def generate(self, noise: torch.Tensor, text: dict, batch: dict, exit_step: int) -> torch.Tensor:
        """The student's clean sample from ``noise``, leaving it at ``exit_step`` (grad mode: the caller's)."""
        schedule = self._schedule_for(noise)
        return rollout(noise, schedule, self.levels, exit_step,
                       lambda sample, timesteps: self._predict(sample, timesteps, text, batch))

    def teacher_estimate(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict, unconditional: dict,
                         batch: dict) -> torch.Tensor:
        """The guided teacher's clean estimate (no gradients)."""
        guided = self.networks.guided_teacher(lambda sample, t, prompts: self._predict(sample, t, prompts, batch),
                                              noisy, timesteps, text, unconditional, self.guidance_scale)
        return self.levels.clean_estimate(guided, noisy, timesteps)

    def discriminator_network(self):
        """Whose features the discriminator reads: the fake score's (DMD2, f-distill) or the teacher's (LADD)."""
        return self.networks.teacher() if self.kind == "ladd" else self.networks.fake_score()

    def _logits(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict, batch: dict) -> torch.Tensor:
        """Discriminator logits of ``noisy`` (inside :meth:`discriminator_network`)."""
        with self.tap.recording():
            self._predict(noisy, timesteps, text, batch)
            features = self.tap.take()
        return self.critic.discriminator(features)(features)

    # --- the student's loss ----------------------------------------------------------------------------

    def distribution_matching(self, generated: torch.Tensor, text: dict, unconditional: dict,
                              batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        timesteps = sample_noising_timesteps(generated.shape[0], self.levels, self.settings.sample_t_cfg,
                                             generated.device)
        noisy = self.levels.noised(generated.detach().float(), torch.randn_like(generated, dtype=torch.float32),
                                   timesteps)
        teacher = self.teacher_estimate(noisy, timesteps, text, unconditional, batch)
        weights = None
        with torch.no_grad(), self.networks.fake_score():
            if self.kind == "f_distill":
                with self.tap.recording():
                    fake_output = self._predict(noisy, timesteps, text, batch)
                    features = self.tap.take()
                logits = self.critic.discriminator(features)(features)
                weights = losses.f_divergence_weights(self.settings.f_div, logits, self.settings.ratio_lower,
                                                      self.settings.ratio_upper)
            else:
                fake_output = self._predict(noisy, timesteps, text, batch)
        fake = self.levels.clean_estimate(fake_output, noisy, timesteps)
        gradient = losses.dmd_gradient(generated.detach(), teacher, fake)
        loss = losses.dmd_loss(generated, gradient, weights)
        logs = {"dmd": float(loss.detach())}
        if weights is not None:
            logs["f_weight_mean"] = float(weights.mean())
        return loss, logs

    def generator_adversarial(self, generated: torch.Tensor, text: dict, batch: dict) -> tuple[torch.Tensor, float]:
        """The generator's GAN loss as a surrogate on ``generated`` (see the module docstring)."""
        leaf = generated.detach().float().requires_grad_(True)
        timesteps = sample_noising_timesteps(leaf.shape[0], self.levels, self.settings.sample_t_cfg, leaf.device)
        noisy = self.levels.noised(leaf, torch.randn_like(leaf), timesteps)
        with self.discriminator_network():
            loss = losses.generator_gan_loss(self._logits(noisy, timesteps, text, batch))
            (gradient,) = torch.autograd.grad(loss, leaf)
        return value_with_gradient(generated, gradient, loss), float(loss.detach())

    def student_loss(self, generated: torch.Tensor, text: dict, unconditional: dict,
                     batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if self.kind == "ladd":
            loss, value = self.generator_adversarial(generated, text, batch)
            return loss, {"gan_gen": value}
        loss, logs = self.distribution_matching(generated, text, unconditional, batch)
        if self.settings.gan_loss_weight_gen > 0:
            adversarial, value = self.generator_adversarial(generated, text, batch)
            loss = loss + self.settings.gan_loss_weight_gen * adversarial
            logs["gan_gen"] = value
        return loss, logs

    # --- the critic's step -------------------------------------------------------------------------------

    def critic_step(self, generated: torch.Tensor, real: torch.Tensor, text: dict, batch: dict) -> dict[str, float]:
        """One optimizer step of the fake score and / or discriminator on ``generated`` (detached)."""
        generated = generated.detach().float()
        timesteps = sample_noising_timesteps(generated.shape[0], self.levels, self.settings.sample_t_cfg,
                                             generated.device)
        noise = torch.randn_like(generated)
        noisy = self.levels.noised(generated, noise, timesteps)
        logs: dict[str, float] = {}
        loss = torch.zeros((), device=generated.device)
        with self.discriminator_network():
            if self.kind != "ladd":
                recording = self.tap.recording() if self.uses_discriminator else contextlib.nullcontext()
                with recording:
                    output = self._predict(noisy, timesteps, text, batch)
                    fake_features = self.tap.take() if self.uses_discriminator else None
                target = self.levels.training_target(generated, noise, timesteps)
                denoising = torch.nn.functional.mse_loss(output.float(), target.float())
                loss = loss + denoising
                logs["fake_score"] = float(denoising.detach())
            if self.uses_discriminator:
                loss = loss + self._discriminator_loss(noisy, fake_features if self.kind != "ladd" else None,
                                                       real, timesteps, text, batch, logs)
            norm = self.critic.step(loss)
        if norm is not None:
            logs["critic_grad_norm"] = norm
        return logs

    def _discriminator_loss(self, noisy_fake: torch.Tensor, fake_features: torch.Tensor | None, real: torch.Tensor,
                            timesteps: torch.Tensor, text: dict, batch: dict, logs: dict[str, float]) -> torch.Tensor:
        real = real.detach().float()
        noisy_real = self.levels.noised(real, torch.randn_like(real), timesteps)
        r1 = self.kind == "ladd" and self.settings.gan_r1_reg_weight > 0
        real_logits = self._logits(noisy_real, timesteps, text, batch)
        if fake_features is None:
            fake_logits = self._logits(noisy_fake, timesteps, text, batch)
        else:
            fake_logits = self.critic.discriminator(fake_features)(fake_features)
        loss = losses.discriminator_gan_loss(real_logits, fake_logits)
        logs["gan_disc"] = float(loss.detach())
        weighted = loss if self.kind == "ladd" else self.settings.gan_loss_weight_disc * loss
        if r1:  # by finite differences: a second backward through the teacher costs its training memory
            penalty = losses.approximate_r1_penalty(lambda inputs: self._logits(inputs, timesteps, text, batch),
                                                    noisy_real, self.settings.gan_r1_reg_alpha, real_logits=real_logits)
            logs["r1"] = float(penalty.detach())
            weighted = weighted + self.settings.gan_r1_reg_weight * penalty
        return weighted

    # --- one batch ---------------------------------------------------------------------------------------

    def exit_step(self) -> int:
        steps = self.settings.student_sample_steps
        return 0 if steps == 1 else int(torch.randint(0, steps, ()))

    def updates_student(self, step: int) -> bool:
        return step % self.settings.student_update_freq == 0

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        model = self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        real = model.latents_from_cache(cached)
        text, unconditional = prompt_conditioning(model, batch, device, real.shape[0])
        noise = torch.randn_like(real)
        exit_step = self.exit_step()
        logs: dict[str, float] = {}
        if self.updates_student(step):
            generated = self.generate(noise, text, batch, exit_step)
            loss, logs = self.student_loss(generated, text, unconditional, batch)
            self.student_updates += 1
        else:
            with torch.no_grad():
                generated = self.generate(noise, text, batch, exit_step)
            loss = None
        logs.update(self.critic_step(generated, real, text, batch))
        if loss is None:
            return LossOutput(torch.zeros((), device=device), logs, updates_model=False)
        return LossOutput(loss, logs)


def build_dmd2(model, config) -> ScoreDistillation:
    return ScoreDistillation(model, config, "dmd2")


def build_f_distill(model, config) -> ScoreDistillation:
    return ScoreDistillation(model, config, "f_distill")


def build_ladd(model, config) -> ScoreDistillation:
    return ScoreDistillation(model, config, "ladd")
