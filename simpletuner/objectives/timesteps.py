"""Timestep sampling strategies, chosen by name from the config.

The trainer asks :func:`build_timestep_sampler` once and then calls the returned sampler every step.
Each strategy is a small function or class that draws from torch's global generator, so a resumed
run (which restores that generator) draws the same timesteps.

DDPM-style sampling is a draw from a categorical distribution over the integer timesteps
``0 .. T-1``:

* the *weights* come from ``--timestep_bias_strategy`` (:func:`timestep_bias_weights`): all ones, or
  ones with a block of timesteps multiplied by ``--timestep_bias_multiplier``;
* the *draw* is either independent per sample, or (the default, unless
  ``--disable_segmented_timestep_sampling``) stratified over the batch: the probability mass is split
  into ``batch_size`` equal parts and every sample takes its timestep from its own part. Without a
  bias the parts are equal slices of ``[0, T)``, so a batch of 4 always has one timestep in each
  quarter of the schedule. Each sample's marginal distribution is still exactly the weighted one;
  only the spread across the batch improves. Splitting by probability mass rather than by timestep
  index means a strongly biased or restricted distribution still stratifies cleanly.

Draws happen on the CPU generator and are then moved to the target device, so a run samples the same
timesteps whichever device it trains on.
"""

from __future__ import annotations

from typing import Callable

import torch

TimestepSampler = Callable[[int, torch.device], torch.Tensor]

BIAS_STRATEGIES = ("earlier", "later", "range", "none")

#: Used when the corresponding option is left unset.
DEFAULT_BIAS_MULTIPLIER = 1.0
DEFAULT_BIAS_PORTION = 0.25


def uniform_sampler(num_train_timesteps: int) -> TimestepSampler:
    """Integer timesteps drawn independently and uniformly from [0, num_train_timesteps)."""

    def sample(batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (batch_size,), device=device).long()

    return sample


def timestep_bias_weights(num_train_timesteps: int, strategy: str | None, multiplier: float | None = None,
                          portion: float | None = None, begin: int | None = None,
                          end: int | None = None) -> torch.Tensor:
    """Unnormalised sampling weight of each timestep ``0 .. T-1`` (float64).

    * ``earlier``: the first ``portion * T`` timesteps (the least noisy ones) get ``multiplier``;
    * ``later``: the last ``portion * T`` timesteps (the noisiest) get ``multiplier``;
    * ``range``: timesteps ``begin <= t < end`` get ``multiplier``;
    * ``none`` / unset: every timestep weighs 1.

    Everything else weighs 1, so ``multiplier`` is how many times more likely a favoured timestep is
    than an ordinary one (below 1 makes it less likely). Unset values fall back to multiplier 1.0,
    portion 0.25, begin 0 and end T.
    """
    total = int(num_train_timesteps)
    weights = torch.ones(total, dtype=torch.float64)
    if strategy in (None, "none"):
        return weights
    if strategy not in BIAS_STRATEGIES:
        raise ValueError(f"unknown timestep bias strategy {strategy!r}; expected one of {BIAS_STRATEGIES}")
    multiplier = DEFAULT_BIAS_MULTIPLIER if multiplier is None else float(multiplier)
    if multiplier <= 0:
        raise ValueError(
            f"timestep_bias_multiplier = {multiplier} must be greater than 0; to stop biasing use "
            "timestep_bias_strategy none"
        )
    if strategy == "range":
        first = 0 if begin is None else int(begin)
        last = total if end is None else int(end)
        if not 0 <= first < last <= total:
            raise ValueError(
                f"timestep bias range [{first}, {last}) must satisfy 0 <= begin < end <= {total} "
                "(the number of training timesteps)"
            )
        weights[first:last] *= multiplier
        return weights
    portion = DEFAULT_BIAS_PORTION if portion is None else float(portion)
    if not 0 < portion <= 1:
        raise ValueError(f"timestep_bias_portion = {portion} must be in (0, 1]")
    count = max(1, int(portion * total))
    if strategy == "earlier":
        weights[:count] *= multiplier
    else:
        weights[total - count:] *= multiplier
    return weights


class WeightedTimestepSampler:
    """Categorical draws over ``0 .. T-1`` with the given weights, independent or stratified.

    Both modes invert the cumulative distribution of the weights: an independent draw feeds it one
    uniform number per sample; a stratified draw feeds sample ``i`` of ``n`` a uniform number from
    ``[i/n, (i+1)/n)`` and then shuffles the batch so no batch position is tied to a stratum.
    """

    def __init__(self, weights: torch.Tensor, stratified: bool):
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weights.numel() == 0 or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("timestep weights must be non-negative with a positive sum")
        self.weights = weights
        self.probabilities = weights / weights.sum()
        self.cdf = torch.cumsum(self.probabilities, 0)
        self.stratified = stratified

    def __call__(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        uniform = torch.rand(batch_size, dtype=torch.float64)
        if self.stratified and batch_size > 1:
            uniform = (torch.arange(batch_size, dtype=torch.float64) + uniform) / batch_size
            uniform = uniform[torch.randperm(batch_size)]
        timesteps = torch.searchsorted(self.cdf, uniform, right=True)
        # Rounding in the cumulative sum can leave its end just below 1, and a zero-weight timestep
        # can sit at a boundary: keep every draw on a timestep that may be drawn.
        timesteps = timesteps.clamp_(max=self.cdf.numel() - 1)
        zero = self.probabilities[timesteps] == 0
        if bool(zero.any()):
            allowed = torch.nonzero(self.probabilities > 0).flatten()
            nearest = torch.searchsorted(allowed, timesteps[zero]).clamp_(max=allowed.numel() - 1)
            timesteps[zero] = allowed[nearest]
        return timesteps.long().to(device)


def build_timestep_sampler(config, scheduler, window: tuple[int, int] | None = None) -> TimestepSampler:
    """The DDPM-style timestep sampler the config asks for (uniform and independent when config is None).

    ``window`` = ``[begin, end)`` restricts the draws to that slice of the schedule (the family's
    ``training_timestep_window()``, e.g. one expert of a base + refiner pair): the bias weights
    outside it become 0, so stratification then spreads each batch over the slice.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    if config is None and window is None:
        return uniform_sampler(num_train_timesteps)
    if config is None:  # a window alone: no bias inside it, batches stratified over it
        weights = timestep_bias_weights(num_train_timesteps, None)
        stratified = True
    else:
        weights = timestep_bias_weights(
            num_train_timesteps,
            config.timestep_bias_strategy,
            multiplier=config.timestep_bias_multiplier,
            portion=config.timestep_bias_portion,
            begin=config.timestep_bias_begin,
            end=config.timestep_bias_end,
        )
        stratified = not config.disable_segmented_timestep_sampling
    if window is not None:
        begin, end = window
        if not 0 <= begin < end <= num_train_timesteps:
            raise ValueError(f"timestep window [{begin}, {end}) must lie inside [0, {num_train_timesteps})")
        weights[:begin] = 0
        weights[end:] = 0
    return WeightedTimestepSampler(weights, stratified=stratified)
