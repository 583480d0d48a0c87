"""Scheduled sampling (rollout) and ReflexFlow: the rollout paths on diffusers' real DDPM and flow
schedules, the Euler step against diffusers' own Euler schedulers, the probability ramp, the offset
strategies, the no-gradient rollout with every solver, the loss against plain SFT, the config rules
(solver orders included), and short CLI runs with the default UniPC rollout on the tiny sd1x and flux
models. The multistep and RK4 solvers themselves are checked in test_rollout_solvers.py."""

from __future__ import annotations

import math
import os
import re

import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.rollout_solvers import euler_ddpm_step, euler_flow_step  # noqa: E402
from simpletuner.methods.scheduled_sampling import (ScheduledSamplingSettings,  # noqa: E402
                                                     anti_drift_term, draw_offsets, noise_level_grid,
                                                     reflexflow_weights, rollout_paths, rollout_probability)
from simpletuner.methods.sft import SupervisedFineTuning  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ddpm_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    from simpletuner.testing.tiny_models import scheduler_config

    config = {k: v for k, v in scheduler_config("sd1x").items() if k != "set_alpha_to_one"}
    return DDPMScheduler(**{**config, "prediction_type": prediction_type})


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from simpletuner.testing.tiny.flux import SCHEDULER_CONFIG

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# --- rollout paths on real schedules ---------------------------------------------------------------------


def assert_strictly_decreasing_to(path: torch.Tensor, level: float, offset: int) -> None:
    steps = int((path > level).sum())
    assert 1 <= steps <= offset
    head = path[: steps + 1]
    assert torch.all(head[1:] < head[:-1]), path
    assert float(head[-1]) == pytest.approx(level, abs=0, rel=0)
    assert torch.all(path[steps:] == level)  # padding: the row has arrived


def test_ddpm_rollout_timesteps_strictly_decrease_from_t_plus_k_to_t():
    from diffusers import EulerDiscreteScheduler

    scheduler = ddpm_scheduler()
    grid = noise_level_grid(scheduler, flow=False)
    levels = torch.tensor([0.0, 10.0, 500.0, 995.0, 999.0])
    offsets = torch.tensor([3, 8, 5, 8, 4])
    paths = rollout_paths(grid, levels, offsets)
    assert paths.shape == (5, 9)
    for row in range(4):
        level, offset = float(levels[row]), int(offsets[row])
        assert float(paths[row, 0]) == min(level + offset, 999)  # t + k, clamped to the schedule's end
        assert_strictly_decreasing_to(paths[row], level, offset)
        # diffusers' Euler scheduler accepts the path as its timesteps and its sigmas fall along it
        steps = int((paths[row] > level).sum())
        euler = EulerDiscreteScheduler.from_config(scheduler.config)
        euler.set_timesteps(timesteps=[int(v) for v in paths[row, : steps + 1].tolist()])
        sigmas = euler.sigmas[:-1]
        assert torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.all(paths[4] == 999)  # already at the noisiest timestep: nothing to roll out


@pytest.mark.parametrize("make_scheduler", [flux_scheduler, sd3_scheduler])
def test_flow_rollout_sigmas_strictly_decrease_from_the_noisier_level_to_t(make_scheduler):
    scheduler = make_scheduler()
    grid = noise_level_grid(scheduler, flow=True)
    assert grid[0] == pytest.approx(1.0) and torch.all(grid[1:] < grid[:-1])  # most noisy first
    sigmas = torch.tensor([0.001, 0.2, 0.5, 0.9973, 1.0], dtype=torch.float64)
    offsets = torch.tensor([6, 6, 2, 6, 3])
    paths = rollout_paths(grid, sigmas, offsets)
    for row in range(4):
        assert_strictly_decreasing_to(paths[row], float(sigmas[row]), int(offsets[row]))
        assert paths[row, 0] > sigmas[row]  # starts noisier, never on the low-sigma end of the table
        # the starting point is the table entry `offset` places above sigma (or the table's top)
        above = grid[grid > sigmas[row]]
        assert float(paths[row, 0]) == float(above[max(above.numel() - int(offsets[row]), 0)])
    assert torch.all(paths[4] == 1.0)


def test_unrolled_samples_stay_at_their_level():
    grid = noise_level_grid(ddpm_scheduler(), flow=False)
    paths = rollout_paths(grid, torch.tensor([100.0, 200.0]), torch.tensor([0, 4]))
    assert torch.all(paths[0] == 100.0)
    assert paths[1].tolist() == [204.0, 203.0, 202.0, 201.0, 200.0]


# --- the Euler step equals diffusers' ------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_euler_step_equals_diffusers_euler_scheduler(prediction_type):
    from diffusers import EulerDiscreteScheduler

    scheduler = ddpm_scheduler(prediction_type)
    euler = EulerDiscreteScheduler.from_config(scheduler.config)
    euler.set_timesteps(timesteps=[700, 650])
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    alphas = scheduler.alphas_cumprod
    # diffusers' Euler state is x / sqrt(alpha_bar); the model sees the scaled input (the DDPM-scale x)
    reference = euler.step(output, euler.timesteps[0], sample / alphas[700].sqrt()).prev_sample
    ours = euler_ddpm_step(alphas, sample, output, torch.tensor([700.0]), torch.tensor([650.0]), prediction_type)
    assert torch.allclose(ours, reference * alphas[650].sqrt(), atol=1e-5)


def test_flow_euler_step_equals_diffusers_flow_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=[0.8, 0.6])
    generator = torch.Generator().manual_seed(0)
    sample, velocity = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    reference = scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
    ours = euler_flow_step(sample, velocity, torch.tensor([0.8]), torch.tensor([0.6]))
    assert torch.allclose(ours, reference, atol=1e-6)


# --- probability ramp and offsets ----------------------------------------------------------------------


def test_probability_without_a_ramp_is_constant():
    settings = ScheduledSamplingSettings(max_step_offset=4, probability=0.3)
    assert [rollout_probability(settings, step) for step in (0, 10, 10_000)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_probability_ramp_follows_its_documented_curve(shape):
    settings = ScheduledSamplingSettings(max_step_offset=4, prob_start=0.1, prob_end=0.5, ramp_steps=100,
                                         start_step=50, ramp_shape=shape)
    for step in (0, 25, 50):
        assert rollout_probability(settings, step) == pytest.approx(0.1)
    for step in (150, 151, 10_000):
        assert rollout_probability(settings, step) == pytest.approx(0.5)
    for step in (60, 75, 100, 125, 140):
        progress = (step - 50) / 100
        if shape == "cosine":
            progress = (1 - math.cos(math.pi * progress)) / 2
        assert rollout_probability(settings, step) == pytest.approx(0.1 + 0.4 * progress)
    middle = rollout_probability(settings, 100)
    assert middle == pytest.approx(0.3)  # both shapes cross half way at the middle
    if shape == "cosine":  # flat at the ends: slower than linear early on
        assert rollout_probability(settings, 60) < 0.1 + 0.4 * 0.1


@pytest.mark.parametrize("strategy,expected_mean", [("uniform", 5.5), ("biased_early", 4.0), ("biased_late", 7.0)])
def test_offset_strategies_have_their_distribution(strategy, expected_mean):
    generator = torch.Generator().manual_seed(1234)
    offsets = draw_offsets(40_000, 10, strategy, generator=generator)
    assert int(offsets.min()) == 1 and int(offsets.max()) == 10
    assert float(offsets.double().mean()) == pytest.approx(expected_mean, abs=0.05)
    # KS-like: the empirical CDF stays close to the documented one (weights flat, falling or rising)
    weights = {"uniform": [1.0] * 10, "biased_early": [11.0 - k for k in range(1, 11)],
               "biased_late": [float(k) for k in range(1, 11)]}[strategy]
    total = sum(weights)
    for k in range(1, 11):
        expected_cdf = sum(weights[:k]) / total
        assert float((offsets <= k).double().mean()) == pytest.approx(expected_cdf, abs=0.01)


# --- SFT with scheduled sampling on a stand-in denoiser and real schedulers ---------------------------


class LinearDenoiser(torch.nn.Module):
    """A trainable 1x1 convolution standing in for the denoiser; it records the timesteps it sees."""

    weight_dtype = torch.float32

    def __init__(self, scheduler, prediction_type: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(4, 4, 1)
        self._scheduler = scheduler
        self.prediction_type = prediction_type
        self.seen: list[tuple[torch.Tensor, bool]] = []

    def noise_scheduler(self):
        return self._scheduler

    def latents_from_cache(self, cached, generator=None):
        return cached["latent_mean"]

    def predict(self, noisy, timesteps, text, batch=None):
        self.seen.append((timesteps.detach().clone(), torch.is_grad_enabled()))
        scale = 1 + timesteps.float().view(-1, 1, 1, 1) / 1000
        return self.net(noisy) * scale + 0.01 * text["prompt_embeds"].mean()


def fixed_batch(size: int = 4):
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(size, 4, 8, 8, generator=generator)
    return {"latent_mean": latents, "latent_std": torch.zeros_like(latents), "prompt_embeds": torch.ones(size, 3, 2),
            "empty_prompt": {"prompt_embeds": torch.zeros(size, 3, 2)}}


def method_for(flow: bool, **options):
    scheduler = flux_scheduler() if flow else ddpm_scheduler()
    model = LinearDenoiser(scheduler, "flow_matching" if flow else "epsilon")
    config = make_config(disable_segmented_timestep_sampling=True, **options)
    return SupervisedFineTuning(model, 0.0, config=config), model


def loss_of(method, seed: int = 3, step: int = 0):
    torch.manual_seed(seed)
    return method.compute_loss(fixed_batch(), torch.device("cpu"), step=step)


ROLLOUT = dict(scheduled_sampling_max_step_offset=5, scheduled_sampling_sampler="euler")


@pytest.mark.parametrize("flow", [False, True])
def test_probability_zero_gives_exactly_the_plain_sft_loss(flow):
    plain, _ = method_for(flow)
    rolled_off, model = method_for(flow, **ROLLOUT, scheduled_sampling_probability=0.0)
    assert rolled_off.scheduled_sampling is not None
    assert torch.equal(loss_of(plain).loss, loss_of(rolled_off).loss)
    assert len(model.seen) == 1  # no rollout call at all


CALLS_PER_STEP = {"euler": 1, "unipc": 1, "dpm": 1, "rk4": 4}


@pytest.mark.parametrize("sampler", sorted(CALLS_PER_STEP))
@pytest.mark.parametrize("flow", [False, True])
def test_rollout_changes_the_loss_and_runs_without_gradients(flow, sampler):
    plain, _ = method_for(flow)
    rolled, model = method_for(flow, scheduled_sampling_max_step_offset=5, scheduled_sampling_sampler=sampler,
                               scheduled_sampling_probability=1.0,
                               scheduled_sampling_reflexflow=False if flow else None)
    output = loss_of(rolled)
    assert output.logs["scheduled_sampling_fraction"] == 1.0
    assert torch.isfinite(output.loss) and float(output.loss) != pytest.approx(float(loss_of(plain).loss), rel=1e-6)
    rollout_calls, training_call = model.seen[:-1], model.seen[-1]
    per_step = CALLS_PER_STEP[sampler]
    assert len(rollout_calls) % per_step == 0 and 1 <= len(rollout_calls) // per_step <= 5
    assert not any(grad for _, grad in rollout_calls) and training_call[1]
    # the rollout's noise levels fall call by call toward the training level
    levels = torch.stack([timesteps.double() for timesteps, _ in model.seen])
    assert torch.all(levels[1:] <= levels[:-1])
    assert torch.all(levels[0] > levels[-1])
    # the gradient reaches the weights through the training prediction only
    output.loss.backward()
    assert model.net.weight.grad is not None and torch.isfinite(model.net.weight.grad).all()


def test_the_default_solver_is_unipc_of_order_2():
    method, _ = method_for(True, scheduled_sampling_max_step_offset=3, scheduled_sampling_probability=1.0)
    settings = method.scheduled_sampling.settings
    assert (settings.sampler, settings.order) == ("unipc", 2)
    method, _ = method_for(False, scheduled_sampling_max_step_offset=3, scheduled_sampling_sampler="dpm",
                           scheduled_sampling_order=3)
    assert (method.scheduled_sampling.settings.sampler, method.scheduled_sampling.settings.order) == ("dpm", 3)


def test_rollout_input_holds_no_graph():
    method, model = method_for(True, **ROLLOUT, scheduled_sampling_probability=1.0)
    sampling = method.scheduled_sampling
    latents = fixed_batch()["latent_mean"]
    paths = rollout_paths(sampling.grid, torch.full((4,), 0.3, dtype=torch.float64), torch.tensor([3, 1, 2, 3]))
    text = {"prompt_embeds": torch.ones(4, 3, 2)}
    rolled = sampling.rollout(latents, torch.randn_like(latents), paths, text, {})
    assert not rolled.requires_grad and rolled.grad_fn is None


def test_reflexflow_adds_the_anti_drift_term_and_weights():
    with_reflex, _ = method_for(True, **ROLLOUT, scheduled_sampling_probability=1.0)
    assert with_reflex.scheduled_sampling.settings.reflexflow  # on by default for flow models
    without, _ = method_for(True, **ROLLOUT, scheduled_sampling_probability=1.0, scheduled_sampling_reflexflow=False)
    reflex, plain = loss_of(with_reflex), loss_of(without)
    assert "reflexflow_anti_drift" in reflex.logs and "reflexflow_anti_drift" not in plain.logs
    assert 0 <= reflex.logs["reflexflow_anti_drift"] <= 2
    assert float(reflex.loss) > float(plain.loss)
    ddpm, _ = method_for(False, **ROLLOUT, scheduled_sampling_probability=1.0)
    assert not ddpm.scheduled_sampling.settings.reflexflow  # never on a DDPM model


def test_reflexflow_terms_follow_their_definitions():
    bias = torch.zeros(2, 1, 4, 4)
    bias[0, 0, :2, :2] = 1.0  # sample 0 drifted in one corner
    rolled = torch.tensor([True, False])
    weights = reflexflow_weights(bias, alpha=2.0, beta2=0.5, rolled=rolled)
    assert torch.all(weights[1] == 1)  # not rolled out: plain weight
    assert float(weights[0].mean()) == pytest.approx(0.5 * (1 + 2.0))  # normalised bias has mean 1
    assert weights[0, 0, 0, 0] > weights[0, 0, 3, 3] >= 0.5
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    on_path = 0.4 * noise + 0.6 * latents
    velocity = noise - latents
    term = anti_drift_term(velocity, on_path, latents, torch.tensor([True, True]))
    assert float(term) == pytest.approx(0.0, abs=1e-6)  # already aimed at the clean sample
    assert float(anti_drift_term(-velocity, on_path, latents, torch.tensor([True, False]))) == pytest.approx(2.0)


# --- config rules ---------------------------------------------------------------------------------------


def check(**options):
    from simpletuner.options.scheduled_sampling_rules import SCHEDULED_SAMPLING_RULES

    config = make_config(**options)
    for rule in SCHEDULED_SAMPLING_RULES:
        rule(config)


def test_rules_accept_a_working_setup():
    check(model_family="flux", **ROLLOUT, scheduled_sampling_probability=0.5)
    check(model_family="sd1x", **ROLLOUT, scheduled_sampling_ramp_steps=100, scheduled_sampling_prob_end=0.3,
          scheduled_sampling_ramp_shape="cosine", scheduled_sampling_strategy="biased_late")


@pytest.mark.parametrize("family", ["sd1x", "flux"])
@pytest.mark.parametrize("solver", [
    {},  # the table default: unipc, order 2
    dict(scheduled_sampling_sampler="unipc", scheduled_sampling_order=1),
    dict(scheduled_sampling_sampler="unipc", scheduled_sampling_order=3),
    dict(scheduled_sampling_sampler="dpm"),
    dict(scheduled_sampling_sampler="dpm", scheduled_sampling_order=1),
    dict(scheduled_sampling_sampler="dpm", scheduled_sampling_order=3),
    dict(scheduled_sampling_sampler="euler"),  # the default order belongs to unipc: not an explicit choice
    dict(scheduled_sampling_sampler="euler", scheduled_sampling_order=1),
    dict(scheduled_sampling_sampler="rk4"),
    dict(scheduled_sampling_sampler="rk4", scheduled_sampling_order=4),
])
def test_rules_accept_every_solver_with_an_order_that_fits(family, solver):
    from simpletuner.options.validation import check_unimplemented

    check(model_family=family, scheduled_sampling_max_step_offset=4, scheduled_sampling_probability=0.5, **solver)
    check_unimplemented(make_config(scheduled_sampling_max_step_offset=4, **solver))


@pytest.mark.parametrize("options,message", [
    (dict(scheduled_sampling_max_step_offset=4, scheduled_sampling_order=4),
     "`--scheduled_sampling_order 4` is too high for `--scheduled_sampling_sampler unipc`: its multistep history "
     "supports orders 1 to 3; set `--scheduled_sampling_order` to 1, 2 or 3"),
    (dict(scheduled_sampling_max_step_offset=4, scheduled_sampling_sampler="dpm", scheduled_sampling_order=5),
     "`--scheduled_sampling_order 5` is too high for `--scheduled_sampling_sampler dpm`"),
    (dict(ROLLOUT, scheduled_sampling_order=2),
     "`--scheduled_sampling_order 2` does not apply to `--scheduled_sampling_sampler euler`, a one-step solver of "
     "fixed order 1; remove `--scheduled_sampling_order`, or pick `--scheduled_sampling_sampler unipc` or `dpm`, "
     "whose multistep order it sets"),
    (dict(scheduled_sampling_max_step_offset=4, scheduled_sampling_sampler="rk4", scheduled_sampling_order=2),
     "`--scheduled_sampling_order 2` does not apply to `--scheduled_sampling_sampler rk4`, a one-step solver of "
     "fixed order 4"),
    (dict(scheduled_sampling_order=3),
     "`--scheduled_sampling_order` only applies to scheduled sampling, which is off; set "
     "`--scheduled_sampling_max_step_offset` to a positive number of steps or remove it"),
    (dict(scheduled_sampling_sampler="dpm"), "`--scheduled_sampling_sampler` only applies to scheduled sampling"),
    (dict(scheduled_sampling_probability=0.5), "scheduled sampling, which is off"),
    (dict(ROLLOUT, scheduled_sampling_ramp_steps=10, scheduled_sampling_probability=0.5), "conflict"),
    (dict(ROLLOUT, scheduled_sampling_prob_end=0.2), "ramp, which is off"),
    (dict(ROLLOUT, model_family="sd1x", scheduled_sampling_reflexflow=True), "only applies to flow-matching"),
    (dict(ROLLOUT, model_family="sd1x", scheduled_sampling_reflexflow_beta1=2.0), "only applies to flow-matching"),
    (dict(ROLLOUT, model_family="flux", scheduled_sampling_reflexflow=False, scheduled_sampling_reflexflow_alpha=2.0),
     "turns off"),
    (dict(ROLLOUT, model_family="sd1x", diff2flow_enabled=True, diff2flow_loss=True), "--diff2flow_loss"),
])
def test_rules_refuse_with_one_precise_message(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(**{"model_family": "sd1x", **options})


# --- real training runs -----------------------------------------------------------------------------------


def record_solvers(monkeypatch) -> list[tuple[str, int, int]]:
    """Every rollout's (sampler, order, rows) while the real solver runs."""
    from simpletuner.methods import scheduled_sampling

    calls = []
    real = scheduled_sampling.solve_rollout

    def recording(sampler, order, sample, paths, evaluate, levels):
        calls.append((sampler, order, paths.shape[0]))
        return real(sampler, order, sample, paths, evaluate, levels)

    monkeypatch.setattr(scheduled_sampling, "solve_rollout", recording)
    return calls


@pytest.mark.parametrize("family", ["sd1x", "flux"])
def test_cli_trains_with_the_default_unipc_rollout(tmp_path_factory, monkeypatch, family):
    """A few steps through the real CLI on a tiny DDPM family and a tiny flow family, with only
    --scheduled_sampling_max_step_offset and the probability set: the table's unipc of order 2 solves
    every rollout and the losses move away from plain SFT's."""
    from accelerate.state import AcceleratorState

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import family_args, keep_trainer

    root = make_family_project(tmp_path_factory.mktemp(f"ss-{family}"), family)
    seen = keep_trainer(monkeypatch)
    assert main(["train", *family_args(root, family, "plain", max_train_steps=2)]) == 0
    plain = seen["trainer"]
    AcceleratorState._reset_state(True)
    solvers = record_solvers(monkeypatch)
    assert main(["train", *family_args(root, family, "rolled", max_train_steps=2, scheduled_sampling_max_step_offset=3,
                                       scheduled_sampling_probability=1.0)]) == 0
    rolled = seen["trainer"]
    AcceleratorState._reset_state(True)
    assert solvers == [("unipc", 2, 2)] * 2  # one rollout of the whole batch (2 rows) per step
    assert rolled.method.scheduled_sampling.settings.reflexflow == (family == "flux")
    assert len(rolled.state.losses) == 2 and all(math.isfinite(loss) for loss in rolled.state.losses)
    assert rolled.state.losses != plain.state.losses
