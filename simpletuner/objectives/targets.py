"""Noise, targets and losses shared by every DDPM-style family.

A family declares its prediction type; the maths lives here once:
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (DDPM, Ho et al. 2020) and the v-target
``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (Salimans & Ho 2022), both from the scheduler's
``alphas_cumprod``.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0), via the scheduler so its beta schedule is respected."""
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the network is trained to output for the given prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# --- noise schedule options ------------------------------------------------------------------------


def configure_training_scheduler(scheduler, config):
    """The training scheduler rebuilt with ``--training_scheduler_timestep_spacing`` and
    ``--rescale_betas_zero_snr`` (Lin et al. 2023: betas rescaled so the last timestep has zero
    signal-to-noise ratio, i.e. ``alphas_cumprod[-1] == 0``); unchanged when neither is set.

    The spacing only matters where the scheduler is stepped (the saved pipeline and, unless
    ``--inference_scheduler_timestep_spacing`` overrides it, validation); training draws timesteps from
    the whole ``[0, T)`` range either way.
    """
    overrides = {}
    spacing = config.training_scheduler_timestep_spacing
    if spacing:
        overrides["timestep_spacing"] = spacing
    if config.rescale_betas_zero_snr:
        overrides["rescale_betas_zero_snr"] = True
    if not overrides:
        return scheduler
    return scheduler.__class__.from_config(scheduler.config, **overrides)


def inference_scheduler_overrides(config) -> dict:
    """Config overrides for the scheduler of validation pipelines (``--inference_scheduler_timestep_spacing``)."""
    spacing = config.inference_scheduler_timestep_spacing
    return {"timestep_spacing": spacing} if spacing else {}


# --- diff2flow: DDPM predictions as flow-matching velocities ---------------------------------------
#
# With a = alphas_cumprod[t], the DDPM point x_t = sqrt(a) x0 + sqrt(1-a) eps divided by
# c = sqrt(a) + sqrt(1-a) is exactly the flow-matching point (1 - s) x0 + s eps at
#     s = sqrt(1-a) / (sqrt(a) + sqrt(1-a)),
# because the two coefficients of x_t / c sum to 1. Every DDPM parameterisation (epsilon, v, sample)
# determines the pair (x0, eps) given x_t, and with it the flow velocity u = eps - x0, so a model of
# either kind can be trained against the flow target without changing it (Diff2Flow, Schusterbauer
# et al. 2025). The velocity is independent of where on the path it is evaluated.


def _alpha(scheduler_or_alphas, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t]`` in ``like``'s dtype, shaped to broadcast over ``like``."""
    alphas = getattr(scheduler_or_alphas, "alphas_cumprod", scheduler_or_alphas)
    alpha = alphas.to(device=like.device)[timesteps.to(like.device)].to(like.dtype)
    return alpha.view(-1, *([1] * (like.dim() - 1)))


def flow_sigma_from_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """The flow noise level ``sqrt(1-a) / (sqrt(a) + sqrt(1-a))`` of a DDPM ``alphas_cumprod`` value."""
    return (1 - alpha).sqrt() / (alpha.sqrt() + (1 - alpha).sqrt())


def alpha_from_flow_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_sigma_from_alpha`: ``(1-s)^2 / ((1-s)^2 + s^2)``."""
    return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)


def ddpm_to_flow_point(x_t: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_flow, sigma)``: the flow-matching point and noise level equal to the DDPM point ``x_t``."""
    scale = alpha.sqrt() + (1 - alpha).sqrt()
    return x_t / scale, flow_sigma_from_alpha(alpha)


def flow_to_ddpm_point(x_flow: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, alpha)``: inverse of :func:`ddpm_to_flow_point`."""
    alpha = alpha_from_flow_sigma(sigma)
    return x_flow * (alpha.sqrt() + (1 - alpha).sqrt()), alpha


def prediction_to_x0_eps(prediction: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                         prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample and noise a DDPM prediction implies at ``x_t``.

    epsilon needs ``a > 0`` and sample needs ``a < 1`` (a division by ``sqrt(a)`` resp. ``sqrt(1-a)``);
    v-prediction is defined everywhere.
    """
    signal, noise_scale = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (x_t - noise_scale * prediction) / signal, prediction
    if prediction_type == "v_prediction":
        return signal * x_t - noise_scale * prediction, noise_scale * x_t + signal * prediction
    if prediction_type == "sample":
        return prediction, (x_t - signal * prediction) / noise_scale
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def x0_eps_to_prediction(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What a DDPM model of ``prediction_type`` outputs for the pair ``(x0, eps)``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def prediction_to_flow_velocity(prediction: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                                prediction_type: str) -> torch.Tensor:
    """``eps - x0`` as implied by a DDPM prediction at ``x_t``."""
    x0, eps = prediction_to_x0_eps(prediction, x_t, alpha, prediction_type)
    return eps - x0


def flow_velocity_to_prediction(velocity: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                                prediction_type: str) -> torch.Tensor:
    """The DDPM prediction equivalent to flow velocity ``u`` at ``x_t``: on the flow path
    ``x0 = x_flow - s u`` and ``eps = x_flow + (1 - s) u``."""
    x_flow, sigma = ddpm_to_flow_point(x_t, alpha)
    return x0_eps_to_prediction(x_flow - sigma * velocity, x_flow + (1 - sigma) * velocity, alpha, prediction_type)


def diff2flow_prediction_and_target(scheduler, prediction: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor,
                                    noise: torch.Tensor, timesteps: torch.Tensor,
                                    prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model output converted to a flow velocity and the flow target ``noise - latents``, both in
    float32 (or wider), for ``--diff2flow_loss``."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    noisy = noisy.to(dtype)
    alpha = _alpha(scheduler, timesteps, noisy)
    velocity = prediction_to_flow_velocity(prediction.to(dtype), noisy, alpha, prediction_type)
    return velocity, noise.to(dtype) - latents.to(dtype)


def check_diff2flow_schedule(scheduler, prediction_type: str) -> None:
    """epsilon-prediction cannot give x0 where ``alphas_cumprod`` is 0 (a zero-terminal-SNR schedule)."""
    if prediction_type == "epsilon" and float(scheduler.alphas_cumprod.min()) <= 0:
        raise ValueError(
            "diff2flow_loss with an epsilon-prediction model needs alphas_cumprod > 0 at every timestep, but the "
            "schedule reaches zero SNR (rescale_betas_zero_snr); use v_prediction or drop rescale_betas_zero_snr"
        )
