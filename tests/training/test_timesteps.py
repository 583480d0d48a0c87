"""DDPM timestep sampling: bias weights against their definition, sampled distributions against their
densities (KS on jittered draws and histograms), stratification of the batch, and the config wiring."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.objectives.timesteps import (  # noqa: E402
    WeightedTimestepSampler, build_timestep_sampler, timestep_bias_weights, uniform_sampler,
)

T = 1000
SCHEDULER = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=T))


def draw(sampler, batch_size: int, batches: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([sampler(batch_size, torch.device("cpu")) for _ in range(batches)])


def jittered_ks_pvalue(samples: torch.Tensor, weights: torch.Tensor) -> float:
    """KS test of integer draws against a categorical law: ``t + U(0, 1)`` then has the piecewise-constant
    density ``p[floor(x)]``, whose CDF is the linear interpolation of the categorical CDF."""
    stats = pytest.importorskip("scipy.stats")
    import numpy as np

    cdf = np.concatenate([[0.0], np.cumsum(weights.numpy() / weights.numpy().sum())])
    grid = np.arange(len(cdf), dtype=np.float64)
    generator = torch.Generator().manual_seed(123)
    values = samples.flatten().double() + torch.rand(samples.numel(), generator=generator, dtype=torch.float64)
    return stats.kstest(values.numpy(), lambda x: np.interp(x, grid, cdf)).pvalue


def assert_histogram_matches(samples: torch.Tensor, weights: torch.Tensor, bins: int = 20) -> None:
    """Each bin's frequency within 5 standard errors of its probability."""
    probabilities = (weights / weights.sum()).view(bins, -1).sum(1)
    counts = torch.bincount(samples.flatten() // (T // bins), minlength=bins).double()
    n = samples.numel()
    tolerance = 5 * torch.sqrt(probabilities * (1 - probabilities) / n)
    assert torch.all((counts / n - probabilities).abs() <= tolerance), (counts / n, probabilities)


# --- weights ---------------------------------------------------------------------------------------


def test_bias_weights_follow_their_definition():
    assert torch.equal(timestep_bias_weights(T, None), torch.ones(T, dtype=torch.float64))
    assert torch.equal(timestep_bias_weights(T, "none", multiplier=5), torch.ones(T, dtype=torch.float64))
    earlier = timestep_bias_weights(T, "earlier", multiplier=3.0, portion=0.2)
    assert torch.all(earlier[:200] == 3) and torch.all(earlier[200:] == 1)
    later = timestep_bias_weights(T, "later", multiplier=0.5)  # default portion 0.25
    assert torch.all(later[:750] == 1) and torch.all(later[750:] == 0.5)
    ranged = timestep_bias_weights(T, "range", multiplier=4, begin=200, end=400)
    assert torch.all(ranged[200:400] == 4) and ranged.sum() == T - 200 + 4 * 200
    assert torch.all(timestep_bias_weights(T, "range", multiplier=2, begin=900)[900:] == 2)  # end defaults to T


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="earlier", multiplier=0), "greater than 0"),
    (dict(strategy="later", multiplier=2, portion=1.5), "must be in"),
    (dict(strategy="range", multiplier=2, begin=500, end=500), "begin < end"),
    (dict(strategy="range", multiplier=2, begin=0, end=1001), "end <= 1000"),
    (dict(strategy="sideways"), "unknown timestep bias strategy"),
])
def test_bad_bias_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timestep_bias_weights(T, **kwargs)


# --- distributions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, extra", [
    (None, {}),
    ("later", dict(timestep_bias_multiplier=4.0, timestep_bias_portion=0.2)),
    ("earlier", dict(timestep_bias_multiplier=0.25)),
    ("range", dict(timestep_bias_multiplier=6.0, timestep_bias_begin=300, timestep_bias_end=450)),
])
@pytest.mark.parametrize("segmented", [True, False])
def test_draws_follow_the_weighted_distribution(strategy, extra, segmented):
    config = make_config(timestep_bias_strategy=strategy, disable_segmented_timestep_sampling=not segmented, **extra)
    weights = timestep_bias_weights(T, strategy, multiplier=extra.get("timestep_bias_multiplier"),
                                    portion=extra.get("timestep_bias_portion"),
                                    begin=extra.get("timestep_bias_begin"), end=extra.get("timestep_bias_end"))
    samples = draw(build_timestep_sampler(config, SCHEDULER), 4, 10_000)
    assert samples.dtype == torch.long and samples.min() >= 0 and samples.max() < T
    assert_histogram_matches(samples, weights)
    assert jittered_ks_pvalue(samples, weights) > 1e-3


def test_uniform_sampler_is_uniform():
    samples = draw(uniform_sampler(T), 8, 5_000)
    assert_histogram_matches(samples, torch.ones(T, dtype=torch.float64))
    assert jittered_ks_pvalue(samples, torch.ones(T, dtype=torch.float64)) > 1e-3


@pytest.mark.parametrize("batch_size", [2, 3, 4, 7])
def test_segmented_batch_takes_one_timestep_from_each_equal_slice(batch_size):
    sampler = build_timestep_sampler(make_config(), SCHEDULER)
    samples = draw(sampler, batch_size, 2_000)
    ordered = samples.sort(dim=1).values
    for i in range(batch_size):
        low, high = (i * T) // batch_size, -(-((i + 1) * T) // batch_size)  # floor, ceil of the slice edges
        assert torch.all((ordered[:, i] >= low) & (ordered[:, i] < high)), i
    # the batch is shuffled: every position sees the whole range, not just its slice
    assert samples[:, 0].min() < T // batch_size and samples[:, 0].max() >= T - T // batch_size


def test_independent_draws_are_not_stratified():
    samples = draw(build_timestep_sampler(make_config(disable_segmented_timestep_sampling=True), SCHEDULER), 4, 2_000)
    quarters = samples // 250
    all_distinct = torch.tensor([len(set(row.tolist())) == 4 for row in quarters])
    # P(4 distinct quarters) = 4!/4^4 ~ 0.094 for independent draws
    assert 0.07 < all_distinct.double().mean() < 0.12


def test_segmented_biased_batches_split_the_probability_mass():
    weights = timestep_bias_weights(T, "later", multiplier=9.0, portion=0.1)
    cdf = torch.cumsum(weights / weights.sum(), 0)
    samples = draw(WeightedTimestepSampler(weights, stratified=True), 4, 2_000).sort(dim=1).values
    below = torch.where(samples > 0, cdf[(samples - 1).clamp(min=0)], torch.zeros_like(samples, dtype=torch.float64))
    for i in range(4):  # sample i's mass interval [cdf[t-1], cdf[t]) meets the stratum [i/4, (i+1)/4)
        assert torch.all(below[:, i] <= (i + 1) / 4 + 1e-12) and torch.all(cdf[samples[:, i]] >= i / 4 - 1e-12)
    # half the mass sits in the favoured last 10 %, so two of the four samples land there
    assert torch.all((samples >= 900).sum(1) == 2)


def test_zero_weight_timesteps_are_never_drawn():
    weights = torch.zeros(T, dtype=torch.float64)
    weights[100:200] = 1
    for stratified in (True, False):
        samples = draw(WeightedTimestepSampler(weights, stratified), 5, 1_000)
        assert samples.min() >= 100 and samples.max() < 200


# --- wiring --------------------------------------------------------------------------------------


def test_no_config_means_independent_uniform_draws_from_the_global_generator():
    sampler = build_timestep_sampler(None, SCHEDULER)
    torch.manual_seed(5)
    expected = torch.randint(0, T, (6,))
    assert torch.equal(draw(sampler, 6, 1, seed=5)[0], expected)


def test_draws_are_reproducible_from_the_global_seed_and_device_independent():
    sampler = build_timestep_sampler(make_config(timestep_bias_strategy="later", timestep_bias_multiplier=2.0),
                                     SCHEDULER)
    assert torch.equal(draw(sampler, 4, 3, seed=11), draw(sampler, 4, 3, seed=11))
    assert not torch.equal(draw(sampler, 4, 3, seed=11), draw(sampler, 4, 3, seed=12))
    torch.manual_seed(0)
    assert sampler(2, "meta").device.type == "meta"
