"""Scheduled sampling (rollout) for supervised fine-tuning, with ReflexFlow for flow-matching models.

Why: at inference the denoiser is fed its own previous outputs, which drift away from the perfectly
noised inputs it saw in training (exposure bias). Scheduled sampling shows it some of that drift
during training: for a sample trained at noise level ``t`` it noises the clean latents at a higher
level ``t + k`` instead, lets the current model denoise them back down to ``t`` without gradients,
and trains on that self-made input with the ordinary target for ``t`` (the clean latents and the
original noise decide the target, so the model learns to steer its own drift back).

Units. The offset ``k`` counts solver steps on the training schedule's own grid of noise levels,
listed from most to least noisy: for DDPM families the integer timesteps ``T-1 .. 0``, for flow
families the scheduler's sigma table (``FlowMatchEulerDiscreteScheduler.sigmas``, shifted as that
scheduler shifts them). The rollout starts ``k`` grid entries above ``t`` (fewer when the top of the
schedule is reached), steps through the grid entries between, and its last step lands exactly on
``t``. Every sample carries its own grid, so one batched model call advances the whole batch; a
sample whose rollout is shorter (or that was not picked) stays put through the extra calls.

Solvers (``--scheduled_sampling_sampler``, :mod:`simpletuner.methods.rollout_solvers`). ``unipc``
(the default: UniPC multistep, data prediction, ``bh2``, predictor plus a corrector that reuses the
next step's model call) and ``dpm`` (DPM-Solver++ multistep) cost one model call per step and combine
up to ``--scheduled_sampling_order`` (1 to 3, default 2) past model outputs; ``euler`` costs one call
per step; ``rk4`` (classic Runge-Kutta on the probability-flow ODE) four. diffusers' ``step()``
methods keep one position for the whole batch, so they cannot advance rows that sit at different
noise levels; the solvers here do the same arithmetic per row (their multistep history and order
lowering too), and the tests step diffusers' schedulers over one row's path and compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simpletuner.methods.rollout_solvers import DdpmLevels, FlowLevels, NoiseLevels, solve_rollout

STRATEGIES = ("uniform", "biased_early", "biased_late")


@dataclass(frozen=True)
class ScheduledSamplingSettings:
    """The ``--scheduled_sampling_*`` options, read once per run."""

    max_step_offset: int = 0
    strategy: str = "uniform"
    probability: float = 0.0
    prob_start: float = 0.0
    prob_end: float = 0.5
    ramp_steps: int = 0
    start_step: float = 0.0
    ramp_shape: str = "linear"
    sampler: str = "unipc"
    order: int = 2
    reflexflow: bool = False
    reflexflow_alpha: float = 1.0
    reflexflow_beta1: float = 10.0
    reflexflow_beta2: float = 1.0

    @classmethod
    def from_config(cls, config, flow: bool) -> "ScheduledSamplingSettings":
        """``flow``: the model trains flow matching; ReflexFlow defaults to on there (when rollouts are
        enabled) and is never used elsewhere."""
        offset = int(config.scheduled_sampling_max_step_offset or 0)
        reflex = config.scheduled_sampling_reflexflow
        reflex = (offset > 0) if reflex is None else bool(reflex)
        return cls(
            max_step_offset=offset, strategy=config.scheduled_sampling_strategy,
            probability=float(config.scheduled_sampling_probability),
            prob_start=float(config.scheduled_sampling_prob_start), prob_end=float(config.scheduled_sampling_prob_end),
            ramp_steps=int(config.scheduled_sampling_ramp_steps),
            start_step=float(config.scheduled_sampling_start_step),
            ramp_shape=config.scheduled_sampling_ramp_shape, sampler=config.scheduled_sampling_sampler,
            order=int(config.scheduled_sampling_order),
            reflexflow=flow and reflex, reflexflow_alpha=float(config.scheduled_sampling_reflexflow_alpha),
            reflexflow_beta1=float(config.scheduled_sampling_reflexflow_beta1),
            reflexflow_beta2=float(config.scheduled_sampling_reflexflow_beta2),
        )


def rollout_probability(settings: ScheduledSamplingSettings, step: int) -> float:
    """The chance that a sample is rolled out at optimizer step ``step``.

    Without a ramp (``ramp_steps`` 0) it is ``probability``. With one, it holds ``prob_start`` until
    ``start_step``, moves to ``prob_end`` over ``ramp_steps`` steps (a straight line, or half a cosine
    wave that starts and ends flat) and stays at ``prob_end`` afterwards.
    """
    if settings.ramp_steps <= 0:
        return settings.probability
    progress = min(max((step - settings.start_step) / settings.ramp_steps, 0.0), 1.0)
    if settings.ramp_shape == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return settings.prob_start + (settings.prob_end - settings.prob_start) * progress


def offset_weights(max_step_offset: int, strategy: str) -> torch.Tensor:
    """Relative chance of each offset ``1 .. max_step_offset``: equal (uniform), falling linearly
    with the offset (biased_early: short rollouts) or rising linearly (biased_late: long ones)."""
    offsets = torch.arange(1, max_step_offset + 1, dtype=torch.float64)
    if strategy == "uniform":
        return torch.ones_like(offsets)
    if strategy == "biased_early":
        return max_step_offset + 1 - offsets
    if strategy == "biased_late":
        return offsets
    raise ValueError(f"unknown scheduled sampling strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def draw_offsets(count: int, max_step_offset: int, strategy: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` rollout offsets in ``1 .. max_step_offset`` (int64, on the CPU)."""
    weights = offset_weights(max_step_offset, strategy)
    return torch.multinomial(weights, count, replacement=True, generator=generator) + 1


def noise_level_grid(scheduler, flow: bool) -> torch.Tensor:
    """The schedule's noise levels from most to least noisy (float64): DDPM timesteps ``T-1 .. 0``, or
    the flow scheduler's sigma table without its terminal zero."""
    if not flow:
        return torch.arange(scheduler.config.num_train_timesteps - 1, -1, -1, dtype=torch.float64)
    from diffusers import FlowMatchEulerDiscreteScheduler

    # A fresh instance: the run's scheduler may have been set to an inference schedule by validation.
    table = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config).sigmas.to(torch.float64)
    table = table[table > 0]
    return torch.sort(table, descending=True).values


def rollout_paths(grid: torch.Tensor, levels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-sample noise-level paths, shape ``(batch, max(offsets) + 1)``.

    Row ``i`` starts at the grid entry ``offsets[i]`` places above ``levels[i]`` (or the top of the
    grid), visits the grid entries in between and ends at ``levels[i]`` itself; it is then padded with
    ``levels[i]`` so every row has the same length. A row whose offset is 0 (sample not rolled out) or
    whose level is already at the top of the grid is ``levels[i]`` throughout. Each row strictly
    decreases until it reaches ``levels[i]``.
    """
    length = int(offsets.max()) + 1 if offsets.numel() else 1
    paths = levels.to(torch.float64).view(-1, 1).repeat(1, length)
    for row, (level, offset) in enumerate(zip(levels.tolist(), offsets.tolist())):
        above = int((grid > level).sum())  # grid entries noisier than this sample's level: indices 0 .. above-1
        start = max(above - int(offset), 0)
        steps = grid[start:above]
        paths[row, :steps.numel()] = steps
    return paths


def low_frequency_magnitude(bias: torch.Tensor) -> torch.Tensor:
    """``|blur(bias)|`` with a 3x3 box blur over the last two (spatial) axes: the coarse part of the
    exposure bias, which the finer detail averages out of."""
    height, width = bias.shape[-2:]
    flat = bias.float().reshape(-1, 1, height, width)
    blurred = F.avg_pool2d(flat, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return blurred.reshape(bias.shape).abs()


def reflexflow_weights(bias: torch.Tensor, alpha: float, beta2: float, rolled: torch.Tensor) -> torch.Tensor:
    """Per-element loss weights of ReflexFlow's frequency compensation.

    The spec names the term "frequency-compensated weighting derived from exposure bias" and scales it
    by ``alpha`` (and the reweighted loss by ``beta2``) without a formula. Our reading: the weight is
    ``beta2 * (1 + alpha * m / mean(m))`` where ``m`` is the low-frequency magnitude of the exposure
    bias (rolled-out input minus the ideally noised input) and the mean is per sample, so regions the
    rollout pushed furthest off course count more. Samples that were not rolled out keep weight 1.
    """
    magnitude = low_frequency_magnitude(bias)
    mean = magnitude.flatten(1).mean(dim=1).view(-1, *([1] * (bias.dim() - 1)))
    weights = beta2 * (1 + alpha * magnitude / (mean + 1e-8))
    shape = (-1, *([1] * (bias.dim() - 1)))
    return torch.where(rolled.view(shape), weights, torch.ones_like(weights)).detach()


def anti_drift_term(prediction: torch.Tensor, rolled_input: torch.Tensor, latents: torch.Tensor,
                    rolled: torch.Tensor) -> torch.Tensor:
    """ReflexFlow's directional regulariser, averaged over the rolled-out samples.

    The velocity that carries the (drifted) rolled-out input straight back to the clean latents points
    along ``rolled_input - latents`` (on the ideal path this is ``sigma * (noise - latents)``, the
    ordinary target's direction). The term is ``1 - cosine(prediction, rolled_input - latents)``: the
    model is pushed to aim at the clean sample from where it actually is.
    """
    direction = (rolled_input.float() - latents.float()).flatten(1)
    cosine = F.cosine_similarity(prediction.float().flatten(1), direction, dim=1)
    return ((1 - cosine) * rolled.float()).sum() / rolled.float().sum().clamp(min=1)


class ScheduledSampling:
    """Replaces part of a batch's noisy input by the current model's own rollout; one per run."""

    def __init__(self, model, scheduler, settings: ScheduledSamplingSettings, flow: bool):
        self.model = model
        self.scheduler = scheduler
        self.settings = settings
        self.flow = flow
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.grid = noise_level_grid(scheduler, flow)
        self.levels: NoiseLevels = (FlowLevels(self.num_train_timesteps) if flow
                                    else DdpmLevels(scheduler.alphas_cumprod, model.prediction_type))

    def pick(self, batch_size: int, step: int) -> torch.Tensor:
        """Each sample's rollout offset this step (0: not rolled out), drawn from the global RNG (which
        the checkpoint restores). Draws nothing when the probability is 0."""
        probability = rollout_probability(self.settings, step)
        if probability <= 0:
            return torch.zeros(batch_size, dtype=torch.long)
        chosen = torch.rand(batch_size) < probability
        offsets = draw_offsets(batch_size, self.settings.max_step_offset, self.settings.strategy)
        return torch.where(chosen, offsets, torch.zeros_like(offsets))

    def levels_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Training timesteps as grid noise levels (flow: sigma = timestep / T)."""
        levels = timesteps.detach().to("cpu", torch.float64)
        return levels / self.num_train_timesteps if self.flow else levels

    def source_input(self, latents: torch.Tensor, input_noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The clean latents noised at each row's starting level."""
        if self.flow:
            sigma = levels.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
            return ((1 - sigma) * latents.float() + sigma * input_noise.float()).to(latents.dtype)
        return self.scheduler.add_noise(latents, input_noise, levels.to(latents.device).long())

    @torch.no_grad()
    def rollout(self, latents: torch.Tensor, input_noise: torch.Tensor, paths: torch.Tensor,
                text: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Noise at ``paths[:, 0]`` and walk every row down its path with the current model and the
        configured solver, batched. Rows whose path has ended stay exactly where they are."""
        model = self.model
        dtype = model.weight_dtype
        device = latents.device
        text = {key: value.to(dtype) for key, value in text.items()}

        def evaluate(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return model.predict(sample.to(dtype), timesteps.to(device), text, batch=batch)

        start = self.source_input(latents, input_noise, paths[:, 0])
        rolled = solve_rollout(self.settings.sampler, self.settings.order, start, paths, evaluate, self.levels)
        return rolled.to(latents.dtype)

    def apply(self, noised, latents: torch.Tensor, input_noise: torch.Tensor, text: dict[str, torch.Tensor],
              batch: dict, step: int):
        """``noised`` (a :class:`~simpletuner.methods.sft.NoisedBatch`) with the picked samples' input
        replaced by their rollout; targets, timesteps and weights unchanged. With ReflexFlow, the
        batch also carries its element weights and anti-drift term."""
        offsets = self.pick(latents.shape[0], step)
        rolled = offsets > 0
        noised.logs["scheduled_sampling_fraction"] = float(rolled.float().mean())
        if not bool(rolled.any()):
            return noised
        paths = rollout_paths(self.grid, self.levels_of(noised.timesteps), offsets)
        rolled_input = self.rollout(latents, input_noise, paths, text, batch)
        rolled = rolled.to(latents.device)
        ideal = noised.noisy
        noised.noisy = torch.where(rolled.view(-1, *([1] * (latents.dim() - 1))), rolled_input, ideal)
        if self.settings.reflexflow:
            self.add_reflexflow(noised, ideal, latents, rolled)
        return noised

    def add_reflexflow(self, noised, ideal: torch.Tensor, latents: torch.Tensor, rolled: torch.Tensor) -> None:
        settings = self.settings
        noised.element_weights = reflexflow_weights(noised.noisy - ideal, settings.reflexflow_alpha,
                                                    settings.reflexflow_beta2, rolled)
        rolled_input = noised.noisy
        beta1 = settings.reflexflow_beta1

        def regularize(prediction: torch.Tensor) -> torch.Tensor:
            term = anti_drift_term(prediction, rolled_input, latents, rolled)
            noised.logs["reflexflow_anti_drift"] = float(term.detach())
            return beta1 * term

        noised.regularize = regularize


def build_scheduled_sampling(model, scheduler, config, flow: bool) -> ScheduledSampling | None:
    """The run's scheduled sampling, or None when ``--scheduled_sampling_max_step_offset`` is 0."""
    if not config.scheduled_sampling_max_step_offset:
        return None
    return ScheduledSampling(model, scheduler, ScheduledSamplingSettings.from_config(config, flow), flow)
