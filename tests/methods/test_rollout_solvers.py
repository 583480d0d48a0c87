"""Scheduled sampling's rollout solvers (methods/rollout_solvers.py) against diffusers and closed forms.

* DPM-Solver++ and UniPC, orders 1-3, on one row: equal diffusers' ``DPMSolverMultistepScheduler`` /
  ``UniPCMultistepScheduler`` stepped over the same noise levels with the same deterministic "model"
  (DDPM with epsilon, v and sample prediction; flow matching with ``flow_prediction``).
* RK4: equals an independent float64 Runge-Kutta written here, on an ODE whose exact solution is known
  (Gaussian data with its exact denoiser), and approaches that solution far better than Euler.
* Batches: rows of different path lengths give exactly what each row gives alone; rows that have
  stopped are untouched; the levels the model sees fall step by step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.rollout_solvers import (DdpmLevels, FlowLevels, solve_rollout,  # noqa: E402
                                                 steps_per_row)
from simpletuner.methods.scheduled_sampling import noise_level_grid, rollout_paths  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ORDERS = (1, 2, 3)
TOLERANCE = 2e-6  # relative to the largest entry; float32 arithmetic in both implementations


def sd1x_schedule(**overrides) -> dict:
    from simpletuner.testing.tiny_models import scheduler_config

    config = {k: v for k, v in scheduler_config("sd1x").items() if k != "set_alpha_to_one"}
    return {**config, **overrides}


def ddpm_levels(prediction_type: str, **overrides) -> DdpmLevels:
    from diffusers import DDPMScheduler

    return DdpmLevels(DDPMScheduler(**sd1x_schedule(**overrides)).alphas_cumprod, prediction_type)


def toy_model(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """A fixed function, linear in the sample, that changes with the timestep (so that higher-order
    terms matter) and treats each row on its own."""
    tau = timesteps.to(torch.float32).view(-1, *([1] * (sample.dim() - 1))) / 1000
    return 0.7 * sample + 0.2 * sample.flip(-1) * tau - 0.3 * tau + 0.1


def start_sample(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


def one_row(path: list[float]) -> torch.Tensor:
    return torch.tensor([path], dtype=torch.float64)


# --- diffusers' multistep schedulers stepped over one row's levels -------------------------------------


def diffusers_ddpm(sampler: str, order: int, path: list[int], prediction_type: str, sample: torch.Tensor,
                   **schedule) -> torch.Tensor:
    """diffusers' scheduler stepped over ``path`` (integer timesteps). Its schedule normally ends at
    sigma 0; a rollout ends at the training level, so the final sigma is set to that level's."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cls = DPMSolverMultistepScheduler if sampler == "dpm" else UniPCMultistepScheduler
    scheduler = cls.from_config(sd1x_schedule(**schedule), solver_order=order, prediction_type=prediction_type)
    if sampler == "dpm":
        scheduler.set_timesteps(timesteps=path[:-1])
    else:  # UniPC's set_timesteps takes no custom DDPM timesteps: set them after a plain call
        scheduler.set_timesteps(num_inference_steps=len(path) - 1)
        scheduler.timesteps = torch.tensor(path[:-1], dtype=torch.int64)
    alpha_bar = scheduler.alphas_cumprod
    scheduler.sigmas = torch.tensor([float(((1 - alpha_bar[t]) / alpha_bar[t]) ** 0.5) for t in path])
    scheduler.set_begin_index(0)  # start at the first level, not wherever a timestep lookup lands
    for timestep in scheduler.timesteps:
        sample = scheduler.step(toy_model(sample, timestep.view(1)), timestep, sample).prev_sample
    return sample


def diffusers_flow(sampler: str, order: int, path: list[float], sample: torch.Tensor) -> torch.Tensor:
    """The flow-prediction configuration (``use_flow_sigmas``) stepped over the sigmas of ``path``."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    options = dict(num_train_timesteps=1000, solver_order=order, use_flow_sigmas=True,
                   prediction_type="flow_prediction")
    if sampler == "unipc":
        scheduler = UniPCMultistepScheduler(**options)
        scheduler.set_timesteps(sigmas=np.array(path[:-1]))  # it appends a final 0: use the last level instead
        scheduler.sigmas[-1] = path[-1]
    else:  # DPMSolverMultistepScheduler takes no custom flow sigmas: set them after a plain call
        scheduler = DPMSolverMultistepScheduler(**options)
        scheduler.set_timesteps(num_inference_steps=len(path) - 1)
        scheduler.sigmas = torch.tensor(path, dtype=torch.float32)
        scheduler.timesteps = (scheduler.sigmas[:-1] * 1000).to(torch.int64)
    scheduler.set_begin_index(0)  # its timesteps are truncated to integers: near 1.0 two levels can share one
    for index, timestep in enumerate(scheduler.timesteps):
        model_timestep = (scheduler.sigmas[index] * 1000).view(1)  # the model sees sigma * T, not the rounded one
        sample = scheduler.step(toy_model(sample, model_timestep), timestep, sample).prev_sample
    return sample


DDPM_PATHS = {
    "spaced": [900, 750, 600, 420, 300, 250],
    "two levels": [400, 399],
    "16 steps": list(range(616, 599, -1)),  # DPM-Solver++ keeps its second-to-last step at order 3 from 15 steps
}


@pytest.mark.parametrize("sampler", ["dpm", "unipc"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_single_row_equals_diffusers(sampler, order, prediction_type):
    levels = ddpm_levels(prediction_type)
    for name, path in DDPM_PATHS.items():
        reference = diffusers_ddpm(sampler, order, path, prediction_type, start_sample())
        ours = solve_rollout(sampler, order, start_sample(), one_row(path), toy_model, levels)
        assert relative_error(ours, reference) < TOLERANCE, name


@pytest.mark.parametrize("sampler", ["dpm", "unipc"])
def test_ddpm_single_row_on_the_training_grid_equals_diffusers(sampler):
    from diffusers import DDPMScheduler

    grid = noise_level_grid(DDPMScheduler(**sd1x_schedule()), flow=False)
    path = rollout_paths(grid, torch.tensor([500.0]), torch.tensor([6]))[0]
    assert path.tolist() == [506.0, 505.0, 504.0, 503.0, 502.0, 501.0, 500.0]
    for order in ORDERS:
        reference = diffusers_ddpm(sampler, order, [int(t) for t in path.tolist()], "epsilon", start_sample())
        ours = solve_rollout(sampler, order, start_sample(), path.view(1, -1), toy_model, ddpm_levels("epsilon"))
        assert relative_error(ours, reference) < TOLERANCE


@pytest.mark.parametrize("sampler", ["dpm", "unipc"])
def test_zero_terminal_snr_top_level_steps_like_diffusers(sampler):
    """With --rescale_betas_zero_snr the top timestep has alpha_bar 0 (lambda -inf); both sides use the
    same small stand-in, so a rollout from the very top stays finite and equal."""
    path = [999, 900, 700, 500, 420]
    levels = ddpm_levels("v_prediction", rescale_betas_zero_snr=True)
    for order in ORDERS:
        reference = diffusers_ddpm(sampler, order, path, "v_prediction", start_sample(), rescale_betas_zero_snr=True)
        ours = solve_rollout(sampler, order, start_sample(), one_row(path), toy_model, levels)
        assert torch.isfinite(ours).all()
        assert relative_error(ours, reference) < TOLERANCE


def flux_grid() -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from simpletuner.testing.tiny.flux import SCHEDULER_CONFIG

    return noise_level_grid(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), flow=True)


FLOW_PATHS = {
    "spaced": [0.95, 0.8, 0.6, 0.45, 0.3, 0.2],
    "from the top": [1.0, 0.9, 0.7, 0.5, 0.3],  # alpha 0 at the start
    "two levels": [0.5, 0.45],
}


@pytest.mark.parametrize("sampler", ["dpm", "unipc"])
@pytest.mark.parametrize("order", ORDERS)
def test_flow_single_row_equals_diffusers(sampler, order):
    paths = dict(FLOW_PATHS)
    grid = flux_grid()
    paths["flux grid"] = rollout_paths(grid, torch.tensor([0.3137], dtype=torch.float64), torch.tensor([6]))[0].tolist()
    top = rollout_paths(grid, grid[4:5], torch.tensor([6]))  # only four grid entries above: padded to 7 columns
    paths["flux grid top"] = top[0, : int(steps_per_row(top)[0]) + 1].tolist()
    assert paths["flux grid top"][0] == 1.0 and len(paths["flux grid top"]) == 5
    for name, path in paths.items():
        reference = diffusers_flow(sampler, order, path, start_sample())
        ours = solve_rollout(sampler, order, start_sample(), one_row(path), toy_model, FlowLevels(1000))
        assert relative_error(ours, reference) < TOLERANCE, name


@pytest.mark.parametrize("sampler", ["dpm", "unipc"])
def test_each_order_gives_a_different_rollout(sampler):
    """The comparisons above would not notice a solver stuck at one order: the orders must differ
    by far more than the tolerance on these paths."""
    for levels, path in ((ddpm_levels("epsilon"), DDPM_PATHS["spaced"]), (FlowLevels(1000), FLOW_PATHS["spaced"])):
        results = [solve_rollout(sampler, order, start_sample(), one_row(path), toy_model, levels) for order in ORDERS]
        for low in range(len(ORDERS)):
            for high in range(low + 1, len(ORDERS)):
                assert relative_error(results[low], results[high]) > 100 * TOLERANCE


def test_dpm_and_unipc_differ_and_both_differ_from_euler():
    path, levels = DDPM_PATHS["spaced"], ddpm_levels("epsilon")
    results = {sampler: solve_rollout(sampler, 2, start_sample(), one_row(path), toy_model, levels)
               for sampler in ("euler", "dpm", "unipc")}
    assert relative_error(results["dpm"], results["unipc"]) > 1000 * TOLERANCE
    assert relative_error(results["dpm"], results["euler"]) > 1000 * TOLERANCE
    # order 1 without a corrector is Euler (a DDIM step) in exact arithmetic
    first = solve_rollout("dpm", 1, start_sample(), one_row(path), toy_model, levels)
    assert relative_error(first, results["euler"]) < 10 * TOLERANCE


# --- RK4 on an ODE with a known solution ----------------------------------------------------------------
#
# Data x0 ~ N(mu, tau^2) per element. The exact denoiser of that data turns the probability-flow ODE
# into one whose solution maps each noisy sample affinely:
#   flow:  x(s) = (1 - s) mu + sqrt(V(s) / V(s0)) (x(s0) - (1 - s0) mu),  V(s) = (1 - s)^2 tau^2 + s^2
#   DDPM:  y(s) = mu + sqrt((tau^2 + s^2) / (tau^2 + s0^2)) (y(s0) - mu),  y = x / sqrt(alpha_bar),
#          s = sqrt((1 - alpha_bar) / alpha_bar)

TAU = 0.6


def gaussian_mean(shape=(1, 4, 6, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def flow_velocity(x: torch.Tensor, sigma, mu: torch.Tensor) -> torch.Tensor:
    """The exact E[eps - x0 | x] at flow level ``sigma`` for the Gaussian data."""
    variance = (1 - sigma) ** 2 * TAU ** 2 + sigma ** 2
    return -mu + (sigma - (1 - sigma) * TAU ** 2) / variance * (x - (1 - sigma) * mu)


def flow_exact(x: torch.Tensor, start: float, end: float, mu: torch.Tensor) -> torch.Tensor:
    def variance(s):
        return (1 - s) ** 2 * TAU ** 2 + s ** 2
    return (1 - end) * mu + (variance(end) / variance(start)) ** 0.5 * (x - (1 - start) * mu)


def rk4_float64(slope, state: torch.Tensor, variables: list[float]) -> torch.Tensor:
    """Textbook RK4 in float64: dy/ds = slope(y, s) through ``variables``."""
    for start, end in zip(variables[:-1], variables[1:]):
        h = end - start
        k1 = slope(state, start)
        k2 = slope(state + h / 2 * k1, start + h / 2)
        k3 = slope(state + h / 2 * k2, start + h / 2)
        k4 = slope(state + h * k3, end)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


class CountingModel:
    """Wraps a model function; records each call's timesteps."""

    def __init__(self, function):
        self.function = function
        self.calls: list[torch.Tensor] = []

    def __call__(self, sample, timesteps):
        self.calls.append(timesteps.detach().clone())
        return self.function(sample, timesteps)


def test_rk4_flow_follows_the_exact_solution():
    mu = gaussian_mean()
    x_start = start_sample().double()

    def model(sample, timesteps):
        sigma = timesteps.double().view(-1, 1, 1, 1) / 1000
        return flow_velocity(sample.double(), sigma, mu).float()

    path = [0.98, 0.7, 0.45, 0.25, 0.1]
    counting = CountingModel(model)
    ours = solve_rollout("rk4", 4, x_start.float(), one_row(path), counting, FlowLevels(1000))
    assert len(counting.calls) == 4 * (len(path) - 1)  # four model calls per step
    midpoints = [float(call) / 1000 for call in counting.calls[1::4]]
    assert midpoints == pytest.approx([(a + b) / 2 for a, b in zip(path[:-1], path[1:])])
    reference = rk4_float64(lambda x, s: flow_velocity(x, s, mu), x_start, path)
    assert relative_error(ours, reference) < 1e-5
    exact = flow_exact(x_start, path[0], path[-1], mu)
    rk4_error = relative_error(ours, exact)
    euler_error = relative_error(solve_rollout("euler", 1, x_start.float(), one_row(path), model, FlowLevels(1000)),
                                 exact)
    assert rk4_error < 1e-3 and rk4_error < euler_error / 100
    # fourth order: halving the steps cuts the float64 scheme's error about 16-fold
    fine = [path[0], *[v for a, b in zip(path[:-1], path[1:]) for v in ((a + b) / 2, b)]]
    coarse_error = relative_error(reference, exact)
    fine_error = relative_error(rk4_float64(lambda x, s: flow_velocity(x, s, mu), x_start, fine), exact)
    assert 10 < coarse_error / fine_error < 40


def ddpm_sigma_of_timestep(alpha_bar: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The test's own continuous schedule: log sigma linear between integer timesteps."""
    log_sigmas = 0.5 * torch.log((1 - alpha_bar.double()) / alpha_bar.double())
    t = timesteps.double()
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    return torch.exp(log_sigmas[low] + (t - low) * (log_sigmas[low + 1] - log_sigmas[low]))


def test_rk4_ddpm_follows_the_exact_solution_with_fractional_midpoint_timesteps():
    from diffusers import DDPMScheduler

    alpha_bar = DDPMScheduler(**sd1x_schedule()).alphas_cumprod
    mu = gaussian_mean()
    x_start = start_sample().double()

    def epsilon_model(sample, timesteps):
        """The exact E[eps | x_t] for the Gaussian data, at (possibly fractional) timesteps."""
        s = ddpm_sigma_of_timestep(alpha_bar, timesteps).view(-1, 1, 1, 1)
        alpha = 1 / torch.sqrt(1 + s ** 2)
        y = sample.double() / alpha
        return (s * (y - mu) / (TAU ** 2 + s ** 2)).float()

    path = [800, 650, 500, 400, 300, 220, 150]
    counting = CountingModel(epsilon_model)
    ours = solve_rollout("rk4", 4, x_start.float(), one_row(path), counting, ddpm_levels("epsilon"))
    assert len(counting.calls) == 4 * (len(path) - 1)
    assert counting.calls[0].dtype == torch.int64 and int(counting.calls[0]) == 800  # grid levels stay integers
    sigmas = [float(ddpm_sigma_of_timestep(alpha_bar, torch.tensor([t]))) for t in path]
    midpoint_sigmas = [float(ddpm_sigma_of_timestep(alpha_bar, call)) for call in counting.calls[1::4]]
    assert midpoint_sigmas == pytest.approx([(a + b) / 2 for a, b in zip(sigmas[:-1], sigmas[1:])], rel=1e-5)
    assert all(float(call) != round(float(call)) for call in counting.calls[1::4])

    def slope(y, s):
        return s * (y - mu) / (TAU ** 2 + s ** 2)

    y_start = x_start * (1 + sigmas[0] ** 2) ** 0.5
    to_x = (1 + sigmas[-1] ** 2) ** -0.5
    reference = rk4_float64(slope, y_start, sigmas) * to_x
    assert relative_error(ours, reference) < 1e-5
    exact = (mu + ((TAU ** 2 + sigmas[-1] ** 2) / (TAU ** 2 + sigmas[0] ** 2)) ** 0.5 * (y_start - mu)) * to_x
    euler = solve_rollout("euler", 1, x_start.float(), one_row(path), epsilon_model, ddpm_levels("epsilon"))
    assert relative_error(ours, exact) < 1e-3
    assert relative_error(ours, exact) < relative_error(euler, exact) / 100


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_rk4_reads_every_ddpm_prediction_type_as_the_same_noise_estimate(prediction_type):
    """The same underlying denoiser, expressed as v or as x0 instead of epsilon, rolls out identically."""
    levels = ddpm_levels(prediction_type)
    eps_levels = ddpm_levels("epsilon")

    def as_prediction_type(sample, timesteps):
        eps = toy_model(sample, timesteps)
        alpha, sigma = eps_levels.alpha_sigma(timesteps.double())
        alpha, sigma = alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
        clean = (sample - sigma * eps) / alpha
        return alpha * eps - sigma * clean if prediction_type == "v_prediction" else clean

    path = one_row([700, 500, 300])
    expected = solve_rollout("rk4", 4, start_sample(), path, toy_model, eps_levels)
    ours = solve_rollout("rk4", 4, start_sample(), path, as_prediction_type, levels)
    assert relative_error(ours, expected) < 1e-5


# --- batches of rows with their own paths ------------------------------------------------------------------

SOLVERS = [("euler", 1), ("rk4", 4), *[(sampler, order) for sampler in ("dpm", "unipc") for order in ORDERS]]


def ddpm_batch_paths() -> torch.Tensor:
    from diffusers import DDPMScheduler

    grid = noise_level_grid(DDPMScheduler(**sd1x_schedule()), flow=False)
    levels = torch.tensor([600.0, 10.0, 995.0, 300.0, 999.0, 40.0])
    offsets = torch.tensor([5, 3, 8, 0, 4, 2])
    return rollout_paths(grid, levels, offsets)


def flow_batch_paths() -> torch.Tensor:
    grid = flux_grid()
    levels = torch.tensor([0.3137, 0.0213, float(grid[2]), 0.6137, 1.0, 0.8137], dtype=torch.float64)
    offsets = torch.tensor([5, 3, 8, 0, 4, 1])
    return rollout_paths(grid, levels, offsets)


SPACED_PATHS = torch.tensor([[900.0, 700, 500, 300, 200, 150], [800, 620, 620, 620, 620, 620],
                             [650, 640, 630, 620, 610, 600], [400, 400, 400, 400, 400, 400],
                             [990, 600, 450, 100, 100, 100]], dtype=torch.float64)


@pytest.mark.parametrize("sampler,order", SOLVERS)
@pytest.mark.parametrize("family", ["ddpm", "flow", "spaced ddpm"])
def test_a_batch_equals_each_row_rolled_out_alone(sampler, order, family):
    levels = FlowLevels(1000) if family == "flow" else ddpm_levels("v_prediction")
    paths = {"ddpm": ddpm_batch_paths, "flow": flow_batch_paths, "spaced ddpm": lambda: SPACED_PATHS}[family]()
    steps = steps_per_row(paths)
    assert len(set(steps.tolist())) >= 3 and 0 in steps.tolist()  # different lengths, and rows that do not move
    start = start_sample(rows=paths.shape[0], seed=3)
    model = CountingModel(toy_model)
    batched = solve_rollout(sampler, order, start, paths, model, levels)
    calls_per_step = 4 if sampler == "rk4" else 1
    assert len(model.calls) == calls_per_step * int(steps.max())  # one batched call per evaluation
    assert all(call.shape == (paths.shape[0],) for call in model.calls)
    for row in range(paths.shape[0]):
        own = paths[row, : int(steps[row]) + 1].view(1, -1)
        alone = solve_rollout(sampler, order, start[row: row + 1], own, toy_model, levels)
        if int(steps[row]) == 0:
            assert torch.equal(batched[row], start[row])  # never left: exactly where it started
        assert torch.allclose(batched[row: row + 1], alone, rtol=1e-6, atol=1e-6), row


@pytest.mark.parametrize("sampler,order", SOLVERS)
def test_rows_that_have_arrived_stay_exactly_put(sampler, order):
    """Padding a row's path with more copies of its final level changes nothing, bit for bit."""
    levels = ddpm_levels("epsilon")
    path = [900.0, 700, 500, 300]
    start = start_sample()
    plain = solve_rollout(sampler, order, start, one_row(path), toy_model, levels)
    padded_paths = torch.tensor([path + [300.0] * 3, [950.0, 800, 650, 500, 350, 200, 100]], dtype=torch.float64)
    padded = solve_rollout(sampler, order, torch.cat([start, start_sample(seed=4)]), padded_paths, toy_model, levels)
    assert torch.equal(padded[0:1], plain)


@pytest.mark.parametrize("sampler,order", SOLVERS)
def test_levels_seen_by_the_model_fall_step_by_step(sampler, order):
    paths = flow_batch_paths()
    steps = steps_per_row(paths)
    model = CountingModel(toy_model)
    solve_rollout(sampler, order, start_sample(rows=paths.shape[0]), paths, model, FlowLevels(1000))
    seen = torch.stack(model.calls).double() / 1000  # (calls, rows)
    per_step = 4 if sampler == "rk4" else 1
    for row in range(paths.shape[0]):
        moving = seen[: per_step * int(steps[row]), row]
        assert torch.all(moving[1:] <= moving[:-1])  # never back up toward noise
        step_starts = moving[::per_step]
        assert torch.all(step_starts[1:] < step_starts[:-1])  # each step starts strictly lower
        if int(steps[row]):
            top = min(float(paths[row, 0]), 1 - 1e-6) if sampler == "unipc" else float(paths[row, 0])
            assert float(step_starts[0]) == pytest.approx(top, rel=1e-6)
            assert float(step_starts[-1]) > float(paths[row, -1])  # the last call is above the target level


def test_unknown_sampler_and_order_are_refused_by_the_solver_too():
    with pytest.raises(ValueError, match="orders 1 to 3"):
        solve_rollout("unipc", 4, start_sample(), one_row([0.5, 0.4]), toy_model, FlowLevels(1000))
    with pytest.raises(ValueError, match="unknown rollout sampler 'heun'"):
        solve_rollout("heun", 2, start_sample(), one_row([0.5, 0.4]), toy_model, FlowLevels(1000))


def test_the_config_rules_know_the_solver_table():
    from simpletuner.methods import rollout_solvers
    from simpletuner.options import options_by_name
    from simpletuner.options import scheduled_sampling_rules as rules

    assert rules.MULTISTEP_SAMPLERS == rollout_solvers.MULTISTEP_SAMPLERS
    assert rules.MAX_MULTISTEP_ORDER == rollout_solvers.MAX_MULTISTEP_ORDER
    assert rules.FIXED_ORDERS == rollout_solvers.FIXED_ORDERS
    choices = options_by_name()["scheduled_sampling_sampler"].choices
    assert set(choices) == {*rollout_solvers.MULTISTEP_SAMPLERS, *rollout_solvers.FIXED_ORDERS}
