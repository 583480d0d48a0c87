"""Loss types, Huber schedules, Min-SNR weights and noise tricks against their closed forms."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from diffusers import DDPMScheduler  # noqa: E402

from simpletuner.objectives.losses import (  # noqa: E402
    LossSettings, diffusion_loss, elementwise_loss, huber_threshold, signal_to_noise, snr_loss_weights,
)
from simpletuner.objectives.noise import NoiseSettings, apply_offset_noise, perturbation_strength  # noqa: E402


@pytest.fixture(scope="module")
def scheduler():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    return sched


def test_pseudo_huber_forms():
    error = torch.tensor([[0.0, 0.01, 3.0]], dtype=torch.float64)
    c = torch.tensor([0.1])
    huber = elementwise_loss(error, torch.zeros_like(error), "huber", c)
    smooth = elementwise_loss(error, torch.zeros_like(error), "smooth_l1", c)
    expected = [2 * 0.1 * (math.sqrt(e * e + 0.01) - 0.1) for e in (0.0, 0.01, 3.0)]
    assert huber[0].tolist() == pytest.approx(expected, rel=1e-4)  # computed in float32
    assert smooth[0].tolist() == pytest.approx([v / 0.1 for v in expected], rel=1e-4)
    # quadratic near zero, linear far away
    assert huber[0, 1] == pytest.approx(0.01**2, rel=1e-2)
    assert huber[0, 2] == pytest.approx(2 * 0.1 * 3.0, rel=0.05)
    assert elementwise_loss(error, torch.zeros_like(error), "l2")[0].tolist() == pytest.approx([0, 1e-4, 9])


def test_huber_schedules(scheduler):
    t = torch.tensor([0, 500, 999])
    constant = huber_threshold(LossSettings(loss_type="huber", huber_schedule="constant", huber_c=0.2), scheduler, t)
    assert constant.tolist() == pytest.approx([0.2] * 3)
    exponential = huber_threshold(LossSettings(huber_schedule="exponential", huber_c=0.1), scheduler, t)
    assert exponential.tolist() == pytest.approx([0.1 ** (s / 1000) for s in (0, 500, 999)], rel=1e-5)
    snr = huber_threshold(LossSettings(huber_schedule="snr", huber_c=0.1), scheduler, t)
    alphas = scheduler.alphas_cumprod[t]
    sigmas = ((1 - alphas) / alphas).sqrt()
    assert snr.tolist() == pytest.approx(((0.9) / (1 + sigmas) ** 2 + 0.1).tolist(), rel=1e-6)
    assert snr[0] > snr[1] > snr[2] > 0.1


def test_min_snr_weights_per_prediction_type(scheduler):
    t = torch.tensor([10, 300, 900])
    snr = signal_to_noise(scheduler, t)
    alphas = scheduler.alphas_cumprod[t]
    assert snr.tolist() == pytest.approx((alphas / (1 - alphas)).tolist())
    settings = LossSettings(snr_gamma=5.0)
    clamped = torch.clamp(snr, max=5.0)
    assert torch.allclose(snr_loss_weights(settings, snr, "epsilon"), clamped / snr)
    assert torch.allclose(snr_loss_weights(settings, snr, "v_prediction"), clamped / (snr + 1))
    assert torch.allclose(snr_loss_weights(settings, snr, "sample"), clamped)
    assert snr_loss_weights(settings, snr, "epsilon")[-1] == pytest.approx(1.0)  # noisy step: SNR < 5


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_signal_to_noise_is_diffusers_compute_snr_and_the_closed_form(schedule):
    """Our Min-SNR input is diffusers' ``compute_snr``; both equal alpha_bar / (1 - alpha_bar) on a DDPM schedule."""
    from diffusers.training_utils import compute_snr

    ddpm = DDPMScheduler(beta_schedule=schedule)
    t = torch.tensor([0, 1, 17, 250, 500, 750, 998, 999])
    ours = signal_to_noise(ddpm, t)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, compute_snr(ddpm, t))
    alphas = ddpm.alphas_cumprod.double()[t]
    assert ours.double().tolist() == pytest.approx((alphas / (1 - alphas)).tolist(), rel=1e-5)
    assert (ours[:-1] > ours[1:]).all()  # the signal fades as t grows


def test_soft_min_snr_is_a_smooth_minimum(scheduler):
    snr = signal_to_noise(scheduler, torch.tensor([5, 200, 990]))
    settings = LossSettings(soft_min_snr=True, soft_min_snr_sigma_data=0.5)  # gamma = 4
    x0_weight = snr_loss_weights(settings, snr, "sample")
    assert torch.allclose(x0_weight, snr * 4 / (snr + 4))
    assert (x0_weight < torch.minimum(snr, torch.full_like(snr, 4.0))).all()
    assert torch.allclose(snr_loss_weights(settings, snr, "epsilon"), x0_weight / snr)


def test_diffusion_loss_weights_each_sample(scheduler):
    prediction = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)]).double()
    t = torch.tensor([100, 800])
    plain = diffusion_loss(LossSettings(), scheduler, prediction, target, t, "epsilon")
    assert float(plain) == pytest.approx((1 + 4) / 2)
    weighted = diffusion_loss(LossSettings(snr_gamma=1.0), scheduler, prediction, target, t, "epsilon")
    w = snr_loss_weights(LossSettings(snr_gamma=1.0), signal_to_noise(scheduler, t).float(), "epsilon")
    assert float(weighted) == pytest.approx(float((torch.tensor([1.0, 4.0]) * w).mean()), rel=1e-6)


def test_offset_noise_is_constant_per_channel_and_respects_probability():
    torch.manual_seed(0)
    noise = torch.zeros(4, 3, 8, 8)
    shifted = apply_offset_noise(noise, 0.5, probability=1.0)
    assert torch.allclose(shifted, shifted.mean(dim=(2, 3), keepdim=True).expand_as(shifted))
    assert float(shifted.abs().max()) > 0
    assert torch.equal(apply_offset_noise(noise, 0.5, probability=0.0), noise)
    state = torch.get_rng_state()
    assert torch.equal(apply_offset_noise(noise, 0.0, probability=1.0), noise)
    assert torch.equal(torch.get_rng_state(), state), "disabled offset noise must not draw random numbers"
    applied = sum(not torch.equal(apply_offset_noise(noise, 0.1, 0.25), noise) for _ in range(4000))
    assert abs(applied / 4000 - 0.25) < 0.03


def test_input_perturbation_fades_linearly():
    settings = NoiseSettings(perturbation=0.1, perturbation_steps=100)
    assert [perturbation_strength(settings, s) for s in (0, 50, 100, 150)] == pytest.approx([0.1, 0.05, 0, 0])
    assert perturbation_strength(NoiseSettings(perturbation=0.1), 10_000) == 0.1
    assert perturbation_strength(NoiseSettings(), 0) == 0.0
