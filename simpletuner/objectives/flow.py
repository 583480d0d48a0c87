"""Flow-matching maths: noise-level (sigma) samplers, schedule shifts and timestep weighting.

Pure functions on tensors, for flow-matching families (rectified flow: Flux, SD3, Wan, ...). The
path between clean latents ``x0`` and noise ``eps`` is the straight line

    x_sigma = (1 - sigma) * x0 + sigma * eps,        sigma in [0, 1]

and the network regresses its velocity ``d x_sigma / d sigma = eps - x0``. The model is fed the
timestep ``sigma * num_train_timesteps``.

Sigma samplers (``--flow_*`` options):

* logit-normal ("sigmoid"): ``sigma = sigmoid(scale * z)``, ``z ~ N(0, 1)`` (Esser et al. 2024, SD3);
  ``--flow_sigmoid_scale`` is ``scale`` (default 1.0);
* uniform on ``[0, 1)`` (``--flow_use_uniform_schedule``);
* ``Beta(alpha, beta)`` (``--flow_use_beta_schedule`` with ``--flow_beta_schedule_alpha/beta``);
* few-step levels (``--flux_fast_schedule``): sigma is one of 1.0, 0.75, 0.5, 0.25, with pure noise
  drawn 7 times in 10 and each other level once in 10. Few-step models such as FLUX.1 [schnell]
  start every sample at pure noise and take a handful of large steps, so training concentrates on
  the levels they actually visit. These levels are final: no shift is applied to them.

Any of them can then be shifted toward the noisy end by ``k``:

    shift_k(sigma) = k * sigma / (1 + (k - 1) * sigma)

(``--flow_schedule_shift``), a monotone map of [0, 1] onto itself with ``shift_1`` the identity and
``shift_{1/k}`` its inverse. ``--flow_schedule_auto_shift`` picks ``k = exp(mu)`` from the image's
token count with the linear interpolation used by diffusers' Flux and SD3 pipelines
(``calculate_shift``: ``mu`` runs from 0.5 at 256 tokens to 1.15 at 4096 tokens, extrapolated
linearly outside that range). diffusers' ``FlowMatchEulerDiscreteScheduler`` applies ``mu`` as
``exp(mu) / (exp(mu) + (1/sigma - 1))``, which is algebraically the same shift with ``k = exp(mu)``.

:class:`ShiftedDiscreteSchedule` is the discrete training table of the DiffSynth-style flow-matching
SFT loss (spec 004): 1000 linearly spaced raw sigmas from ``sigma_max`` towards ``sigma_min``,
shifted, with a bell-shaped weight per entry that favours middle noise levels; the loss of a sample
is multiplied by the weight of its timestep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Loss weightings a flow family can select over the sampled timesteps.
FLOW_LOSS_WEIGHTINGS = ("none", "gaussian")

#: diffusers' Flux/SD3 ``calculate_shift`` defaults.
AUTO_SHIFT_BASE_SEQ_LEN = 256
AUTO_SHIFT_MAX_SEQ_LEN = 4096
AUTO_SHIFT_BASE_MU = 0.5
AUTO_SHIFT_MAX_MU = 1.15


# --- sigma samplers ----------------------------------------------------------------------------


def sample_logit_normal(batch_size: int, scale: float = 1.0, mean: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``sigmoid(mean + scale * z)`` with ``z ~ N(0, 1)``: the "sigmoid" flow schedule."""
    if scale <= 0:
        raise ValueError(f"logit-normal scale = {scale} must be positive")
    return torch.sigmoid(mean + scale * torch.randn(batch_size, generator=generator))


def sample_uniform(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sigmas uniform on [0, 1)."""
    return torch.rand(batch_size, generator=generator)


#: ``--flux_fast_schedule``: the noise levels of a four-step sampler and how often each is drawn.
FEW_STEP_LEVELS = (1.0, 0.75, 0.5, 0.25)
FEW_STEP_WEIGHTS = (0.7, 0.1, 0.1, 0.1)


def sample_few_step_levels(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sigmas drawn from :data:`FEW_STEP_LEVELS` with probabilities :data:`FEW_STEP_WEIGHTS`."""
    picks = torch.multinomial(torch.tensor(FEW_STEP_WEIGHTS), batch_size, replacement=True, generator=generator)
    return torch.tensor(FEW_STEP_LEVELS)[picks]


def sample_beta(batch_size: int, alpha: float = 2.0, beta: float = 2.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sigmas from ``Beta(alpha, beta)``, built as ``X / (X + Y)`` from two Gamma draws."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"beta schedule parameters alpha = {alpha}, beta = {beta} must both be positive")
    x = torch._standard_gamma(torch.full((batch_size,), float(alpha)), generator=generator)
    y = torch._standard_gamma(torch.full((batch_size,), float(beta)), generator=generator)
    return x / (x + y)


# --- shifts ----------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float | torch.Tensor | None) -> torch.Tensor:
    """``k * s / (1 + (k - 1) * s)``; ``None`` or 1 leaves the sigmas unchanged. ``shift`` may be a
    per-sample tensor broadcastable to ``sigmas``."""
    if shift is None:
        return sigmas
    if not torch.is_tensor(shift):
        if shift <= 0:
            raise ValueError(f"schedule shift = {shift} must be positive")
        if shift == 1:
            return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def auto_shift_mu(image_seq_len, base_seq_len: int = AUTO_SHIFT_BASE_SEQ_LEN,
                  max_seq_len: int = AUTO_SHIFT_MAX_SEQ_LEN, base_mu: float = AUTO_SHIFT_BASE_MU,
                  max_mu: float = AUTO_SHIFT_MAX_MU):
    """``mu`` on the straight line through (base_seq_len, base_mu) and (max_seq_len, max_mu)."""
    slope = (max_mu - base_mu) / (max_seq_len - base_seq_len)
    return base_mu + slope * (image_seq_len - base_seq_len)


def auto_shift(image_seq_len, **kwargs):
    """The shift ``k = exp(mu)`` for an image of ``image_seq_len`` tokens (float or tensor in, same out)."""
    mu = auto_shift_mu(image_seq_len, **kwargs)
    return torch.exp(mu) if torch.is_tensor(mu) else math.exp(mu)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Transformer tokens of a latent image split into ``patch_size`` squares (Flux/SD3: 2)."""
    return (latent_height // patch_size) * (latent_width // patch_size)


# --- sampling from the config ----------------------------------------------------------------------


class FlowSigmaSampler:
    """The sigma distribution the ``--flow_*`` options describe.

    ``default_shift`` is the family's shift when ``--flow_schedule_shift`` is unset. With
    ``--flow_schedule_auto_shift`` the caller passes the batch's token count to :meth:`__call__`.
    """

    def __init__(self, kind: str = "sigmoid", scale: float = 1.0, alpha: float = 2.0, beta: float = 2.0,
                 shift: float | None = None, auto: bool = False):
        if kind not in ("sigmoid", "uniform", "beta", "few_step"):
            raise ValueError(f"unknown flow sigma distribution {kind!r}")
        self.kind, self.scale, self.alpha, self.beta = kind, scale, alpha, beta
        self.shift, self.auto = shift, auto

    @classmethod
    def from_config(cls, config, default_shift: float | None = None) -> "FlowSigmaSampler":
        uniform = bool(config.flow_use_uniform_schedule)
        beta = bool(config.flow_use_beta_schedule)
        if uniform and beta:
            raise ValueError("flow_use_uniform_schedule and flow_use_beta_schedule cannot both be set")
        shift = config.flow_schedule_shift
        few_step = bool(config.flux_fast_schedule)
        return cls(
            kind="few_step" if few_step else "uniform" if uniform else "beta" if beta else "sigmoid",
            scale=config.flow_sigmoid_scale or 1.0,
            alpha=config.flow_beta_schedule_alpha or 2.0,
            beta=config.flow_beta_schedule_beta or 2.0,
            shift=default_shift if shift is None else shift,
            auto=bool(config.flow_schedule_auto_shift),
        )

    def raw(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "few_step":
            return sample_few_step_levels(batch_size, generator)
        if self.kind == "uniform":
            return sample_uniform(batch_size, generator)
        if self.kind == "beta":
            return sample_beta(batch_size, self.alpha, self.beta, generator)
        return sample_logit_normal(batch_size, self.scale, generator=generator)

    def __call__(self, batch_size: int, device: torch.device | str = "cpu", seq_len: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        sigmas = self.raw(batch_size, generator)
        if self.kind == "few_step":
            return sigmas.to(device)
        if self.auto:
            if seq_len is None:
                raise ValueError("flow_schedule_auto_shift needs the batch's image sequence length")
            sigmas = shift_sigmas(sigmas, auto_shift(seq_len))
        else:
            sigmas = shift_sigmas(sigmas, self.shift)
        return sigmas.to(device)


# --- the flow-matching objective -------------------------------------------------------------------


def with_euler_shift(scheduler_config) -> dict:
    """A flow scheduler's config for ``FlowMatchEulerDiscreteScheduler``: UniPC / DPM-Solver with flow sigmas
    (Wan) name their shift ``flow_shift``, which the Euler scheduler would ignore and sample unshifted."""
    config = dict(scheduler_config)
    if "shift" not in config and config.get("flow_shift") is not None:
        config["shift"] = config["flow_shift"]
    return config


def flow_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma eps`` with one sigma per sample."""
    sigma = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1 - sigma) * latents + sigma * noise


def flow_velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``eps - x0``: the velocity of the straight path, the flow-matching training target."""
    return noise - latents


def sigmas_to_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    return sigmas * num_train_timesteps


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE (float32 or wider), each multiplied by its weight, averaged over the batch."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    per_sample = (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


# --- spec 004: the shifted discrete schedule with bell-shaped timestep weights --------------------


def gaussian_timestep_weights(timesteps: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """Bell-shaped loss weight of each entry of a timestep table (spec 004).

    ``y = exp(-2 ((t - steps/2) / steps)^2)``, lowered so its minimum over the table is 0, then scaled
    so the weights sum to ``steps``. For a table whose length differs from ``steps`` the weights are
    rescaled to the table's length and lifted by the weight of entry 1, the reference's empirical rule
    for short tables (their sum is then no longer exactly the table length).
    """
    t = timesteps.to(torch.float64)
    y = torch.exp(-2 * ((t - steps / 2) / steps) ** 2)
    lowered = y - y.min()
    total = lowered.sum()
    if total <= 0:  # a one-entry (or constant) table: nothing to favour
        weights = torch.full_like(t, float(steps) / t.numel())
    else:
        weights = lowered * (steps / total)
    if t.numel() != steps:
        weights = weights * (t.numel() / steps)
        weights = weights + weights[min(1, t.numel() - 1)]
    return weights


@dataclass
class ScheduleDraw:
    """One draw from a :class:`ShiftedDiscreteSchedule`: table indices and what they hold."""

    indices: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor


class ShiftedDiscreteSchedule:
    """The discrete flow-matching training schedule of spec 004.

    ``sigmas[i] = shift_k(raw[i])`` with ``raw = linspace(sigma_max, sigma_min, N + 1)[:N]`` (so the
    table runs from the noisiest entry down and never reaches ``sigma_min`` itself),
    ``timesteps = sigmas * num_train_timesteps`` and ``weights = gaussian_timestep_weights(timesteps)``.

    Training draws a table *index* uniformly from ``[int(min_timestep_boundary * N),
    int(max_timestep_boundary * N))``. The boundaries are fractions of the table counted from its
    noisy end: ``max_timestep_boundary = 0.4`` keeps the noisiest 40 % of entries, as for the
    high-noise expert of a two-expert model; ``min_timestep_boundary = 0.4`` keeps the rest.
    """

    def __init__(self, num_timesteps: int = 1000, shift: float = 5.0, sigma_min: float = 0.0,
                 sigma_max: float = 1.0, num_train_timesteps: int = 1000, min_timestep_boundary: float = 0.0,
                 max_timestep_boundary: float = 1.0):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps = {num_timesteps} must be at least 1")
        if not 0 <= min_timestep_boundary < max_timestep_boundary <= 1:
            raise ValueError(
                f"timestep boundaries must satisfy 0 <= min ({min_timestep_boundary}) < max "
                f"({max_timestep_boundary}) <= 1"
            )
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        raw = torch.linspace(sigma_max, sigma_min, num_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigmas(raw, self.shift)
        self.timesteps = self.sigmas * num_train_timesteps
        self.weights = gaussian_timestep_weights(self.timesteps, steps=num_train_timesteps)
        self.min_index = int(min_timestep_boundary * num_timesteps)
        self.max_index = int(max_timestep_boundary * num_timesteps)
        if self.max_index <= self.min_index:
            raise ValueError(
                f"timestep boundaries [{min_timestep_boundary}, {max_timestep_boundary}) select no entry of a "
                f"{num_timesteps}-entry table"
            )

    def __len__(self) -> int:
        return self.sigmas.numel()

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> ScheduleDraw:
        """One table entry per sample, uniform over the allowed indices."""
        indices = torch.randint(self.min_index, self.max_index, (batch_size,), generator=generator)
        return ScheduleDraw(
            indices=indices.to(device),
            sigmas=self.sigmas[indices].to(device),
            timesteps=self.timesteps[indices].to(device),
            weights=self.weights[indices].to(device),
        )

    def weight_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The weight of the table entry nearest to each timestep value."""
        values = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
        nearest = (self.timesteps.view(1, -1) - values.view(-1, 1)).abs().argmin(dim=1)
        return self.weights[nearest].reshape(torch.as_tensor(timesteps).shape)


def flow_loss_weights(scheme: str, timesteps: torch.Tensor, schedule: ShiftedDiscreteSchedule | None = None) -> torch.Tensor:
    """Per-sample loss weights under a weighting scheme of :data:`FLOW_LOSS_WEIGHTINGS`.

    ``gaussian`` is spec 004's bell curve, looked up at the nearest entry of ``schedule`` (a default
    :class:`ShiftedDiscreteSchedule` when none is given).
    """
    if scheme == "none":
        return torch.ones(torch.as_tensor(timesteps).shape, dtype=torch.float64)
    if scheme == "gaussian":
        return (schedule or ShiftedDiscreteSchedule()).weight_for(timesteps)
    raise ValueError(f"unknown flow loss weighting {scheme!r}; expected one of {FLOW_LOSS_WEIGHTINGS}")
