"""Causal video distillation: CausVid (``--training_method causvid``) and Self-Forcing
(``--training_method self_forcing``) for Wan text-to-video.

Both distil the bidirectional teacher into a *causal* few-step student: one that generates a clip
chunk by chunk, each chunk of ``--causal_chunk_frames`` latent frames denoised in ``student_sample_steps``
steps while attending to the chunks before it through a key/value cache (simpletuner/models/wan_causal.py),
those chunks sitting at the small noise level ``--context_noise`` (a sigma; 0 is clean). Everything
after the generation is DMD2's (score_distillation.py): the guided teacher and the fake score judge the
whole generated clip, the optional discriminator, the critic's own optimizer, the state and the
validation are the parent's; only :meth:`generate` differs.

Per clip (the cache is cleared before and after it), for chunk ``k``:

1. the student denoises chunk ``k``'s noise through its schedule, reading the cache; the steps before
   the chunk's *exit step* run without gradients and the exit step's clean estimate is the chunk's
   output, carrying the gradient (levels.rollout);
2. before chunk ``k + 1``, one forward in writing mode puts a context version of chunk ``k``, re-noised
   at ``context_noise``, into the cache (no gradient: the student never learns through its context).

The two differ in what that context is, which is the difference between the two papers:

* **CausVid** (Yin et al. 2025) trains the causal student on the dataset's own clips as context
  (teacher forcing; with ``context_noise`` > 0, the noisy context of diffusion forcing): chunk ``k`` is
  generated after the *real* chunks before it. Each chunk draws its own exit step, as DMD2 draws one.
* **Self-Forcing** (Huang et al. 2025) conditions on the student's *own* previous chunks, as at
  inference, so training sees the errors it will compound. ``enable_gradient_in_rollout`` (default on)
  draws a stochastic exit step (``same_step_across_blocks``: one for every chunk, otherwise one per
  chunk); off, every chunk runs its whole schedule and only its final step carries the gradient.

Only Wan's single-transformer text-to-video checkpoints are supported (the config rules refuse the
rest before a model loads; :class:`CausalDistillation` checks the loaded checkpoint again).
"""

from __future__ import annotations

import torch

from simpletuner.methods.distillation.levels import rollout
from simpletuner.methods.distillation.score_distillation import ScoreDistillation
from simpletuner.objectives.causal import chunk_count


def chunk_bounds(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """``(start, stop)`` latent frames of every chunk (the last one may be shorter)."""
    return [(index * chunk_frames, min(frames, (index + 1) * chunk_frames))
            for index in range(chunk_count(frames, chunk_frames))]


def refuse_unsupported_checkpoint(model, kind: str) -> None:
    """The cache drives one Wan transformer on text-to-video chunks; a checkpoint that is something else
    (known only once loaded when the config gave a model path without a flavour) is refused here."""
    shape = getattr(model, "shape", None)
    if model.family != "wan" or shape is None:
        raise ValueError(f"--training_method {kind} is built for Wan; {model.family} is not supported")
    if shape.two_experts:
        raise ValueError(f"--training_method {kind} drives one Wan transformer chunk by chunk; this checkpoint has "
                         "two experts (Wan 2.2 A14B). Use a Wan 2.1 T2V or the Wan 2.2 5B text-to-video checkpoint")
    if shape.image_to_video or shape.image_embeds:
        raise ValueError(f"--training_method {kind} distils text-to-video; this checkpoint is image-to-video, whose "
                         "first-frame conditioning spans the whole clip. Use a text-to-video Wan checkpoint")


class CausalDistillation(ScoreDistillation):
    """DMD2 with a causal, chunk-by-chunk student (see the module docstring); subclasses choose the
    chunks' exit steps and their context."""

    def __init__(self, model, config, kind: str, settings=None):
        refuse_unsupported_checkpoint(model, kind)
        super().__init__(model, config, kind, settings)
        from simpletuner.models.wan_causal import ChunkCache

        self.chunk_frames = int(config.causal_chunk_frames)
        self.context_noise = float(config.context_noise)
        # attached after the parent's set-up: a full student's frozen teacher copy keeps its plain processors
        self.cache = ChunkCache(model.denoiser)

    # --- what the two methods choose ---------------------------------------------------------------------

    def chunk_exit_steps(self, chunks: int, exit_step: int) -> list[int]:
        """The exit step of every chunk (``exit_step`` is the one the parent drew for this batch)."""
        return [exit_step] + [self.exit_step() for _ in range(chunks - 1)]

    def context_source(self, generated: torch.Tensor, start: int, stop: int, batch: dict) -> torch.Tensor:
        """The clean frames ``start:stop`` that go into the cache once that chunk is done."""
        raise NotImplementedError

    # --- the rollout ---------------------------------------------------------------------------------------

    def generate(self, noise: torch.Tensor, text: dict, batch: dict, exit_step: int) -> torch.Tensor:
        """The student's clip, chunk by chunk from ``noise`` ``[B, C, F, H, W]`` (grad mode: the caller's)."""
        if noise.dim() != 5:
            raise ValueError(f"--training_method {self.kind} generates video latents [B, C, F, H, W]; got latents of "
                             f"shape {tuple(noise.shape)} (an image dataset?); train on video clips")
        schedule = self._schedule_for(noise)
        bounds = chunk_bounds(noise.shape[2], self.chunk_frames)
        exits = self.chunk_exit_steps(len(bounds), exit_step)

        def student(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self._predict(sample, timesteps, text, batch)

        self.cache.clear()
        chunks: list[torch.Tensor] = []
        try:
            for index, (start, stop) in enumerate(bounds):
                with self.cache.reading():
                    chunks.append(rollout(noise[:, :, start:stop], schedule, self.levels, exits[index], student))
                if index + 1 < len(bounds):
                    self.write_context(self.context_source(chunks[-1], start, stop, batch), text, batch)
        finally:
            self.cache.clear()
        return torch.cat(chunks, dim=2)

    def write_context(self, clean: torch.Tensor, text: dict, batch: dict) -> None:
        """One writing forward of ``clean`` re-noised at ``context_noise``: its keys and values join the cache."""
        clean = clean.detach().float()
        timesteps = torch.full((clean.shape[0],), self.context_noise * self.levels.num_train_timesteps,
                               device=clean.device)
        noisy = self.levels.noised(clean, torch.randn_like(clean), timesteps)
        with self.cache.writing():
            self._predict(noisy, timesteps, text, batch)


class CausVid(CausalDistillation):
    """Context = the dataset clip's own chunks (teacher forcing); each chunk draws its exit step."""

    def __init__(self, model, config, settings=None):
        super().__init__(model, config, "causvid", settings)

    def context_source(self, generated: torch.Tensor, start: int, stop: int, batch: dict) -> torch.Tensor:
        cached = {"latent_mean": batch["latent_mean"][:, :, start:stop].to(generated.device),
                  "latent_std": batch["latent_std"][:, :, start:stop].to(generated.device)}
        return self.model.latents_from_cache(cached)


class SelfForcing(CausalDistillation):
    """Context = the student's own previous chunks; the exit step follows the two settings."""

    def __init__(self, model, config, settings=None):
        super().__init__(model, config, "self_forcing", settings)

    def chunk_exit_steps(self, chunks: int, exit_step: int) -> list[int]:
        if not self.settings.enable_gradient_in_rollout:
            return [self.settings.student_sample_steps - 1] * chunks
        if self.settings.same_step_across_blocks:
            return [exit_step] * chunks
        return super().chunk_exit_steps(chunks, exit_step)

    def context_source(self, generated: torch.Tensor, start: int, stop: int, batch: dict) -> torch.Tensor:
        return generated


def build_causvid(model, config) -> CausVid:
    return CausVid(model, config)


def build_self_forcing(model, config) -> SelfForcing:
    return SelfForcing(model, config)
